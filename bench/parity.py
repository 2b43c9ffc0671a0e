#!/usr/bin/env python3
"""The fast paths compute what stock HF WavLM computes, on the device at hand:
outputs and every parameter's gradient in fp32 (TF32 off), for the eager SDPA path,
the inductor-compiled layers, FlexAttention (compiled) and activation
checkpointing. Exits 1 when a difference exceeds --tol.

FlexAttention has no backward on the CPU (torch 2.14): there its row compares the
output alone (eager), and says so.

    python bench/parity.py                      # CUDA: WavLM-large's layer shapes, 4 layers
    python bench/parity.py --tiny --device cpu  # CPU rehearsal

The CPU test suite proves the same on a tiny model; this script is how a GPU run
shows it for CUDA's kernels (memory-efficient SDPA, Triton code from inductor).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import PAD_FRAMES_TO, TINY, WAVLM_LARGE  # noqa: E402
from wavlm_ddp.encoder.loading import make_local_checkpoint  # noqa: E402
from wavlm_wrapper import SpeechEncoder  # noqa: E402

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  layerdrop=0.0, apply_spec_augment=False)


def padded_batch(lengths, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wav = torch.randn(len(lengths), max(lengths), generator=gen)
    for i, n in enumerate(lengths):
        wav[i, n:] = 0.0
    return wav.to(device), torch.tensor([n / max(lengths) for n in lengths], device=device)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def stock_forward(model, wav, lens):
    """Stock HF with a sample-level mask; returns the output and its real frames."""
    mask = (torch.arange(wav.shape[1], device=wav.device)[None] < torch.round(lens * wav.shape[1])[:, None]).long()
    out = model(wav, attention_mask=mask).last_hidden_state
    return out, model._get_feature_vector_attention_mask(out.shape[1], mask)


PATHS = {  # name: the encoder's settings
    "fast (SDPA, eager)": dict(attention="sdpa"),
    "fast + compiled layers": dict(attention="sdpa", compile_layers=True),
    "fast + compiled layers + activation checkpointing": dict(attention="sdpa", compile_layers=True,
                                                              activation_checkpointing=True),
    "flex + compiled layers": dict(attention="flex", compile_layers=True),
    "fast + compiled layers + CUDA graphs": dict(attention="sdpa", compile_layers=True, cuda_graphs=True),
    "triton + compiled layers": dict(attention="triton", compile_layers=True),
}
# CUDA graph trees warm a function up on its first step, record it on the second and
# replay it from the third: the step compared is the last of these.
GRAPHED_STEPS = 3


def compare(folder, device, lengths, flex_kernel_options=None):
    torch.manual_seed(0)
    stock = WavLMModel.from_pretrained(folder, **NO_DROPOUT).to(device).train()
    wav, lens = padded_batch(lengths, device)
    ref, frames = stock_forward(stock, wav, lens)
    weights = torch.randn(ref.shape, device=device)
    (ref * weights)[frames].sum().backward()
    rows = []
    for name, settings in PATHS.items():
        if settings["attention"] == "triton" and device.type == "cpu":
            rows.append((name + " (CUDA only: bench/gated_parity.py runs it on CPU)", 0.0, 0.0, "-"))
            continue
        flex_on_cpu = settings["attention"] == "flex" and device.type == "cpu"
        if flex_on_cpu:  # no backward, and inductor's CPU flex template fails: eager forward only
            settings = dict(settings, compile_layers=False)
        model = SpeechEncoder(folder, freeze="none", normalize_wav=False, pad_frames_to=PAD_FRAMES_TO,
                              flex_kernel_options=flex_kernel_options, **settings, **NO_DROPOUT)
        model = model.to(device).train()
        try:
            if flex_on_cpu:
                with torch.no_grad():
                    out = model(wav, lens)
                rows.append((name + " (CPU: output only)", relative_error(out[frames], ref[frames]), 0.0, "-"))
                continue
            for _ in range(GRAPHED_STEPS if settings.get("cuda_graphs") else 1):
                model.zero_grad(set_to_none=True)
                out = model(wav, lens)
                (out * weights)[frames].sum().backward()
        except Exception as error:  # noqa: BLE001 - a failing path is a row, the others still run
            rows.append((f"{name}: {type(error).__name__}: {str(error)[:300]}", float("inf"), float("inf"), "-"))
            continue
        grads = dict(model.model.named_parameters())
        # k_proj.bias shifts every score of a query by the same amount, which softmax
        # ignores: its true gradient is zero and both sides hold rounding noise only.
        worst = max(((relative_error(grads[n].grad, p.grad), n) for n, p in stock.named_parameters()
                     if p.grad is not None and not n.endswith("k_proj.bias")), key=lambda x: x[0])
        rows.append((name, relative_error(out[frames], ref[frames]), *worst))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy model: CPU rehearsal")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers of the model under test")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest relative difference allowed")
    parser.add_argument("--flex_kernel_options", type=json.loads, default=None,
                        help="FlexAttention kernel_options as JSON")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = dict(TINY if args.tiny else WAVLM_LARGE, num_hidden_layers=args.layers)
    lengths = [16000, 11000] if args.tiny else [64000, 41000, 23000]
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_local_checkpoint(Path(tmp) / "wavlm", config, seed=0))
        rows = compare(folder, torch.device(args.device), lengths, args.flex_kernel_options)
    print(f"parity with stock HF on {args.device}, fp32, lengths {lengths}, {args.layers} layers "
          f"(relative max difference: max|a - b| / max|b|)")
    print("| path | output | worst gradient | parameter |\n|---|---|---|---|")
    for name, out_err, grad_err, param in rows:
        print(f"| {name} | {out_err:.1e} | {grad_err:.1e} | {param} |")
    bad = [r for r in rows if r[1] > args.tol or r[2] > args.tol]
    if bad:
        print(f"FAILED: differences above --tol={args.tol}: {[r[0] for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
