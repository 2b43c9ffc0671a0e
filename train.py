#!/usr/bin/env python3
"""Fine-tune WavLM with a CTC head, on one process or under torchrun DDP.

    python train.py [hparams/xxx.yaml] [--key=value ...]
    ./launch_ddp.sh [hparams/xxx.yaml] [--key=value ...]

Without a YAML file the demo (hparams/demo.yaml) runs. Any YAML key can be
overridden on the command line (`--layerdrop=0.05`); `--find_unused_parameters`
and `--precision` (fp32, fp16, bf16) reach DDP and autocast.
"""

import dataclasses
import logging
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import if_main_process, run_on_main

from preflight import (
    ConfigError,
    check_sharded_backend,
    explain_reduction_error,
    pop_find_unused_parameters,
    resolve_find_unused_parameters,
)
from recipes.tokenizer import load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)
DEFAULT_HPARAMS = Path(__file__).resolve().parent / "hparams" / "demo.yaml"


def learning_rate(step, peak, warmup_steps, total_steps, final_ratio):
    """Linear warm-up to `peak`, then cosine annealing to `peak * final_ratio`.

    A pure function of the optimizer step, so a resumed run continues the same curve.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def unwrap(module):
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


class ASR(sb.Brain):
    """CTC fine-tuning of a WavLM encoder: encoder and head have their own
    optimizer and learning rate; the encoder can stay frozen for the first
    `freeze_encoder_steps` optimizer steps while the head warms up."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        encoder_frozen = (
            stage == sb.Stage.TRAIN and self.optimizer_step < self.hparams.freeze_encoder_steps
        )
        with torch.no_grad() if encoder_frozen else nullcontext():
            feats = self.modules.wavlm(wavs, wav_lens, step=self.optimizer_step)
        logits = self.modules.ctc_head(feats)
        return self.hparams.log_softmax(logits), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        loss = sb.nnet.losses.ctc_loss(
            log_probs.float(), tokens, wav_lens, token_lens, self.hparams.blank_index
        )
        if stage != sb.Stage.TRAIN:
            hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=self.hparams.blank_index)
            words = [self.tokenizer.decode_ids(h).split() for h in hyps]
            targets = [text.split() for text in batch.wrd]
            self.wer_metric.append(batch.id, words, targets)
            self.cer_metric.append(batch.id, words, targets)
        return loss

    def on_fit_batch_start(self, batch, should_step):
        for name, opt in self.optimizers_dict.items():
            lr = learning_rate(self.optimizer_step, total_steps=self.total_steps, **self.hparams.lr[name])
            for group in opt.param_groups:
                group["lr"] = lr

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        interval = self.hparams.layerdrop_check_interval
        if should_step and interval > 0 and self.optimizer_step % interval == 0:
            check_layerdrop_in_sync(unwrap(self.modules.wavlm))

    def freeze_optimizers(self, optimizers):
        if self.optimizer_step < self.hparams.freeze_encoder_steps:
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
        else:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"loss": round(stage_loss, 4)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            wavlm = unwrap(self.modules.wavlm)
            if wavlm.layerdrop > 0:
                logger.info(f"Epoch {epoch}: steps each layer was dropped: {wavlm.drop_counts}")
            return
        stats["CER"] = round(self.cer_metric.summarize("error_rate"), 2)
        stats["WER"] = round(self.wer_metric.summarize("error_rate"), 2)
        if stage == sb.Stage.VALID:
            lrs = {f"lr_{name}": f"{opt.param_groups[0]['lr']:.2e}" for name, opt in self.optimizers_dict.items()}
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, **lrs}, train_stats=self.train_stats, valid_stats=stats
            )
            if if_main_process():
                print(f"epoch {epoch}: train loss {self.train_stats['loss']}, valid loss "
                      f"{stats['loss']}, valid CER {stats['CER']} %, WER {stats['WER']} %", flush=True)
            self.checkpointer.save_and_keep_only(meta={"WER": stats["WER"]}, min_keys=["WER"])
        else:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            if if_main_process():
                with open(self.hparams.test_wer_file, "w") as w:
                    self.wer_metric.write_stats(w)
                print(f"test WER {stats['WER']} %, CER {stats['CER']} % "
                      f"(details in {self.hparams.test_wer_file})", flush=True)
            self.test_stats = stats


def check_layerdrop_in_sync(wavlm):
    """In synced mode every rank must have dropped the same layers: compare the
    last drop pattern across ranks with two tiny all-reduces."""
    if wavlm.layerdrop_mode != "synced" or not torch.distributed.is_initialized():
        return
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    code = sum(1 << i for i, d in enumerate(wavlm.last_drop) if d)
    low = torch.tensor([code], dtype=torch.int64, device=device)
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(
            f"ranks dropped different layers (rank {torch.distributed.get_rank()}: "
            f"{wavlm.last_drop}): layerdrop_mode=synced is broken; report it, or set "
            "--layerdrop_mode=independent"
        )


def dataio_prepare(hparams, tokenizer):
    """Train / valid / test datasets with the audio and text pipelines."""
    replacements = {"data_root": hparams["data_folder"]}
    datasets = {}
    for split in ("train", "valid", "test"):
        data = sb.dataio.dataset.DynamicItemDataset.from_csv(
            hparams[f"{split}_csv"], replacements=replacements
        )
        max_duration = hparams["max_duration"] if split == "train" else None
        key_max = {"duration": max_duration} if max_duration else {}
        datasets[split] = data.filtered_sorted(sort_key="duration", key_max_value=key_max)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), text_pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "wrd", "tokens"])
    return datasets


def parse_args(argv):
    """(hparams file, run_opts, overrides, find_unused_parameters or None)."""
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        argv = [str(DEFAULT_HPARAMS)] + list(argv)
    find_unused, argv = pop_find_unused_parameters(argv)
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    return hparams_file, run_opts, overrides, find_unused


def main(argv):
    hparams_file, run_opts, overrides, find_unused = parse_args(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file) as f:
        hparams = load_hyperpyyaml(f, overrides)
    if find_unused is None:
        find_unused = hparams.get("find_unused_parameters")
        find_unused = None if find_unused is None else bool(find_unused)

    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    if "prepare_data" in hparams:
        run_on_main(hparams["prepare_data"])
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
    datasets = dataio_prepare(hparams, tokenizer)

    wavlm = hparams["wavlm"]
    distributed = torch.distributed.is_initialized()
    check_sharded_backend(wavlm.layerdrop)
    run_opts = dataclasses.replace(
        run_opts,
        find_unused_parameters=resolve_find_unused_parameters(find_unused, distributed, wavlm),
        overridden_args=run_opts.overridden_args | {"find_unused_parameters"},
    )

    ctc_head = hparams["ctc_head"](input_size=wavlm.output_size, n_neurons=tokenizer.vocab_size())
    checkpointer = hparams["checkpointer"]
    checkpointer.add_recoverable("ctc_head", ctc_head)
    asr = ASR(
        modules={"wavlm": wavlm, "ctc_head": ctc_head},
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=checkpointer,
    )
    asr.tokenizer = tokenizer
    train_loader = asr.make_dataloader(
        datasets["train"], stage=sb.Stage.TRAIN, **train_loader_kwargs(hparams, datasets["train"])
    )
    steps_per_epoch = math.ceil(len(train_loader) / asr.grad_accumulation_factor)
    asr.total_steps = steps_per_epoch * hparams["number_of_epochs"]
    try:
        asr.fit(
            hparams["epoch_counter"],
            train_loader,
            datasets["valid"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )
    except RuntimeError as error:
        raise explain_reduction_error(error) from error
    asr.evaluate(
        datasets["test"], min_key="WER", test_loader_kwargs=hparams["valid_dataloader_opts"]
    )
    return asr


def train_loader_kwargs(hparams, train_data):
    """Dynamic batching by total duration when `dynamic_batching` is on."""
    opts = dict(hparams["train_dataloader_opts"])
    if hparams["dynamic_batching"]:
        opts["batch_sampler"] = sb.dataio.sampler.DynamicBatchSampler(
            train_data,
            length_func=lambda x: float(x["duration"]),
            **hparams["dynamic_batch_sampler"],
        )
        opts.pop("batch_size", None)
        opts.pop("shuffle", None)
    return opts


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
