#!/usr/bin/env python3
"""Fine-tune a speech encoder of WavLM's family (WavLM, wav2vec 2.0, HuBERT, data2vec-audio) with a
CTC head, on one process or under torchrun DDP.

    python train.py [hparams/xxx.yaml] [--key=value ...]
    ./launch_ddp.sh [hparams/xxx.yaml] [--key=value ...]

Without a YAML file the demo (hparams/demo.yaml) runs. Any YAML key can be
overridden on the command line (`--layerdrop=0.05`); `--find_unused_parameters`
and `--precision` (fp32, fp16, bf16) reach DDP and autocast.
"""

import dataclasses
import difflib
import logging
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, run_on_main

from wavlm_ddp.training.brain import RecipeBrain
from wavlm_ddp.data.pipeline import (SPLITS, add_test_sets, more_test_sets, charset_of, dataio_prepare, hf_spec, read_datasets, training_plan, training_texts,
                  validate_data)
from wavlm_ddp.decoding.search import CTCDecoder, check_decoding, search_settings
from wavlm_ddp.faults.guards import NonFiniteGuard, Watchdog, progress
from wavlm_ddp.distributed import check_shared_folders, init_distributed, on_main_process
from wavlm_ddp.preflight import (
    ConfigError,
    check_find_unused_parameters,
    check_hparams,
    check_output_folder,
    encoder_keyword,
    explain_reduction_error,
    pop_bool_flag,
    pop_int_flag,
    resolve_find_unused_parameters,
)
from wavlm_ddp.decoding.fetch import fetch
from wavlm_ddp.encoder.loading import check_encoder_keys, check_graphed_accumulation
from wavlm_ddp.decoding.ngram import build_lm
from wavlm_ddp.data.tokenizer import load_tokenizer, train_tokenizer
from wavlm_ddp.data.manifests import save_check
from wavlm_ddp.faults.launcher_watch import LauncherWatch
from wavlm_ddp.faults.preemption import (DEFAULT_SIGNALS, Preempted, PreemptionWatch, check_signal_names, clear_marker,
                                         end_loader_workers, exit_code_after_preemption, stop_point)
from wavlm_ddp.faults.run_lock import RUN_ID_ENV, FolderLock
from wavlm_ddp.training.reporting import writing, append_step_row, gather_eval_stats, global_sum, peak_memory_gib, report_epoch, report_test
from wavlm_ddp.training.schedule import (GlobalBatchSampler, check_schedule, curve, derive_accumulation,
                                         describe_schedule, learning_rate, schedule_start, update_budget)

logger = logging.getLogger(__name__)
DEFAULT_HPARAMS = Path(__file__).resolve().parent / "hparams" / "demo.yaml"
# How long a collective may wait for a slow rank (set before the YAML is read; SpeechBrain's value).
DDP_TIMEOUT_S = 7200
# Set by launch_ddp.sh once its single-process check has passed and printed the plan.
CHECKED_ENV = "WAVLM_RECIPE_CHECKED"


def unwrap(module):
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


class ASR(RecipeBrain):
    """CTC fine-tuning of a speech encoder (wavlm_wrapper.SpeechEncoder): encoder
    and head have their own optimizer and learning-rate schedule; the encoder can
    stay frozen for the first `freeze_encoder` fraction of the run while the head
    warms up. `plan` (schedule.TrainingPlan) fixes the accumulation and the number
    of optimizer steps; the schedules are functions of the optimizer step.
    SpeechBrain internals that the recipe overrides: wavlm_ddp.training.brain.RecipeBrain."""

    test_decoder = None  # decoding.CTCDecoder of test_search, set before evaluate()

    @property
    def searching(self):
        """Whether the test set is also decoded by a beam search."""
        return self.test_decoder is not None and self.test_decoder.mode != "greedy"

    @property
    def freeze_steps(self):
        return round(self.hparams.freeze_encoder * self.plan.total_steps)

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        encoder_frozen = stage == sb.Stage.TRAIN and self.optimizer_step < self.freeze_steps
        with torch.no_grad() if encoder_frozen else nullcontext():
            feats = self.modules.wavlm(wavs, wav_lens, step=self.optimizer_step)
        logits = self.modules.ctc_head(feats)
        frame_lens = unwrap(self.modules.wavlm).frame_lengths(wav_lens, wavs.shape[1], logits.shape[1])
        return self.hparams.log_softmax(logits), frame_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        loss = sb.nnet.losses.ctc_loss(log_probs.float(), tokens, wav_lens, token_lens, self.hparams.blank_index)
        if stage != sb.Stage.TRAIN:
            progress(f"{stage.name.lower()} batch")
            self.eval_loss_sum += loss.item() * len(batch.id)
            self.eval_count += len(batch.id)
            targets = [text.split() for text in batch.wrd]
            words = [text.split() for text in self.greedy(log_probs, wav_lens)]
            self.wer_metric.append(batch.id, words, targets)
            self.cer_metric.append(batch.id, words, targets)
            if stage == sb.Stage.TEST and self.searching:
                lexicon = getattr(self.test_decoder, "lexicon", None)
                self.test_words += sum(len(t) for t in targets)
                self.test_oov += sum(w not in lexicon for t in targets for w in t) if lexicon is not None else 0
                started = time.time()
                words = [text.split() for text in self.test_decoder(log_probs, wav_lens)]
                self.decode_seconds += time.time() - started
                self.search_wer.append(batch.id, words, targets)
                self.search_cer.append(batch.id, words, targets)
            if stage == sb.Stage.TEST:
                wavs, sample_lens = batch.sig
                self.test_audio_seconds += float(sample_lens.sum()) * wavs.shape[1] / self.hparams.sample_rate
        return loss

    def greedy(self, log_probs, wav_lens):
        return CTCDecoder(self.tokenizer, self.hparams.blank_index)(log_probs, wav_lens)

    def on_fit_start(self):
        if self.hparams.use_tensorboard:  # every rank: a folder that cannot be written stops them all alike

            def open_writer():
                from torch.utils.tensorboard import SummaryWriter  # optional package (preflight.py checks it)

                with writing(self.hparams.tensorboard_folder):
                    self.tensorboard = SummaryWriter(self.hparams.tensorboard_folder)  # reporting.report_epoch writes

            on_main_process(open_writer)
        self.nonfinite = NonFiniteGuard(self.nonfinite_patience)
        self.checkpointer.remove_interrupted_saves()
        super().on_fit_start()  # wraps DDP, builds optimizers, recovers the latest checkpoint
        encoder = self.modules.wavlm
        if isinstance(encoder, torch.nn.parallel.DistributedDataParallel):
            logger.info(f"DDP wraps the encoder with find_unused_parameters={encoder.find_unused_parameters}; "
                        f"training precision {self.precision}")
        self.adapt_resumed_position()
        if self.optimizer_step > 0 and if_main_process():
            print(f"resumed from checkpoint: epoch {self.hparams.epoch_counter.current + 1}, batch "
                  f"{self.step} of the epoch, optimizer step {self.optimizer_step} of {self.plan.total_steps}",
                  flush=True)

    def init_optimizers(self):
        fused = {"fused": True} if self.device_type == "cuda" and self.hparams.fused_optimizer else {}
        encoder_params = [p for p in self.modules.wavlm.parameters() if p.requires_grad]
        self.optimizers_dict = {"head": self.hparams.head_opt_class(self.modules.ctc_head.parameters(), **fused)}
        if encoder_params:
            self.optimizers_dict["wavlm"] = self.hparams.wavlm_opt_class(encoder_params, **fused)
        for name, opt in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_opt", opt)

    def freeze_optimizers(self, optimizers):
        if self.optimizer_step < self.freeze_steps:
            return {"head": optimizers["head"]}
        return optimizers

    def on_fit_batch_start(self, batch, should_step):
        for name, opt in self.optimizers_dict.items():
            cfg = self.hparams.lr[name]
            start = schedule_start(name, cfg, self.hparams.freeze_encoder)
            lr = learning_rate(self.optimizer_step, self.plan.total_steps, start=start, **curve(cfg))
            for group in opt.param_groups:
                group["lr"] = lr

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        progress(f"training step {self.optimizer_step}, batch {self.step} of epoch "
                 f"{self.hparams.epoch_counter.current}")
        wavs, wav_lens = batch.sig
        self.audio_seconds += float(wav_lens.sum()) * wavs.shape[1] / self.hparams.sample_rate
        interval = self.hparams.layerdrop_check_interval
        if should_step and interval > 0 and self.optimizer_step % interval == 0:
            unwrap(self.modules.wavlm).layer_drop.check_in_sync()
        if should_step:  # every rank: the main process writes, a failed write stops them all
            step = self.optimizer_step - 1 if self.accumulated_step_applied else self.optimizer_step
            append_step_row(self.hparams.train_steps_file, step, self.hparams.epoch_counter.current,
                            self.optimizers_dict, step < self.freeze_steps, loss.detach(), self.step_fingerprint)

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            unwrap(self.modules.wavlm).layer_drop.reset_counts()
            self.epoch_start, self.audio_seconds = time.time(), 0.0
            if self.device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            return
        self.wer_metric, self.cer_metric = self.hparams.error_rate_computer(), self.hparams.cer_computer()
        self.search_wer, self.search_cer = self.hparams.error_rate_computer(), self.hparams.cer_computer()
        self.eval_loss_sum, self.eval_count = 0.0, 0
        self.decode_seconds = self.test_audio_seconds = 0.0
        self.test_words = self.test_oov = 0  # reference words, and those the beam search cannot output

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {
                "loss": round(stage_loss, 4),
                "audio_s_per_s": round(global_sum(self.audio_seconds) / (time.time() - self.epoch_start), 1),
                "peak_mem_GiB": round(peak_memory_gib(self.device_type), 2),
            }
            wavlm = unwrap(self.modules.wavlm)
            if wavlm.layerdrop > 0:
                logger.info(f"Epoch {epoch}: steps each layer was dropped: {wavlm.layer_drop.counts}")
            return
        metrics = [self.wer_metric, self.cer_metric] + ([self.search_wer, self.search_cer]
                                                         if stage == sb.Stage.TEST else [])
        loss = gather_eval_stats(metrics, self.eval_loss_sum, self.eval_count)  # evaluation was sharded
        stats = {"loss": round(loss, 4), "CER": round(self.cer_metric.summarize("error_rate"), 2),
                 "WER": round(self.wer_metric.summarize("error_rate"), 2)}
        if stage == sb.Stage.TEST:
            stop_point(self.preemption, "during the test evaluation: its results are not written")
            report_test(self, stats)
            return
        lrs = {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers_dict.items()}
        report_epoch(self, epoch, stats, lrs)  # every rank: the main process writes, a failed write stops them all
        self.random_states.capture()  # every rank's, for the save (a collective)
        self.checkpointer.save_and_keep_only(meta={"WER": stats["WER"]}, min_keys=["WER"])
        stop_point(self.preemption, f"during epoch {epoch}'s evaluation: checkpoint saved at its end")


def load_hparams(hparams_file, overrides):
    """The YAML with the command line's overrides; a missing file or a key the
    YAML does not have is one ConfigError (a mistyped key names the closest one)."""
    if not Path(hparams_file).is_file():
        raise ConfigError(f"the hparams file {hparams_file} does not exist: give the path of a YAML file, "
                          "such as hparams/wavlm_large_ctc.yaml")
    try:
        with open(hparams_file) as f:
            return load_hyperpyyaml(f, overrides)
    except KeyError as error:
        message = str(error.args[0]) if error.args else ""
        if not message.startswith("Override '"):
            raise
        key = message.split("'")[1]
        with open(hparams_file) as f:
            keys = [line.split(":")[0] for line in f if line[:1].isalpha() and ":" in line]
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean --{close[0]}?" if close else f"the keys are the top-level names in {hparams_file}"
        raise ConfigError(f"--{key} is not a key of {hparams_file}: {hint}") from None


def parse_args(argv):
    """(hparams file, run_opts, overrides, flags) where flags holds the values
    read here: find_unused_parameters, resume, overwrite (None when absent),
    check_only and world_size (launch_ddp.sh's single-process check)."""
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        argv = [str(DEFAULT_HPARAMS)] + list(argv)
    flags = {}
    for key in ("find_unused_parameters", "resume", "overwrite", "check_only"):
        flags[key], argv = pop_bool_flag(argv, key)
    flags["world_size"], argv = pop_int_flag(argv, "world_size")
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    if "grad_accumulation_factor" in run_opts.overridden_args:
        raise ConfigError("--grad_accumulation_factor is derived from global_batch_seconds and the world size: "
                          "remove it, and set --global_batch_seconds (per-rank memory: max_batch_length)")
    for option in ("compile", "jit"):
        if option in run_opts.overridden_args:
            raise ConfigError(f"--{option} makes SpeechBrain {option} whole modules, outside the recipe's checks "
                              "(LayerDrop, CUDA graphs, checkpoints): remove it, and set the YAML's compile_layers, "
                              "compile_cnn or cuda_graphs instead")
    return hparams_file, run_opts, overrides, flags


def hold_output_folder(hparams):
    """The main process holds output_folder for this run (faults/run_lock.py); every rank
    raises the same ConfigError when another run holds it. Returns the FolderLock
    (None on the other ranks)."""
    lock = error = None
    if if_main_process():
        lock = FolderLock(hparams["output_folder"], hparams["lock_stale_minutes"])
        try:
            lock.acquire()
        except ConfigError as held:
            error = str(held)
        except OSError as failed:  # the folder cannot be made or written: one line on every rank too
            error = f"could not take output_folder={hparams['output_folder']} ({failed}): fix its path or permissions"
    error = ddp_broadcast(error)
    if error:
        raise ConfigError(error)
    return lock


def decide_output_folder(hparams, hparams_file, overrides, flags, test_only, lock=None):
    """Refuse to mix configurations in one output folder (unless asked); with
    --overwrite=True the main process deletes the old run here. Decided on the
    main process, so that every rank acts alike whatever it reads."""
    if test_only:
        return
    with open(hparams_file) as f:
        new_config = resolve_references(f, overrides).getvalue()
    # One launch overwrites once: launch_ddp.sh's check did it before the workers start,
    # torchrun's restarts of the workers resume what this launch has trained, and a
    # requeued SLURM job what it trained before it was preempted.
    overwrite = flags["overwrite"] and not (os.environ.get(CHECKED_ENV) and not flags["check_only"]) \
        and int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0 \
        and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
    decision = error = None
    if if_main_process():
        try:
            decision = check_output_folder(hparams["output_folder"], new_config, flags["resume"], overwrite)
        except ConfigError as refused:
            error = str(refused)
    decision, error = ddp_broadcast((decision, error))
    if error:
        raise ConfigError(error)

    def overwrite_folder():
        try:
            shutil.rmtree(hparams["output_folder"])
            logger.warning(f"--overwrite=True: deleted {hparams['output_folder']}")
            if lock is not None:
                lock.acquire()  # the hold went with the folder
        except OSError as failed:
            raise ConfigError(f"--overwrite=True could not replace output_folder={hparams['output_folder']} "
                              f"({failed}): fix its permissions, or choose another --output_folder") from None

    if decision == "overwrite":
        on_main_process(overwrite_folder)  # every rank: a failure is one line on each
    ddp_barrier()


def check_run(hparams, hparams_file, run_opts, overrides, flags, world_size):
    """Everything that can refuse the run, in the order that loses nothing:
    settings, output folder, data preparation, manifests, global batch. Only
    then is the output folder created (with the manifest check's result).

    Run by every rank (decisions on the main process) and, by launch_ddp.sh,
    once in a single process before torchrun starts the workers.
    Returns (the output folder's lock (main process), the datasets without the bad
    rows, the plan, the global batch sequence)."""
    precision = run_opts.precision if "precision" in run_opts.overridden_args else hparams.get("precision", "fp32")
    check_hparams(hparams, precision, run_opts.device or sb.utils.distributed.infer_device())
    check_encoder_keys(hparams["wavlm"])
    if not run_opts.test_only:  # before the output folder is touched (--overwrite empties it)
        accumulation = derive_accumulation(hparams["global_batch_seconds"],
                                           hparams["dynamic_batch_sampler"]["max_batch_length"], world_size)[0]
        check_graphed_accumulation(encoder_keyword(hparams, "cuda_graphs"), accumulation,
                                   hparams["global_batch_seconds"], world_size)
    if flags["find_unused_parameters"] is None and hparams.get("find_unused_parameters") is not None:
        flags["find_unused_parameters"] = bool(hparams["find_unused_parameters"])
    check_find_unused_parameters(flags["find_unused_parameters"], world_size, hparams["layerdrop"],
                                 encoder_keyword(hparams, "freeze", "cnn"))
    check_schedule(hparams)
    add_test_sets(hparams)
    lock = hold_output_folder(hparams)
    try:
        return (lock, *_check_data_and_plan(hparams, hparams_file, run_opts, overrides, flags, world_size, lock))
    except ConfigError:
        if lock is not None:
            lock.release(remove_folder=True)  # a refused run leaves nothing behind
        raise


def _check_data_and_plan(hparams, hparams_file, run_opts, overrides, flags, world_size, lock):
    decide_output_folder(hparams, hparams_file, overrides, flags, run_opts.test_only, lock)
    if hparams.get("prepare_data"):  # null: your own manifests
        run_on_main(hparams["prepare_data"])
    stop_point(hparams["preemption"], "during the data preparation: nothing to save yet")
    bad, digest, reused, check_line = validate_data(hparams)
    stop_point(hparams["preemption"], "during the data check: nothing to save yet")
    check_decoding(search_settings(hparams["test_search"], hparams["decoding_file"]), hparams.get("lm_text"),
                   charset_of(hparams), hparams.get("lm_url"))
    datasets, filtered = read_datasets(hparams, bad)
    plan, batches = training_plan(hparams, datasets["train"], world_size, run_opts)
    if update_budget(hparams) and not run_opts.debug:  # the epochs that reach the update budget
        hparams["epoch_counter"].limit = len(plan.steps_per_epoch)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    def save():
        with writing(hparams["manifest_check_file"]):
            save_check(hparams["manifest_check_file"], digest, bad, [])

    on_main_process(save)  # a full disk: one line on every rank
    if if_main_process():
        logger.info(check_line)
        if reused:
            logger.info(f"manifests unchanged since their last check ({hparams['manifest_check_file']}): "
                        "their audio was not read again")
    if if_main_process():
        # Printed by launch_ddp.sh's check already: then only the log file gets it.
        log = logger.debug if os.environ.get(CHECKED_ENV) and not flags["check_only"] else logger.info
        budget = plan.describe_budget(None if run_opts.debug else update_budget(hparams), hparams.get("gpu_speed"),
                                      hparams.get("gpu_speed_source", ""))
        for line in [*([filtered] if filtered else []), plan.describe(), budget,
                     *describe_schedule(plan.total_steps, hparams["lr"], hparams["freeze_encoder"])]:
            log(line)
    return datasets, plan, batches


def main(argv, preemption):
    """The run; `preemption` (PreemptionWatch) records a stop request from the start."""
    hparams_file, run_opts, overrides, flags = parse_args(argv)
    if not flags["check_only"]:
        clear_marker()
        init_distributed(run_opts.distributed_backend, DDP_TIMEOUT_S)
    distributed = torch.distributed.is_initialized()
    if distributed:
        print(f"rank {torch.distributed.get_rank()} of world size {torch.distributed.get_world_size()} "
              f"({run_opts.distributed_backend})", flush=True)
    world_size = torch.distributed.get_world_size() if distributed else flags["world_size"] or 1
    hparams = load_hparams(hparams_file, overrides)
    check_signal_names(hparams["preempt_signals"])
    hparams["preemption"] = preemption.watch(hparams["preempt_signals"])
    if not flags["check_only"]:
        check_shared_folders(hparams["output_folder"], hparams["data_folder"],
                             [hf_spec(hparams, split) for split in SPLITS if hf_spec(hparams, split)])
    lock, datasets, plan, batches = check_run(hparams, hparams_file, run_opts, overrides, flags, world_size)
    if flags["check_only"]:
        print(f"checks passed for world size {world_size}: settings, manifests, output folder", flush=True)
        if lock is not None and not os.environ.get(RUN_ID_ENV):  # launch_ddp.sh's workers keep the hold
            lock.release()
        return None
    try:
        return train(hparams, run_opts, flags, datasets, plan, batches, distributed, world_size)
    finally:
        if lock is not None:
            lock.release()


def train(hparams, run_opts, flags, datasets, plan, batches, distributed, world_size):
    """Tokenizer, LM, model and the Brain; fit, then the test evaluation. Returns the Brain."""
    run_on_main(
        train_tokenizer,
        kwargs={
            "train_csv": None,
            "texts": training_texts(hparams) if if_main_process() else None,  # run on the main process only
            "model_dir": hparams["save_folder"],
            "vocab_size": hparams["vocab_size"],
            "model_type": hparams["token_type"],
        },
    )
    tokenizer = load_tokenizer(Path(hparams["save_folder"]) / "tokenizer.model")
    search = search_settings(hparams["test_search"], hparams["decoding_file"])

    def make_lm():  # fetched from lm_url (LibriSpeech's official 4-gram), or built from lm_text
        if search["mode"] != "beam" or not search["lm_path"] or Path(search["lm_path"]).exists():
            return
        if hparams.get("lm_url"):
            fetch(hparams["lm_url"], search["lm_path"], hparams.get("lm_sha256"), log=logger.info)
            return
        lm_text = hparams["lm_text"]
        if hf_spec(hparams, "train") and lm_text == hparams["train_csv"]:  # the default: the training transcripts
            lm_text = str(Path(hparams["save_folder"]) / "train_text.txt")
        build_lm([lm_text], search["lm_path"], hparams["lm_order"])

    on_main_process(make_lm)  # a failure there stops every rank with its one line
    datasets = dataio_prepare(hparams, tokenizer, None, datasets)
    stop_point(hparams["preemption"], "while the tokenizer and the LM were made: nothing to save yet")

    wavlm = hparams["wavlm"]()
    run_opts = dataclasses.replace(
        run_opts,
        find_unused_parameters=resolve_find_unused_parameters(flags["find_unused_parameters"], distributed, wavlm),
        grad_accumulation_factor=plan.accumulation,
        # SpeechBrain's debug_batches counts this rank's batches; the plan counts optimizer steps.
        debug_batches=run_opts.debug_batches * plan.accumulation,
        overridden_args=run_opts.overridden_args | {"find_unused_parameters", "grad_accumulation_factor",
                                                    "debug_batches"},
    )
    ctc_head = hparams["ctc_head"](input_size=wavlm.output_size, n_neurons=tokenizer.vocab_size())
    checkpointer = hparams["checkpointer"]()
    checkpointer.add_recoverable("wavlm", wavlm)
    checkpointer.add_recoverable("ctc_head", ctc_head)
    asr = ASR(
        modules={"wavlm": wavlm, "ctc_head": ctc_head},
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=checkpointer,
    )
    asr.tokenizer, asr.plan = tokenizer, plan
    if asr.debug and not asr.debug_persistently and distributed:
        checkpointer.use_shared_temporary_folder(hparams["output_folder"])
    rank = torch.distributed.get_rank() if distributed else 0
    asr.train_loader = asr.make_dataloader(
        datasets["train"], stage=sb.Stage.TRAIN, **hparams["train_dataloader_opts"],
        batch_sampler=GlobalBatchSampler(batches, rank, world_size, plan.accumulation),
    )
    watchdog = Watchdog(hparams["hang_timeout_minutes"]).start() if hparams["hang_timeout_minutes"] > 0 else None
    asr.preemption = hparams["preemption"] if hparams["preempt_signals"] else None
    try:
        stop_point(asr.preemption, "while the model was built: nothing to save yet")
        asr.fit(
            hparams["epoch_counter"],
            asr.train_loader,
            datasets["valid"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )
        asr.test_decoder = CTCDecoder(tokenizer, hparams["blank_index"], **search)
        for name in ["test", *more_test_sets(hparams)]:  # each with its WER lines and its wer file
            asr.test_set = name
            asr.evaluate(datasets[name], min_key="WER", test_loader_kwargs=hparams["valid_dataloader_opts"])
    except Preempted as stopped:
        if if_main_process():
            print(f"preempted by {stopped}; run the same command again to resume there", flush=True)
        asr.preempted = True
    except RuntimeError as error:
        raise explain_reduction_error(error) from error
    finally:
        if watchdog is not None:
            watchdog.stop()
    return asr


def run(argv):
    """main(argv) as a command: 0 when it finished, 2 with one `error:` line on
    stderr when a check refused the run, preemption.PREEMPTED_EXIT_CODE after a
    preemption checkpoint (0 under torchrun: launch_ddp.sh turns it into that code)."""
    preemption = PreemptionWatch(DEFAULT_SIGNALS).start()
    launcher = LauncherWatch().start()
    try:
        asr = main(argv, preemption)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stopped:  # before training: nothing to save
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"preempted by {stopped}; run the same command again to start there", flush=True)
        return exit_code_after_preemption()
    finally:
        end_loader_workers()
        launcher.stop()
        preemption.stop()
    if getattr(asr, "preempted", False):
        return exit_code_after_preemption()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
