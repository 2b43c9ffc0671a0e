#!/usr/bin/env python3
"""Training-step throughput: stock HF WavLM (as SpeechBrain's HF wrapper uses it)
against this recipe's fast path, in one run on one device.

    python bench/throughput.py --out results/bench.json                # WavLM-large, CUDA, bf16
    python bench/throughput.py --batch 4 --seconds 30                  # the memory case
    python bench/throughput.py --tiny --device cpu --out /tmp/b.json   # CPU smoke mode

The model is WavLM-large's architecture with random weights (no download), saved
once with save_pretrained and loaded through from_pretrained, as the recipe does.
Each step is forward, CTC loss, backward and optimizer step; the table gives
audio-seconds per second, the median step time, peak GPU memory, an MFU estimate
from an analytic FLOP count, and the ratio to stock.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavlm_wrapper import WavLM, make_local_checkpoint  # noqa: E402

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
        self.wavlm = WavLMModel.from_pretrained(folder, layerdrop=layerdrop, apply_spec_augment=False)
        if not cnn_trained:
            for p in self.wavlm.feature_extractor.parameters():
                p.requires_grad = False
        self.head = torch.nn.Linear(self.wavlm.config.hidden_size, VOCAB)

    def forward(self, wav, lens):
        mask = (torch.arange(wav.shape[1], device=wav.device)[None] < (lens * wav.shape[1])[:, None]).long()
        wav = F.layer_norm(wav, wav.shape[1:])
        return self.head(self.wavlm(wav, attention_mask=mask).last_hidden_state)


class FastCTC(torch.nn.Module):
    """This recipe's wrapper: SDPA attention, no CNN backward, optional compile."""

    def __init__(self, folder, layerdrop, cnn_trained, compile_layers):
        super().__init__()
        self.wavlm = WavLM(folder, layerdrop=layerdrop, freeze="none" if cnn_trained else "cnn",
                           attention="sdpa", compile_layers=compile_layers, pad_frames_to=PAD_FRAMES_TO)
        self.head = torch.nn.Linear(self.wavlm.output_size, VOCAB)
        self.step = 0

    def forward(self, wav, lens):
        self.step += 1
        return self.head(self.wavlm(wav, lens, step=self.step))


def build(variant, folder, args):
    if variant == "stock":
        return StockCTC(folder, args.layerdrop, args.train_cnn)
    return FastCTC(folder, args.layerdrop, args.train_cnn, compile_layers=variant == "fast+compile")


def measure(variant, folder, args, device, dtype):
    torch.manual_seed(0)
    model = build(variant, folder, args).to(device).train()
    net = model
    if args.ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.layerdrop > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" and variant != "stock" else {}
    opt = torch.optim.AdamW(params, lr=1e-5, **fused)
    samples = int(args.seconds * SAMPLE_RATE)
    wav = torch.randn(args.batch, samples, device=device)
    lens = torch.ones(args.batch, device=device)
    labels = torch.randint(1, VOCAB, (args.batch, int(args.seconds * 12)), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def run_step():
        with autocast:
            logits = net(wav, lens)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)
        frames = torch.full((args.batch,), log_probs.shape[0], dtype=torch.long)
        label_lens = torch.full((args.batch,), labels.shape[1], dtype=torch.long)
        loss = F.ctc_loss(log_probs, labels, frames, label_lens, zero_infinity=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        run_step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    config = args.config
    flops = training_flops(config, args.batch, samples, args.train_cnn)
    peak = PEAK_FLOPS.get(device_kind(device)) if device.type == "cuda" else None
    result = {
        "variant": variant,
        "median_step_s": median,
        "audio_s_per_s": args.batch * args.seconds / median,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflops_per_s": flops / median / 1e12,
        "mfu": flops / median / peak if peak else None,
    }
    if args.profile:  # after the peak memory was read: the profiled step must not count
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        with args.profile.open("a") as f:
            f.write(f"## {variant}: one training step, batch {args.batch} x {args.seconds} s, {args.precision}\n"
                    f"{profile_step(run_step, device)}\n\n")
    del model, net, opt
    return result


def profile_step(run_step, device):
    """The torch.profiler table of one step: the top operators and kernels by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)


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
    parser.add_argument("--variants", default="stock,fast,fast+compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model: CPU smoke mode")
    parser.add_argument("--out", type=Path, default=Path("results/bench/throughput.json"))
    parser.add_argument("--model_dir", type=Path, default=None,
                        help="where the random-init model is saved once and reused (default: a temporary folder)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="append a torch.profiler table of one step of each variant to this file")
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
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_local_checkpoint(args.model_dir or Path(tmp) / "wavlm", args.config, seed=0)
        results = [measure(v, str(folder), args, device, dtype) for v in args.variants.split(",")]
    stock = next((r for r in results if r["variant"] == "stock"), None)
    for r in results:
        r["speedup_vs_stock"] = r["audio_s_per_s"] / stock["audio_s_per_s"] if stock else None
        if stock and stock["peak_mem_gib"]:
            r["memory_vs_stock"] = r["peak_mem_gib"] / stock["peak_mem_gib"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": {k: getattr(args, k) for k in
                     ("batch", "seconds", "precision", "train_cnn", "layerdrop", "ddp", "warmup", "steps", "tiny")},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report


def format_table(report):
    s = report["settings"]
    lines = [
        f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}, {report['date']}",
        f"batch {s['batch']} x {s['seconds']} s, {s['precision']}, CNN {'trained' if s['train_cnn'] else 'frozen'}, "
        f"layerdrop {s['layerdrop']}, DDP {'on' if s['ddp'] else 'off'}",
        "| variant | audio-s/s | median step (s) | peak GiB | MFU | x stock |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
        ratio = f"{r['speedup_vs_stock']:.2f}" if r["speedup_vs_stock"] else "-"
        lines.append(f"| {r['variant']} | {r['audio_s_per_s']:.1f} | {r['median_step_s']:.3f} | {mem} | {mfu} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
