#!/usr/bin/env python3
"""Training-step throughput of this recipe's paths against its peers, in one run on
one device:

- ``stock``: HF's WavLM as SpeechBrain's HF wrapper calls it (eager attention that
  keeps the fp32 probabilities, CNN frozen by requires_grad only);
- ``peer``: HF's WavLM with the simplest patch a user could write, nothing of this
  recipe: the attention call with ``need_weights=False`` (the SDPA path), the CNN
  frozen with HF's ``_freeze_parameters()``, each encoder layer in ``torch.compile``;
- ``fast``, ``fast+compile``: this recipe's encoder with SDPA attention, eager or
  with compiled layers; ``triton``: our Triton kernel with the gated bias inside
  (gated_attention.py; ``triton+compile``: in compiled layers); ``flex+compile``: FlexAttention with the gated bias inside
  the kernel, compiled; a ``+ckpt`` suffix adds activation checkpointing, ``+graphs`` replays
  the compiled layers as CUDA graphs (the recipe's ``cuda_graphs``);
- ``ceiling``: the same layer shapes with no position bias, so the attention takes
  the flash / cuDNN kernels, compiled: what this architecture could reach if its
  bias cost nothing.

    python bench/throughput.py --out results/bench.json                # WavLM-large, CUDA, bf16
    python bench/throughput.py --batch 4 --seconds 30                  # the memory case
    python bench/throughput.py --max_batch --variants flex+compile     # largest batch that fits
    python bench/throughput.py --tiny --device cpu --out /tmp/b.json   # CPU smoke mode

The model is WavLM-large's architecture with random weights (no download), saved
once with save_pretrained and loaded through from_pretrained, as the recipe does.
All variants run the same dropouts (the large recipe's). Each step is forward, CTC
loss, backward and optimizer step; the table gives audio-seconds per second, the
median step time, peak GPU memory, an MFU estimate from an analytic FLOP count, and
the ratios to stock, to the peer patch and to the ceiling.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters
from transformers import WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavlm_ddp.encoder import attention as wavlm_attention  # noqa: E402
from wavlm_ddp.encoder.loading import make_local_checkpoint  # noqa: E402
from wavlm_wrapper import SpeechEncoder  # noqa: E402

WAVLM_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    conv_dim=[512] * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    num_buckets=320, max_bucket_distance=800, mask_time_prob=0.05,
)
TINY = dict(WAVLM_LARGE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=[16] * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
            num_buckets=16, max_bucket_distance=32)
# Dense bf16 peak (FLOP/s) for the MFU estimate; H200 as measured in shared/NOTES.md.
PEAK_FLOPS = {"H200": 790e12, "H100": 989e12, "A100": 312e12}
VOCAB = 32
PAD_FRAMES_TO = 64  # as hparams/wavlm_large_ctc.yaml
SAMPLE_RATE = 16000
# The large recipe's dropouts (hparams/wavlm_large_ctc.yaml), for every variant alike.
DROPOUTS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.1, feat_proj_dropout=0.0)
# GPU memory sizes the maximum-batch search reports (GiB usable of an 80 GB card, and the card at hand).
CARD_80GB_GIB = 79.1


def training_flops(config, batch, samples, cnn_trained):
    """Analytic FLOPs of one training step (matmuls and convolutions; backward = 2x forward)."""
    t = samples
    cnn = 0.0
    in_ch = 1
    for out_ch, kernel, stride in zip(config["conv_dim"], (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)):
        t = (t - kernel) // stride + 1
        cnn += 2 * t * in_ch * out_ch * kernel
        in_ch = out_ch
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    projection = 2 * t * in_ch * d
    pos_conv = 2 * t * d * (d // config["num_conv_pos_embedding_groups"]) * config["num_conv_pos_embeddings"]
    per_layer = 2 * t * (4 * d * d + 2 * d * ffn) + 4 * t * t * d
    head = 2 * t * d * VOCAB
    trained = projection + pos_conv + layers * per_layer + head
    return batch * (3 * trained + (3 if cnn_trained else 1) * cnn)


class StockCTC(torch.nn.Module):
    """Stock HF WavLM called as SpeechBrain's HF wrapper calls it: whole-tensor
    layer norm of the waveform, a sample-level attention mask, CNN frozen by
    requires_grad=False only (its backward still runs), HF's eager attention."""

    def __init__(self, folder, layerdrop, cnn_trained):
        super().__init__()
        self.wavlm = WavLMModel.from_pretrained(folder, layerdrop=layerdrop, apply_spec_augment=False, **DROPOUTS)
        if not cnn_trained:
            for p in self.wavlm.feature_extractor.parameters():
                p.requires_grad = False
        self.head = torch.nn.Linear(self.wavlm.config.hidden_size, VOCAB)

    def forward(self, wav, lens):
        mask = (torch.arange(wav.shape[1], device=wav.device)[None] < (lens * wav.shape[1])[:, None]).long()
        wav = F.layer_norm(wav, wav.shape[1:])
        return self.head(self.wavlm(wav, attention_mask=mask).last_hidden_state)


def _attention_without_weights(self, hidden_states, attention_mask, gated_position_bias):
    """HF's `WavLMAttention.torch_multi_head_self_attention` with the one change a user
    would make: `need_weights=False`, so PyTorch takes its SDPA path."""
    query = key = value = hidden_states.transpose(0, 1)
    key_padding_mask = attention_mask.ne(1) if attention_mask is not None else None
    out, _ = F.multi_head_attention_forward(
        query, key, value, self.embed_dim, self.num_heads, torch.empty([0]),
        torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)), None, None, False,
        self.dropout, self.out_proj.weight, self.out_proj.bias, self.training, key_padding_mask,
        need_weights=False, attn_mask=gated_position_bias, use_separate_proj_weight=True,
        q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
    )
    return out.transpose(0, 1), None


class PeerCTC(StockCTC):
    """The simplest patch on HF's WavLM: need_weights=False, the CNN frozen with HF's
    `_freeze_parameters()`, each encoder layer compiled. Nothing of this recipe."""

    def __init__(self, folder, layerdrop, cnn_trained, backend="inductor"):
        super().__init__(folder, layerdrop, cnn_trained)
        for layer in self.wavlm.encoder.layers:
            layer.attention.torch_multi_head_self_attention = types.MethodType(
                _attention_without_weights, layer.attention)
        if not cnn_trained:
            self.wavlm.feature_extractor._freeze_parameters()
        self.wavlm.encoder.layers = torch.nn.ModuleList(torch.compile(layer, backend=backend)
                                                    for layer in self.wavlm.encoder.layers)


def _attention_without_bias(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
    """The ceiling: WavLM's attention shapes with no position bias and no mask, so
    SDPA may take the flash or cuDNN kernel."""
    _, query, key, value = wavlm_attention._project(self, hidden_states)
    attended = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
    return wavlm_attention._merge_heads(self, attended), None, position_bias


class FastCTC(torch.nn.Module):
    """This recipe's encoder: SDPA or flex attention, no CNN backward, optional
    compile and activation checkpointing."""

    def __init__(self, folder, layerdrop, cnn_trained, attention, compile_layers, checkpointing,
                 compile_cnn=False, flex_kernel_options=None, backend="inductor", cuda_graphs=False, triton_block=None):
        super().__init__()
        self.wavlm = SpeechEncoder(folder, layerdrop=layerdrop, freeze="none" if cnn_trained else "cnn",
                                   attention=attention, compile_layers=compile_layers, compile_cnn=compile_cnn,
                                   compile_backend=backend, cuda_graphs=cuda_graphs,
                                   pad_frames_to=PAD_FRAMES_TO, activation_checkpointing=checkpointing,
                                   flex_kernel_options=flex_kernel_options, triton_block=triton_block, **DROPOUTS)
        self.head = torch.nn.Linear(self.wavlm.output_size, VOCAB)
        self.step = 0

    def forward(self, wav, lens):
        self.step += 1
        return self.head(self.wavlm(wav, lens, step=self.step))


VARIANTS = ("stock", "peer", "fast", "flex", "triton", "ceiling")
OPTIONS = ("compile", "cnn", "ckpt", "graphs")  # compiled layers, compiled CNN, activation checkpointing, CUDA graphs


def parse_variant(variant):
    """(base, options) of a variant named `base[+option...]`, e.g. `flex+compile+cnn`."""
    base, *options = variant.split("+")
    if base not in VARIANTS or not set(options) <= set(OPTIONS):
        raise SystemExit(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}, "
                         f"then any of +{', +'.join(OPTIONS)}")
    if base in ("stock", "peer") and set(options) - {"compile"}:
        raise SystemExit(f"unknown variant {variant!r}: {base} takes no options but +compile (peer is compiled)")
    return base, options


def build(variant, folder, args):
    """The model of a variant named `base[+option...]`, e.g. `flex+compile+cnn`."""
    base, options = parse_variant(variant)
    if base == "stock":
        return StockCTC(folder, args.layerdrop, args.train_cnn)
    if base == "peer":
        return PeerCTC(folder, args.layerdrop, args.train_cnn, args.compile_backend)
    attention = base if base in ("flex", "triton") else "sdpa"
    compiled = "compile" in options or "graphs" in options or base == "ceiling"
    model = FastCTC(folder, args.layerdrop, args.train_cnn, attention, compiled, "ckpt" in options, "cnn" in options,
                    args.flex_kernel_options, args.compile_backend, "graphs" in options, args.triton_block)
    if base == "ceiling":
        for layer in model.wavlm.model.encoder.layers:
            layer.attention.forward = types.MethodType(_attention_without_bias, layer.attention)
    return model


class Trainer:
    """One variant's model and optimizer, and a training step on random audio of a
    given batch size (forward, CTC loss, backward, AdamW step)."""

    def __init__(self, variant, folder, args, device, dtype):
        torch.manual_seed(0)
        self.model = build(variant, folder, args).to(device).train()
        self.net = self.model
        if args.ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=args.layerdrop > 0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.device, self.seconds = device, args.seconds

    def step(self, batch):
        samples = int(self.seconds * SAMPLE_RATE)
        wav = torch.randn(batch, samples, device=self.device)
        lens = torch.ones(batch, device=self.device)
        labels = torch.randint(1, VOCAB, (batch, int(self.seconds * 12)), device=self.device)
        with region("forward"), self.autocast:
            logits = self.net(wav, lens)
        with region("head and CTC loss"):  # the head's linear layer is in the forward; its log-softmax here
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)
            frames = torch.full((batch,), log_probs.shape[0], dtype=torch.long)
            label_lens = torch.full((batch,), labels.shape[1], dtype=torch.long)
            loss = F.ctc_loss(log_probs, labels, frames, label_lens, zero_infinity=True)
        with region("backward"):
            loss.backward()
        with region("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, batch, warmup, steps):
        """Median step time over `steps` steps after `warmup` ones, and the peak memory."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            self.step(batch)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return statistics.median(times), peak

    def fits(self, batch):
        """Whether a training step of `batch` utterances runs without running out of memory."""
        try:
            self.step(batch)
            return True
        except torch.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False


def result_row(variant, args, batch, median, peak_gib, device):
    flops = training_flops(args.config, batch, int(args.seconds * SAMPLE_RATE), args.train_cnn)
    peak = PEAK_FLOPS.get(device_kind(device)) if device.type == "cuda" else None
    return {
        "variant": variant,
        "batch": batch,
        "median_step_s": median,
        "audio_s_per_s": batch * args.seconds / median,
        "peak_mem_gib": peak_gib,
        "tflops_per_s": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None,
    }


def measure(variant, folder, args, device, dtype):
    skips = counters["inductor"]["cudagraph_skips"]
    trainer = Trainer(variant, folder, args, device, dtype)
    median, peak_gib = trainer.timed(args.batch, args.warmup, args.steps)
    result = result_row(variant, args, args.batch, median, peak_gib, device)
    # Graphs inductor declined to record (TORCH_LOGS=cudagraphs prints why): 0 when every
    # compiled graph of a +graphs variant was replayed as a CUDA graph.
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    if args.profile:  # after the peak memory was read: the profiled step must not count
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        with args.profile.open("a") as f:
            f.write(f"## {variant}: one training step, batch {args.batch} x {args.seconds} s, {args.precision}\n"
                    f"{profile_step(lambda: trainer.step(args.batch), device)}\n\n")
    del trainer
    return result


def largest_batch(trainer, limit_gib, start, tries):
    """The most utterances per step that train within `limit_gib` of GPU memory: the
    allocator is capped at that size (as on a card of that size), then the batch grows
    from `start` by doubling and is bisected between the last fit and the first
    failure, to within 1/16 of the batch. Returns (batch, tries used)."""
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_gib / total), index)
    low, high, used = 0, None, 0
    batch = start
    while used < tries and (high is None or high - low > max(1, low // 16)):
        used += 1
        if trainer.fits(batch):
            low = batch
        else:
            high = batch
        batch = low * 2 if high is None else (low + high) // 2
        if high is not None and batch <= low:
            break
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    return low, used


def max_batch_report(variant, folder, args, device, dtype, rows):
    """For `variant` with activation checkpointing off and on: the largest batch of
    `args.seconds` utterances that fits an 80 GB card and the card at hand, and the
    throughput at the 80 GB batch. Each row is appended to `rows` and the report
    written as soon as it is measured (a time limit keeps what was found)."""
    trainer = Trainer(variant, folder, args, device, dtype)
    trainer.step(2)  # compile outside the search
    card = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    graphed = getattr(trainer.model, "wavlm", None) is not None and trainer.model.wavlm.cuda_graphs
    for checkpointing in (False,) if graphed else (False, True):  # cuda_graphs refuses checkpointing
        trainer.model.wavlm.activation_checkpointing = checkpointing
        name = variant + ("+ckpt" if checkpointing else "")
        fits_80, tries_80 = largest_batch(trainer, CARD_80GB_GIB, args.batch, args.search_tries)
        fits_card, tries_card = largest_batch(trainer, card, max(fits_80, 1), args.search_tries)
        median, peak_gib = trainer.timed(fits_80, 1, args.steps)
        row = result_row(name, args, fits_80, median, peak_gib, device)
        row.update(max_batch_80gb=fits_80, max_seconds_80gb=fits_80 * args.seconds, tries_80gb=tries_80,
                   max_batch_card=fits_card, max_seconds_card=fits_card * args.seconds, tries_card=tries_card,
                   card_gib=card)
        rows.append(row)
        write_report(args, device, rows)
        print(f"{name}: {args.seconds} s utterances, largest batch {fits_80} ({fits_80 * args.seconds:.0f} s) "
              f"on 80 GB, {fits_card} ({fits_card * args.seconds:.0f} s) on {card:.0f} GiB; "
              f"{row['audio_s_per_s']:.0f} audio-s/s at {fits_80}", flush=True)


REGIONS = ("forward", "head and CTC loss", "backward", "optimizer")


def region(name):
    """A named part of the training step, for the profile's table of regions."""
    return torch.profiler.record_function(f"step: {name}")


def profile_step(run_step, device):
    """The torch.profiler tables of one step: where the CPU and the GPU spend it by part of
    the step (forward, head and CTC loss, backward, optimizer), then the top operators and
    kernels by self time, GPU's first on CUDA, then the CPU's."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_step()
    averages = prof.key_averages()
    tables = [region_table(averages)]
    if device.type == "cuda":
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    return "\n".join(tables)


def region_table(averages):
    """CPU time (wall time of the part, on the launching thread) and GPU time (the
    kernels it launched) per part of the step, in ms."""
    # On CUDA each range is also recorded as a GPU annotation under the same name (with
    # no CPU time): the CPU row holds both times.
    rows = {event.key: event for event in averages if event.device_type == torch.autograd.DeviceType.CPU}
    lines = ["| part of the step | CPU ms | GPU ms |", "|---|---:|---:|"]
    for name in REGIONS:
        event = rows.get(f"step: {name}")
        if event is not None:
            gpu = getattr(event, "device_time_total", 0.0) / 1e3
            lines.append(f"| {name} | {event.cpu_time_total / 1e3:.2f} | {gpu:.2f} |")
    return "\n".join(lines) + "\n"


def device_kind(device):
    name = torch.cuda.get_device_name(device)
    return next((kind for kind in PEAK_FLOPS if kind in name), None)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="utterances per step")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each utterance")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="bf16")
    parser.add_argument("--train_cnn", action="store_true", help="train the CNN (default: frozen)")
    parser.add_argument("--layerdrop", type=float, default=0.0)
    parser.add_argument("--ddp", action="store_true", help="wrap in DDP at world size 1")
    parser.add_argument("--variants", default="stock,peer,fast+compile,flex+compile,ceiling",
                        help=f"comma-separated, of {', '.join(VARIANTS)}; each may end in +ckpt")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model: CPU smoke mode")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the compiled variants (aot_eager: no code generation)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/throughput.json"))
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="where the random-init model is saved once and reused (default: a temporary folder)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="append a torch.profiler table of one step of each variant to this file")
    parser.add_argument("--max_batch", action="store_true",
                        help="instead of timing --batch: the largest batch that fits an 80 GB card and this one, "
                             "with activation checkpointing off and on (CUDA only)")
    parser.add_argument("--search_tries", type=int, default=8, help="training steps the batch search may try")
    parser.add_argument("--triton_block", type=int, default=None,
                        help="the Triton kernel's tile side (default: gated_attention.DEFAULT_BLOCK, the YAMLs' 64)")
    parser.add_argument("--flex_kernel_options", type=json.loads, default=None,
                        help='FlexAttention kernel_options as JSON, e.g. \'{"BLOCK_M": 64, "BLOCK_N": 64}\'')
    args = parser.parse_args(argv)
    args.config = TINY if args.tiny else WAVLM_LARGE
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if args.ddp and not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    for variant in args.variants.split(","):  # a misspelt variant stops the run before any is measured
        parse_variant(variant)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_local_checkpoint(args.model_dir or Path(tmp) / "wavlm", args.config, seed=0))
        for variant in args.variants.split(","):
            try:  # one variant that fails (a kernel, a compile) must not lose the others' figures
                if args.max_batch:
                    max_batch_report(variant, folder, args, device, dtype, results)
                else:
                    results.append(measure(variant, folder, args, device, dtype))
            except Exception as error:  # noqa: BLE001 - reported in the JSON and the table
                results.append({"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000]})
                print(f"{variant} failed: {type(error).__name__}: {str(error)[:500]}", flush=True)
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_report(args, device, results)
    report = write_report(args, device, results)
    print(format_table(report))
    return report


def write_report(args, device, results):
    """The JSON report so far, with each row's ratios to stock, the peer and the ceiling."""
    timed = [r for r in results if "error" not in r]
    for name in ("stock", "peer", "ceiling"):  # the ceiling may carry options (ceiling+cnn)
        ref = next((r for r in timed if r["variant"].split("+")[0] == name), None)
        for r in timed:
            r[f"vs_{name}"] = r["audio_s_per_s"] / ref["audio_s_per_s"] if ref else None
            if name == "stock" and ref and ref["peak_mem_gib"]:
                r["memory_vs_stock"] = r["peak_mem_gib"] / ref["peak_mem_gib"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": {k: getattr(args, k) for k in
                     ("batch", "seconds", "precision", "train_cnn", "layerdrop", "ddp", "warmup", "steps", "tiny",
                      "max_batch", "flex_kernel_options", "triton_block")},
        "dropouts": DROPOUTS,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report


def format_table(report):
    s = report["settings"]
    lines = [
        f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}, {report['date']}",
        f"batch {s['batch']} x {s['seconds']} s, {s['precision']}, CNN {'trained' if s['train_cnn'] else 'frozen'}, "
        f"layerdrop {s['layerdrop']}, DDP {'on' if s['ddp'] else 'off'}",
        "| variant | batch | audio-s/s | median step (s) | peak GiB | MFU | x stock | x peer | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(value):
        return f"{value:.2f}" if value else "-"

    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['audio_s_per_s']:.1f} | {r['median_step_s']:.3f} | {mem} "
                     f"| {mfu} | {ratio(r['vs_stock'])} | {ratio(r['vs_peer'])} | {ratio(r['vs_ceiling'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
