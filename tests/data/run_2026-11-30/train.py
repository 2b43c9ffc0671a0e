#!/usr/bin/env python3
"""Fine-tune WavLM with a CTC head, on one process or under torchrun DDP.

    python train.py [hparams/xxx.yaml] [--key=value ...]
    ./launch_ddp.sh [hparams/xxx.yaml] [--key=value ...]

Without a YAML file the demo (hparams/demo.yaml) runs. Any YAML key can be
overridden on the command line (`--layerdrop=0.05`); `--find_unused_parameters`
and `--precision` (fp32, fp16, bf16) reach DDP and autocast.
"""

import collections
import difflib
import csv
import dataclasses
import logging
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import speechbrain as sb
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml, resolve_references
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, run_on_main

from audio import load_audio
from decoding import CTCDecoder, check_decoding, search_settings
from fault_tolerance import (
    NonFiniteGuard,
    Watchdog,
    check_shared_folders,
    collective_device,
    init_distributed,
    progress,
)
from preflight import (
    ConfigError,
    check_hparams,
    check_output_folder,
    explain_reduction_error,
    pop_bool_flag,
    pop_int_flag,
    resolve_find_unused_parameters,
)
from schedule import (
    GlobalBatchSampler,
    check_schedule,
    describe_schedule,
    learning_rate,
    length_buckets,
    make_plan,
)
from training_curves import append_history, plot_history
from recipes.build_ngram_lm import build_lm
from recipes.tokenizer import load_tokenizer, train_tokenizer
from recipes.validate_manifest import (
    AudioLimits,
    empty_splits,
    fingerprint,
    length_filter,
    load_check,
    read_manifest,
    report,
    save_check,
    training_charset,
    validate_manifests,
)

logger = logging.getLogger(__name__)
DEFAULT_HPARAMS = Path(__file__).resolve().parent / "hparams" / "demo.yaml"
# How long a collective may wait for a slow rank (set before the YAML is read; SpeechBrain's value).
DDP_TIMEOUT_S = 7200
# Set by launch_ddp.sh once its single-process check has passed and printed the plan.
CHECKED_ENV = "WAVLM_RECIPE_CHECKED"


def unwrap(module):
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


@sb.utils.checkpoints.register_checkpoint_hooks
class ASR(sb.Brain):
    """CTC fine-tuning of a WavLM encoder: encoder and head have their own
    optimizer and learning-rate schedule; the encoder can stay frozen for the first
    `freeze_encoder` fraction of the run while the head warms up.

    `plan` (schedule.TrainingPlan) fixes the accumulation and the number of
    optimizer steps; the schedules are functions of the optimizer step."""

    plan = None
    test_decoder = None  # decoding.CTCDecoder of test_search, set before evaluate()

    @property
    def searching(self):
        """Whether the test set is also decoded by a beam search."""
        return self.test_decoder is not None and self.test_decoder.mode != "greedy"

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        encoder_frozen = (
            stage == sb.Stage.TRAIN and self.optimizer_step < self.freeze_steps
        )
        with torch.no_grad() if encoder_frozen else nullcontext():
            feats = self.modules.wavlm(wavs, wav_lens, step=self.optimizer_step)
        logits = self.modules.ctc_head(feats)
        frame_lens = unwrap(self.modules.wavlm).frame_lengths(wav_lens, wavs.shape[1], logits.shape[1])
        return self.hparams.log_softmax(logits), frame_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        loss = sb.nnet.losses.ctc_loss(
            log_probs.float(), tokens, wav_lens, token_lens, self.hparams.blank_index
        )
        if stage != sb.Stage.TRAIN:
            progress(f"{stage.name.lower()} batch")
            self.eval_loss_sum += loss.item() * len(batch.id)
            self.eval_count += len(batch.id)
            targets = [text.split() for text in batch.wrd]
            words = [text.split() for text in self.greedy(log_probs, wav_lens)]
            self.wer_metric.append(batch.id, words, targets)
            self.cer_metric.append(batch.id, words, targets)
            if stage == sb.Stage.TEST and self.searching:
                started = time.time()
                words = [text.split() for text in self.test_decoder(log_probs, wav_lens)]
                self.decode_seconds += time.time() - started
                self.search_wer.append(batch.id, words, targets)
                self.search_cer.append(batch.id, words, targets)
            if stage == sb.Stage.TEST:
                wavs, sample_lens = batch.sig
                self.test_audio_seconds += float(sample_lens.sum()) * wavs.shape[1] / self.hparams.sample_rate
        return loss

    def on_fit_start(self):
        if self.hparams.use_tensorboard and if_main_process():
            self.tensorboard = sb.utils.train_logger.TensorboardLogger(self.hparams.tensorboard_folder)
        self.nonfinite = NonFiniteGuard(self.nonfinite_patience)
        self.accumulated_finite = True
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

    @property
    def freeze_steps(self):
        return round(self.hparams.freeze_encoder * self.plan.total_steps)

    @sb.utils.checkpoints.mark_as_saver
    def _save(self, path):
        super()._save(path)
        with open(path, "a", encoding="utf-8") as w:  # SpeechBrain's YAML, plus the batching it was saved with
            w.write(f"world_size: {self.plan.world_size}\naccumulation: {self.plan.accumulation}\n"
                    f"per_rank_seconds: {self.plan.per_rank_seconds}\n")

    @sb.utils.checkpoints.mark_as_loader
    def _recover(self, path, end_of_epoch):
        super()._recover(path, end_of_epoch)
        with open(path, encoding="utf-8") as f:
            self.saved_plan = yaml.safe_load(f)

    def adapt_resumed_position(self):
        """A checkpoint saved mid-epoch with another world size or accumulation:
        translate its position in the epoch into this run's micro-batches.

        Checkpoints are only taken at optimizer-step boundaries, so `step` local
        batches of A accumulated micro-batches are step / A optimizer steps into
        the epoch on any world size: the same global batches when the per-rank
        batch length is unchanged (exact), otherwise the same number of steps of
        differently packed batches (warned)."""
        saved = getattr(self, "saved_plan", None) or {}
        old = (saved.get("world_size"), saved.get("accumulation"))
        if self.step == 0 or None in old or old == (self.plan.world_size, self.plan.accumulation):
            return
        steps_done = self.step // old[1]
        self.step = steps_done * self.plan.accumulation
        if self.train_loader._speechbrain_recovery_skip_to is not None:
            self.train_loader._speechbrain_recovery_skip_to = self.step
        message = (f"resuming mid-epoch with world size {self.plan.world_size} x accumulation "
                   f"{self.plan.accumulation} from a checkpoint of world size {old[0]} x accumulation {old[1]}: "
                   f"{steps_done} optimizer steps into the epoch")
        if abs(saved.get("per_rank_seconds", self.plan.per_rank_seconds) - self.plan.per_rank_seconds) > 1e-6:
            message += (f"; the per-rank batch changed ({saved['per_rank_seconds']:g} s -> "
                        f"{self.plan.per_rank_seconds:g} s), so the rest of this epoch is packed differently "
                        "and may repeat or miss some utterances of it")
        logger.warning(message)

    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        # Only between optimizer steps: accumulated gradients are not saved. Every
        # rank is at the same batch count, so all skip SpeechBrain's broadcast alike.
        if self.step % self.grad_accumulation_factor:
            return False
        return super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)

    def _train_loader_specifics(self, dataset, loader_kwargs):
        # GlobalBatchSampler already gives this rank its share: no DistributedSamplerWrapper.
        if isinstance(loader_kwargs.get("batch_sampler"), GlobalBatchSampler):
            self.train_sampler = loader_kwargs["batch_sampler"]
            return loader_kwargs
        return super()._train_loader_specifics(dataset, loader_kwargs)

    def fit_batch(self, batch):
        """SpeechBrain's step, with non-finite losses skipped on every rank at once.

        Backward always runs (DDP needs it after a forward); when any rank's loss is
        NaN/inf the gradients are dropped instead of applied."""
        should_step = self.step % self.grad_accumulation_factor == 0
        self.on_fit_batch_start(batch, should_step)
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            self.scaler.scale(loss / self.grad_accumulation_factor).backward()
        self.accumulated_finite &= self.nonfinite.step_is_finite(loss.detach())
        if should_step:
            self.accumulated_step_applied = self.accumulated_finite
            if self.accumulated_finite:
                self.optimizers_step()
            else:
                self.zero_grad(set_to_none=True)
            self.accumulated_finite = True
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach().cpu() if torch.isfinite(loss) else torch.tensor(0.0)

    def on_fit_batch_start(self, batch, should_step):
        for name, opt in self.optimizers_dict.items():
            start = self.hparams.freeze_encoder if name == "wavlm" else 0.0
            lr = learning_rate(self.optimizer_step, self.plan.total_steps, start=start, **self.hparams.lr[name])
            for group in opt.param_groups:
                group["lr"] = lr

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        progress(f"training step {self.optimizer_step}, batch {self.step} of epoch "
                 f"{self.hparams.epoch_counter.current}")
        wavs, wav_lens = batch.sig
        self.audio_seconds += float(wav_lens.sum()) * wavs.shape[1] / self.hparams.sample_rate
        interval = self.hparams.layerdrop_check_interval
        if should_step and interval > 0 and self.optimizer_step % interval == 0:
            check_layerdrop_in_sync(unwrap(self.modules.wavlm))
        if should_step and if_main_process():
            self.log_step(loss)

    def log_step(self, loss):
        """One row per optimizer step in `train_steps_file`: the step the schedules
        used, its learning rates, whether the encoder trained, rank 0's loss."""
        path = Path(self.hparams.train_steps_file)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", *(f"lr_{n}" for n in self.optimizers_dict), "encoder_frozen",
                                 "loss_rank0"])
            step = self.optimizer_step - 1 if self.accumulated_step_applied else self.optimizer_step
            writer.writerow([step, self.hparams.epoch_counter.current,
                             *(f"{o.param_groups[0]['lr']:.6e}" for o in self.optimizers_dict.values()),
                             int(step < self.freeze_steps), f"{float(loss.detach()):.4f}"])

    def freeze_optimizers(self, optimizers):
        if self.optimizer_step < self.freeze_steps:
            return {"head": optimizers["head"]}
        return optimizers

    def init_optimizers(self):
        fused = {"fused": True} if self.device_type == "cuda" and self.hparams.fused_optimizer else {}
        encoder_params = [p for p in self.modules.wavlm.parameters() if p.requires_grad]
        self.optimizers_dict = {"head": self.hparams.head_opt_class(self.modules.ctc_head.parameters(), **fused)}
        if encoder_params:
            self.optimizers_dict["wavlm"] = self.hparams.wavlm_opt_class(encoder_params, **fused)
        for name, opt in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_opt", opt)

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            unwrap(self.modules.wavlm).reset_drop_counts()
            self.epoch_start, self.audio_seconds = time.time(), 0.0
            if self.device_type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        else:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.search_wer = self.hparams.error_rate_computer()
            self.search_cer = self.hparams.cer_computer()
            self.eval_loss_sum, self.eval_count = 0.0, 0
            self.decode_seconds = self.test_audio_seconds = 0.0

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """Under DDP, each rank evaluates its own shard of valid / test."""
        if stage != sb.Stage.TRAIN and torch.distributed.is_initialized():
            loader_kwargs = {
                **loader_kwargs,
                "shuffle": False,
                "sampler": ShardSampler(len(dataset), torch.distributed.get_rank(),
                                        torch.distributed.get_world_size()),
            }
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_stats = {
                "loss": round(stage_loss, 4),
                "audio_s_per_s": round(global_sum(self.audio_seconds) / (time.time() - self.epoch_start), 1),
                "peak_mem_GiB": round(peak_memory_gib(self.device_type), 2),
            }
            wavlm = unwrap(self.modules.wavlm)
            if wavlm.layerdrop > 0:
                logger.info(f"Epoch {epoch}: steps each layer was dropped: {wavlm.drop_counts}")
            return
        # Evaluation was sharded across ranks: merge the statistics of all ranks.
        metrics = [self.wer_metric, self.cer_metric]
        if stage == sb.Stage.TEST:
            metrics += [self.search_wer, self.search_cer]
        loss = gather_eval_stats(self, metrics)
        stats = {
            "loss": round(loss, 4),
            "CER": round(self.cer_metric.summarize("error_rate"), 2),
            "WER": round(self.wer_metric.summarize("error_rate"), 2),
        }
        if stage == sb.Stage.VALID:
            lrs = {f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers_dict.items()}
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, **lrs}, train_stats=self.train_stats, valid_stats=stats
            )
            if if_main_process():
                self.report_epoch(epoch, stats, lrs)
            self.checkpointer.save_and_keep_only(meta={"WER": stats["WER"]}, min_keys=["WER"])
        else:
            self.report_test(stats)

    def report_test(self, stats):
        """The test line(s): greedy, and the test_search decoding when it is a beam
        search, with its decoding time; wer_test.txt holds the best decoding's details."""
        details = self.wer_metric
        line = f"test WER {stats['WER']} %, CER {stats['CER']} %, greedy"
        if self.searching:
            decode_seconds, audio = global_sum(self.decode_seconds), global_sum(self.test_audio_seconds)
            stats.update({"search_WER": round(self.search_wer.summarize("error_rate"), 2),
                          "search_CER": round(self.search_cer.summarize("error_rate"), 2),
                          "decode_seconds": round(decode_seconds, 2)})
            lm = "LM " + Path(self.test_decoder.lm_path).name if self.test_decoder.lm_path else "no LM"
            line += (f"\ntest WER {stats['search_WER']} %, CER {stats['search_CER']} %, beam search "
                     f"{self.test_decoder.beam_size} + {lm} (lm_weight {self.test_decoder.lm_weight:g}, word_score "
                     f"{self.test_decoder.word_score:g}): decoding {decode_seconds:.2f} s for {audio:.0f} s of "
                     f"audio (real-time factor {decode_seconds / max(audio, 1e-9):.4f})")
            details = self.search_wer
        self.hparams.train_logger.log_stats(
            stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
        )
        if if_main_process():
            with open(self.hparams.test_wer_file, "w") as w:
                details.write_stats(w)
            print(f"{line}\ndetails in {self.hparams.test_wer_file}", flush=True)
        self.test_stats = stats

    def greedy(self, log_probs, wav_lens):
        return CTCDecoder(self.tokenizer, self.hparams.blank_index)(log_probs, wav_lens)


    def report_epoch(self, epoch, stats, lrs):
        """The epoch line, the history and its plot, and TensorBoard (main process)."""
        train = self.train_stats
        lr_text = ", ".join(f"{name[3:]} {lr:.1e}" for name, lr in lrs.items())
        print(f"epoch {epoch}: train loss {train['loss']}, valid loss {stats['loss']}, valid CER "
              f"{stats['CER']} %, WER {stats['WER']} %, lr {lr_text}, {train['audio_s_per_s']} audio-s/s, "
              f"peak mem {train['peak_mem_GiB']} GiB (optimizer step {self.optimizer_step})", flush=True)
        record = {"epoch": epoch, "train_loss": train["loss"], **{f"valid_{k}": v for k, v in stats.items()},
                  **lrs, "audio_s_per_s": train["audio_s_per_s"], "peak_mem_GiB": train["peak_mem_GiB"]}
        output = Path(self.hparams.output_folder)
        history = append_history(output / "history.json", record)
        plot_history(history, output / "training_curves.png")
        if self.hparams.use_tensorboard:
            self.tensorboard.log_stats({"epoch": epoch, **lrs}, train_stats=train, valid_stats=stats)


def global_sum(value):
    """`value` summed over all ranks."""
    if not torch.distributed.is_initialized():
        return value
    total = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(total, value)
    return sum(total)


def peak_memory_gib(device_type):
    """Peak GPU memory of this process on CUDA, else its peak resident memory."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of N takes items r, r+N, r+2N, ... of the (length-sorted) dataset:
    every utterance is evaluated exactly once (DistributedSampler would pad with
    repeats and bias the WER), and each shard spans all lengths."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def gather_eval_stats(brain, metrics):
    """Merge the error-rate statistics of every rank into `metrics` (in place) and
    return the per-utterance mean loss over all ranks."""
    loss_sum, count = brain.eval_loss_sum, brain.eval_count
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        local = [(m.ids, m.scores) for m in metrics] + [(loss_sum, count)]
        torch.distributed.all_gather_object(gathered, local)
        for i, metric in enumerate(metrics):
            metric.ids = [x for rank in gathered for x in rank[i][0]]
            metric.scores = [x for rank in gathered for x in rank[i][1]]
        loss_sum = sum(rank[-1][0] for rank in gathered)
        count = sum(rank[-1][1] for rank in gathered)
    return loss_sum / max(count, 1)


def check_layerdrop_in_sync(wavlm):
    """In synced mode every rank must have dropped the same layers: compare the
    last drop pattern across ranks with two tiny all-reduces."""
    if wavlm.layerdrop_mode != "synced" or not torch.distributed.is_initialized():
        return
    code = sum(1 << i for i, d in enumerate(wavlm.last_drop) if d)
    low = torch.tensor([code], dtype=torch.int64, device=collective_device())
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(
            f"ranks dropped different layers (rank {torch.distributed.get_rank()}: "
            f"{wavlm.last_drop}): layerdrop_mode=synced is broken; report it, or set "
            "--layerdrop_mode=independent"
        )


def read_datasets(hparams, bad_ids):
    """Train / valid / test DynamicItemDatasets sorted by duration, without the
    rows that failed validation (`bad_ids`, with skip_invalid) and, for train,
    without utterances longer than max_duration. Returns (datasets, the line that
    says what max_duration left out, or None)."""
    datasets, filtered = {}, None
    for split in ("train", "valid", "test"):
        rows = read_manifest(hparams[f"{split}_csv"], hparams["data_folder"], leave_out=bad_ids)
        if split == "train":
            kept, filtered = length_filter(rows, hparams["max_duration"])
            if rows and not kept:
                raise ConfigError(f"the train split is empty: {filtered}; raise --max_duration")
            rows = kept
        data = sb.dataio.dataset.DynamicItemDataset(rows)
        datasets[split] = data.filtered_sorted(sort_key="duration")
    return datasets, filtered


def dataio_prepare(hparams, tokenizer, bad_ids, datasets=None):
    """The datasets of `read_datasets` with the audio and text pipelines."""
    datasets = datasets or read_datasets(hparams, bad_ids)[0]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), text_pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "wrd", "tokens"])
    return datasets


def validate_data(hparams):
    """Validate the manifests on the main process; every rank gets the result.

    The result is reused when `manifest_check_file` holds one for the same
    manifests, audio files (sizes, times) and settings. Returns (IDs to leave
    out with skip_invalid, the fingerprint to save, whether the saved result was
    used), or raises ConfigError with the report of every bad row."""
    bad = empty = digest = missing = None
    reused = False
    csvs = {split: hparams[f"{split}_csv"] for split in ("train", "valid", "test")}
    if if_main_process():
        missing = next((f"{split}_csv={path} does not exist: set --{split}_csv to the manifest's path"
                        for split, path in csvs.items() if not Path(path).is_file()), None)
        if not missing:
            limits = AudioLimits(hparams["sample_rate"], hparams["resample"], hparams["min_samples"],
                                 hparams["duration_tolerance"])
            charset = training_charset(hparams["train_csv"])
            digest = fingerprint(csvs, hparams["data_folder"], limits, charset)
            saved = load_check(hparams["manifest_check_file"], digest)
            reused = saved is not None
            if reused:
                bad, empty = saved
            else:
                bad = validate_manifests(csvs, hparams["data_folder"], limits, charset)
                empty = empty_splits(csvs, bad)
    bad, empty, digest, missing, reused = ddp_broadcast((bad, empty, digest, missing, reused))
    if missing:
        raise ConfigError(missing)
    if bad and not hparams["skip_invalid"]:
        raise ConfigError(f"{len(bad)} bad row(s) in the manifests; fix them, or set --skip_invalid=True "
                          f"to leave them out:\n{report(bad)}")
    if empty:
        raise ConfigError(f"{empty[0]}: fix the manifest or the settings named there")
    if bad:
        reasons = collections.Counter(row.reason.split(":")[0] for row in bad)
        logger.warning(f"skip_invalid: {len({b.utt_id for b in bad})} utterance(s) left out: {dict(reasons)}")
    return bad, digest, reused


def training_plan(hparams, train_data, world_size, run_opts):
    """The global batch arithmetic and the number of optimizer steps (a pure
    function of the data and the YAML, so every rank computes the same), and
    the global sequence of batches. In debug mode: the steps debug mode runs."""
    sampler_opts = dict(hparams["dynamic_batch_sampler"])
    durations = [float(train_data.data[utt_id]["duration"]) for utt_id in train_data.data_ids]

    def make_batches(per_rank, num_buckets):
        boundaries = length_buckets(durations, num_buckets, per_rank, hparams["batches_per_bucket"])
        return sb.dataio.sampler.DynamicBatchSampler(
            train_data, length_func=lambda x: float(x["duration"]), bucket_boundaries=boundaries,
            **{**sampler_opts, "max_batch_length": per_rank, "num_buckets": None})

    plan, batches = make_plan(make_batches, sampler_opts["num_buckets"], hparams["global_batch_seconds"],
                              sampler_opts["max_batch_length"], world_size, hparams["number_of_epochs"],
                              hparams["global_batch_tolerance"], hparams["max_duration"])
    if run_opts.debug:  # SpeechBrain stops after debug_batches batches of debug_epochs epochs
        plan.steps_per_epoch = [min(steps, run_opts.debug_batches) for steps in plan.steps_per_epoch]
        plan.steps_per_epoch = plan.steps_per_epoch[: run_opts.debug_epochs]
    return plan, batches


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
    return hparams_file, run_opts, overrides, flags


def decide_output_folder(hparams, hparams_file, overrides, flags, test_only):
    """Refuse to mix configurations in one output folder (unless asked); with
    --overwrite=True the main process deletes the old run here. Decided on the
    main process, so that every rank acts alike whatever it reads."""
    if test_only:
        return
    with open(hparams_file) as f:
        new_config = resolve_references(f, overrides).getvalue()
    decision = error = None
    if if_main_process():
        try:
            decision = check_output_folder(hparams["output_folder"], new_config, flags["resume"],
                                           flags["overwrite"])
        except ConfigError as refused:
            error = str(refused)
    decision, error = ddp_broadcast((decision, error))
    if error:
        raise ConfigError(error)
    if decision == "overwrite" and if_main_process():
        shutil.rmtree(hparams["output_folder"])
        logger.warning(f"--overwrite=True: deleted {hparams['output_folder']}")
    ddp_barrier()


def check_run(hparams, hparams_file, run_opts, overrides, flags, world_size):
    """Everything that can refuse the run, in the order that loses nothing:
    settings, output folder, data preparation, manifests, global batch. Only
    then is the output folder created (with the manifest check's result).

    Run by every rank (decisions on the main process) and, by launch_ddp.sh,
    once in a single process before torchrun starts the workers.
    Returns (bad rows, train dataset, plan, global batch sequence)."""
    precision = run_opts.precision if "precision" in run_opts.overridden_args else hparams.get("precision", "fp32")
    check_hparams(hparams, precision, run_opts.device or sb.utils.distributed.infer_device())
    check_schedule(hparams)
    decide_output_folder(hparams, hparams_file, overrides, flags, run_opts.test_only)
    if hparams.get("prepare_data"):  # null: your own manifests
        run_on_main(hparams["prepare_data"])
    bad, digest, reused = validate_data(hparams)
    check_decoding(search_settings(hparams["test_search"], hparams["decoding_file"]), hparams.get("lm_text"),
                   training_charset(hparams["train_csv"]))
    datasets, filtered = read_datasets(hparams, {row.utt_id for row in bad})
    plan, batches = training_plan(hparams, datasets["train"], world_size, run_opts)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    if if_main_process():
        save_check(hparams["manifest_check_file"], digest, bad, [])
        if reused:
            logger.info(f"manifests unchanged since their last check ({hparams['manifest_check_file']}): "
                        "their audio was not read again")
    if if_main_process():
        # Printed by launch_ddp.sh's check already: then only the log file gets it.
        log = logger.debug if os.environ.get(CHECKED_ENV) and not flags["check_only"] else logger.info
        for line in [*([filtered] if filtered else []), plan.describe(), *describe_schedule(plan.total_steps, hparams["lr"], hparams["freeze_encoder"])]:
            log(line)
    return bad, datasets, plan, batches


def main(argv):
    hparams_file, run_opts, overrides, flags = parse_args(argv)
    if not flags["check_only"]:
        init_distributed(run_opts.distributed_backend, DDP_TIMEOUT_S)
    distributed = torch.distributed.is_initialized()
    if distributed:
        print(f"rank {torch.distributed.get_rank()} of world size {torch.distributed.get_world_size()} "
              f"({run_opts.distributed_backend})", flush=True)
    world_size = torch.distributed.get_world_size() if distributed else flags["world_size"] or 1
    hparams = load_hparams(hparams_file, overrides)
    if not flags["check_only"]:
        check_shared_folders(hparams["output_folder"], hparams["data_folder"])
    bad, datasets, plan, batches = check_run(hparams, hparams_file, run_opts, overrides, flags, world_size)
    if flags["check_only"]:
        print(f"checks passed for world size {world_size}: settings, manifests, output folder", flush=True)
        return None
    if flags["find_unused_parameters"] is None and hparams.get("find_unused_parameters") is not None:
        flags["find_unused_parameters"] = bool(hparams["find_unused_parameters"])

    run_on_main(
        train_tokenizer,
        kwargs={
            "train_csv": hparams["train_csv"],
            "model_dir": hparams["save_folder"],
            "vocab_size": hparams["vocab_size"],
            "model_type": hparams["token_type"],
        },
    )
    tokenizer = load_tokenizer(Path(hparams["save_folder"]) / "tokenizer.model")
    search = search_settings(hparams["test_search"], hparams["decoding_file"])
    # Decided on the main process (run_on_main ends in a barrier every rank must reach).
    build = if_main_process() and search["mode"] == "beam" and search["lm_path"] and not Path(search["lm_path"]).exists()
    if ddp_broadcast(build):
        run_on_main(build_lm, args=([hparams["lm_text"]], search["lm_path"], hparams["lm_order"]))
    datasets = dataio_prepare(hparams, tokenizer, None, datasets)

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
    try:
        asr.fit(
            hparams["epoch_counter"],
            asr.train_loader,
            datasets["valid"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )
        asr.test_decoder = CTCDecoder(tokenizer, hparams["blank_index"], **search)
        asr.evaluate(
            datasets["test"], min_key="WER", test_loader_kwargs=hparams["valid_dataloader_opts"]
        )
    except RuntimeError as error:
        raise explain_reduction_error(error) from error
    finally:
        if watchdog is not None:
            watchdog.stop()
    return asr


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
