"""The Triton gated-bias attention (wavlm_ddp.encoder.gated_attention) against the same
attention with the (B, H, T, T) bias materialised, forward and every gradient (query,
key, value, gate, table), in float32 and bfloat16, with key padding: one JSON line
per dtype with the largest absolute difference of each tensor, scaled by the largest
value of the reference's, and the time of a step (forward and backward) of the kernel at
each tile size (`--blocks`), of the recipe's SDPA path (the gated bias materialised as a
float mask: the memory-efficient kernel) and of the reference. The reference is computed
in float32 from the same inputs; for bfloat16 the line also gives the bfloat16
reference's and SDPA's own differences from it, the errors to judge the kernel's by.

    python bench/gated_parity.py                              # on a GPU: WavLM-large's shape, 8 x 15 s
    TRITON_INTERPRET=1 python bench/gated_parity.py --tiny    # its rehearsal on CPU (float32 only)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wavlm_ddp.encoder.gated_attention import gated_bias_attention, reference_attention  # noqa: E402

NAMES = ("out", "query", "key", "value", "gate", "table")


def inputs(batch, heads, frames, head_dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    qkv = [rand(batch, heads, frames, head_dim).to(dtype).requires_grad_() for _ in range(3)]
    gate = (1.0 + rand(batch, heads, frames, scale=0.5)).requires_grad_()
    table = rand(heads, 2 * frames - 1).requires_grad_()
    lengths = torch.linspace(frames, frames // 2, batch).long()  # every utterance padded but the first
    keep = (torch.arange(frames)[None, :] < lengths[:, None]).to(device)
    return (*qkv, gate, table, keep)


def sdpa_attention(query, key, value, gate, table, keep):
    """The recipe's SDPA path (attention.sdpa_forward): the (H, T, T) bias gathered from
    the table, gated per query, -inf on padding keys, passed to SDPA as a float mask."""
    frames = query.shape[-2]
    positions = torch.arange(frames, device=query.device)
    bias = gate[..., None] * table[:, positions[None, :] - positions[:, None] + frames - 1]
    mask = bias.masked_fill(~keep[:, None, None, :], float("-inf")).to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def step(attend, tensors, grad_out):
    *leaves, keep = tensors
    for leaf in leaves:
        leaf.grad = None
    out = attend(*leaves, keep)
    valid = keep[:, None, :, None]  # padded query rows do not count (the encoder drops them)
    (out.float() * grad_out * valid).sum().backward()
    return [out.detach().float() * valid, *(leaf.grad.float() for leaf in leaves)]


def timed(attend, tensors, grad_out, device, repeats):
    results = step(attend, tensors, grad_out)  # warm-up (and Triton's compile)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(attend, tensors, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
    return results, (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, float32 only (CPU rehearsal)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", default=None,
                        help="comma-separated tile sides of the kernel to time (default: 16 with --tiny, else 32,64,128)")
    args = parser.parse_args(argv)
    blocks = [int(b) for b in (args.blocks or ("16" if args.tiny else "32,64,128")).split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # WavLM-large: 16 heads of 64; 15 s of audio are 749 frames.
    shape = (2, 2, 37, 16) if args.tiny else (8, 16, 749, 64)
    dtypes = [torch.float32] if args.tiny or device == "cpu" else [torch.float32, torch.bfloat16]
    grad_out = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device)
    exact = step(reference_attention, inputs(*shape, torch.float32, device), grad_out)
    for dtype in dtypes:  # each its own line: a failure in one keeps the other's
        report = {"dtype": str(dtype).split(".")[-1], "device": device, "shape_bhtd": list(shape)}
        try:
            tensors = inputs(*shape, dtype, device)
            for block in blocks:  # the first block's differences are reported; every block is checked
                def attend(*args, block=block):
                    return gated_bias_attention(*args, block=block)

                try:  # a tile that does not compile on this GPU keeps the other rows
                    kernel, kernel_s = timed(attend, tensors, grad_out, device, args.repeats)
                except Exception as error:  # noqa: BLE001 - reported in the line
                    report[f"error_block{block}"] = f"{type(error).__name__}: {error}"[:500]
                    continue
                report[f"kernel_step_ms_block{block}"] = round(kernel_s * 1000, 3)
                for name, mine, truth in zip(NAMES, kernel, exact):
                    diff = float((mine - truth).abs().max() / truth.abs().max().clamp_min(1e-12))
                    key = f"{name}_max_rel_diff" + ("" if block == blocks[0] else f"_block{block}")
                    report[key] = diff
            for label, attend in (("sdpa", sdpa_attention), ("reference", reference_attention)):
                theirs, seconds = timed(attend, tensors, grad_out, device, args.repeats)
                report[f"{label}_step_ms"] = round(seconds * 1000, 3)
                if dtype != torch.float32:
                    for name, mine, truth in zip(NAMES, theirs, exact):
                        scale = truth.abs().max().clamp_min(1e-12)
                        report[f"{name}_{label}_max_rel_diff"] = float((mine - truth).abs().max() / scale)
        except Exception as error:  # noqa: BLE001 - the report names it; the next dtype still runs
            report["error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
