#!/usr/bin/env python3
"""Which FlexAttention kernel_options work, and which is fastest, for WavLM's gated
relative position bias on the GPU at hand: one WavLM-large attention layer
(forward + backward, bf16) through the recipe's `flex` path, each candidate timed.

    python bench/flex_options.py --out flex_options.json   # prints the best options as JSON, last
    python bench/flex_options.py --device cpu --frames 64   # CPU rehearsal: forward only, eager

FlexAttention's default block sizes may need more shared memory than a GPU has
once gradients flow into the captured bias table and gate (seen on an H200 with
torch 2.11); smaller blocks and fewer pipeline stages fit.
"""

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavlm_ddp.encoder import attention as wavlm_attention  # noqa: E402

CANDIDATES = [
    None,
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 1, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64,
     "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_stages": 1},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4},
]


def time_candidate(options, batch, frames, device, repeats):
    attention = WavLMAttention(1024, 16, num_buckets=320, max_distance=800).to(device)  # wavlm-large's
    attention.forward = types.MethodType(wavlm_attention.flex_forward, attention)
    attention.flex_kernel_options = options
    cuda = device.type == "cuda"
    layer = lambda x, mask, table: attention(x, attention_mask=mask, position_bias=table)[0]  # noqa: E731
    if cuda:
        layer = torch.compile(layer)
    x = torch.randn(batch, frames, 1024, device=device, requires_grad=cuda)
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    mask[1:, frames * 3 // 4:] = False

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.set_grad_enabled(cuda):
            table = wavlm_attention.relative_position_values(attention, frames)
            out = layer(x, mask, table).float().square().mean()
        if cuda:  # FlexAttention has no backward on the CPU
            out.backward()
            torch.cuda.synchronize(device)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=768, help="15 s of audio padded to a multiple of 64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for options in CANDIDATES:
        try:
            seconds = time_candidate(options, args.batch, args.frames, device, args.repeats)
            rows.append({"options": options, "median_s": seconds})
            print(f"{json.dumps(options)}: {1000 * seconds:.2f} ms forward + backward", flush=True)
        except Exception as error:  # noqa: BLE001 - a candidate that does not compile is a finding
            rows.append({"options": options, "error": f"{type(error).__name__}: {str(error)[:500]}"})
            print(f"{json.dumps(options)}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
        torch._dynamo.reset()
        best = write_report(args, device, rows)  # after each candidate: a time limit keeps what was found
    print(json.dumps(best))
    return 0 if any("median_s" in r for r in rows) else 1


def write_report(args, device, rows):
    working = [r for r in rows if "median_s" in r]
    best = min(working, key=lambda r: r["median_s"])["options"] if working else None
    if args.out:
        name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "batch": args.batch,
                                        "frames": args.frames, "candidates": rows, "best": best}, indent=2))
    return best


if __name__ == "__main__":
    sys.exit(main())
