"""WavLM's attention with the gated relative position bias computed inside a Triton
flash-attention kernel, forward and backward.

The maths (as `attention.sdpa_forward` and `attention.flex_forward`): for batch b,
head h, query q and key k, with T frames and head_dim D,

    score[b,h,q,k] = (Q[b,h,q] . K[b,h,k]) * scale + gate[b,h,q] * table[h, k - q + T - 1]
    score[b,h,q,k] = -inf                where key k is padding (keep[b,k] False)
    out[b,h,q]     = sum_k softmax_k(score[b,h,q,:])[k] * V[b,h,k]

with scale = 1/sqrt(D) (SDPA's default), table (H, 2T - 1) the bias of every relative
position k - q in [1 - T, T - 1], gate (B, H, T) the per-query gate of that bias.

Tiling. The (B, H, T, T) bias is never written: a tile of BLOCK_M queries x BLOCK_N
keys reads its bias from the table at k - q + T - 1 (a (BLOCK_M, BLOCK_N) load from a
(2T - 1) row: the tile's diagonals) and multiplies it by the queries' gates.
- forward: one program per (query block, batch x head) walks the key blocks with
  the online softmax (running max m, running sum l, fp32 accumulator) and saves the
  logsumexp lse = m + log(l) of every query for the backward.
- backward, with P = exp(score - lse), dP = dO V^T, delta = rowsum(dO * O) and
  dS = P * (dP - delta) (the softmax backward), as in flash attention 2:
    * dQ pass, one program per (query block, batch x head) over the key blocks:
      dQ = scale * dS K; d gate[q] = sum_k dS[q,k] * table[h, k - q + T - 1] (the
      bias' row sum); and d table: each tile reduces dS * gate[q] over its 2B - 1
      diagonals (one `tl.gather` skews the tile so that a diagonal becomes a column)
      into its own slot of a buffer; torch sums the slots afterwards (no atomics: the
      sum is deterministic). This pass also computes delta first and stores it for:
    * dK/dV pass, one program per (key block, batch x head) over the query blocks:
      dV = P^T dO, dK = scale * dS^T Q.
  d table[h, r] = sum over b and the (q, k) with k - q + T - 1 = r of dS * gate[b,h,q].

The d table buffer. The dQ pass uses square tiles (BLOCK x BLOCK). Tile (m, n) (query
block m, key block n) touches the diagonals r = (n - m) * BLOCK + d + T - nB * BLOCK,
d in [0, 2 BLOCK - 2], nB = ceil(T / BLOCK): tiles on one block diagonal n - m share
their 2 BLOCK - 1 diagonals, and neighbouring block diagonals overlap by BLOCK - 1. The
kernel writes tile (m, n) at [b, h, m, n - m + nB - 1, :] of a zeroed
(B, H, nB, 2 nB - 1, 2 BLOCK) buffer; torch sums over b and m, then overlap-adds the
windows of neighbouring block diagonals (`_diagonal_sums_to_table`). The buffer is
B H T^2 x 4 / BLOCK floats, 1/16 of the (B, H, T, T) bias for BLOCK = 64.

Key padding. Padding keys score -inf. A query row whose keys are all padding (an
utterance of zero frames) has no softmax: the kernel returns 0 for it, stores
lse = +inf so that P = exp(score - lse) = 0 in the backward, and gives it (and from
it) zero gradients; SDPA would give NaN there. Padded *query* rows of a non-empty
utterance attend to its valid keys like any other row (finite, equal to SDPA's).

Not supported: attention dropout (`check_no_dropout` raises for attention_dropout > 0).
Inputs: query/key/value (B, H, T, D) of one dtype, float32/bfloat16/float16, any
strides; D <= 128 (a power of two is the fast case, others are padded with masks);
gate and table any float dtype (read in fp32; their gradients come back in their
dtypes). All accumulation is fp32; float32 inputs use IEEE fp32 dot products (no
TF32), so the float32 result is SDPA's up to the order of the sums.

Under TRITON_INTERPRET=1 (set before this module is imported: `triton.jit` decides at
decoration time) the kernels run on CPU tensors, which the tests use.
"""

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from wavlm_ddp.preflight import ConfigError

DEFAULT_BLOCK = 64


def check_no_dropout(attention_dropout):
    """The kernel has no attention dropout: refuse attention_dropout > 0 (ConfigError,
    a ValueError, naming the key and the fix)."""
    if attention_dropout > 0:
        raise ConfigError(f"the Triton gated-bias attention has no attention dropout, but "
                          f"attention_dropout={attention_dropout}: set --attention_dropout=0 "
                          "or --attention=sdpa")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile(base, b, h, offs_t, offs_d, stride_b, stride_h, stride_t, stride_d):
    """Pointers to the rows offs_t and columns offs_d of head h of batch b of a
    (B, H, T, D) tensor of any strides."""
    return base + b * stride_b + h * stride_h + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d


@triton.jit
def _gate_rows(GATE, b, h, offs_m, m_ok, stride_gb, stride_gh, stride_gt):
    """The gates of the query rows offs_m (0 past T), in fp32."""
    return tl.load(GATE + b * stride_gb + h * stride_gh + offs_m * stride_gt, mask=m_ok, other=0.0).to(tl.float32)


@triton.jit
def _gated_scores(q, k, gate_q, table_row, stride_table_r, offs_m, offs_n, key_ok, T, scale,
                  DOT_PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) scores of a tile and its bias table[h, k - q + T - 1].

    Keys that are padding or past T score -inf; their bias is read as 0 (never used:
    their probability is 0, so is their dS)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    relative = offs_n[None, :] - offs_m[:, None] + T - 1  # in [0, 2T - 2] where both are < T
    in_range = (offs_m < T)[:, None] & key_ok[None, :]
    bias = tl.load(table_row + relative * stride_table_r, mask=in_range, other=0.0).to(tl.float32)
    s = s + gate_q[:, None] * bias
    s = tl.where(key_ok[None, :], s, float("-inf"))
    return s, bias


@triton.jit
def _keys_ok(KEEP, stride_keep_b, stride_keep_t, b, offs_n, T, HAS_KEEP: tl.constexpr):
    """Which keys of the block exist (< T) and are not padding."""
    ok = offs_n < T
    if HAS_KEEP:
        ok = ok & (tl.load(KEEP + b * stride_keep_b + offs_n * stride_keep_t, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _forward_kernel(
    Q, K, V, GATE, TABLE, KEEP, OUT, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_gb, stride_gh, stride_gt,
    stride_table_h, stride_table_r,
    stride_keep_b, stride_keep_t,
    H, T, D, scale,
    HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D  # head_dim padded up to a power of two >= 16 (tl.dot's minimum)

    q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qt, stride_qd),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    gate_q = _gate_rows(GATE, b, h, offs_m, m_ok, stride_gb, stride_gh, stride_gt)
    table_row = TABLE + h * stride_table_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _keys_ok(KEEP, stride_keep_b, stride_keep_t, b, offs_n, T, HAS_KEEP)
        kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kt, stride_kd),
                    mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vt, stride_vd),
                    mask=kv_mask, other=0.0)
        s, _ = _gated_scores(q, k, gate_q, table_row, stride_table_r, offs_m, offs_n, key_ok, T, scale,
                             DOT_PRECISION)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no valid key so far has m_new = -inf: subtract 0 instead, so that
        # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # rescales what was summed under the old max
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # No valid key at all (l = 0): output 0 and lse = +inf (P = 0 in the backward).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(_tile(OUT, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od),
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=m_ok)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, GATE, TABLE, KEEP, OUT, DOUT, LSE, DELTA, DQ, DGATE, DTABLE_PARTS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_gb, stride_gh, stride_gt,
    stride_table_h, stride_table_r,
    stride_keep_b, stride_keep_t,
    H, T, D, scale, NUM_BLOCKS,
    HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ, d gate, delta, and every tile's per-diagonal partial sums of d table."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    qd_mask = m_ok[:, None] & d_ok[None, :]

    q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qt, stride_qd),
                mask=qd_mask, other=0.0)
    do = tl.load(_tile(DOUT, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dot, stride_dod),
                 mask=qd_mask, other=0.0)
    o = tl.load(_tile(OUT, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od),
                mask=qd_mask, other=0.0)
    # delta = rowsum(dO * O) = sum_k P dP: the softmax backward's row term, stored for
    # the dK/dV pass (launched after this one on the same stream).
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=m_ok)
    # Rows past T read lse = +inf: their P is 0 and they add nothing.
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=float("inf"))
    gate_q = _gate_rows(GATE, b, h, offs_m, m_ok, stride_gb, stride_gh, stride_gt)
    table_row = TABLE + h * stride_table_h

    # The skew that turns the tile's diagonals into columns: diagonal d (d = k_local -
    # q_local + BLOCK - 1, in [0, 2 BLOCK - 2]) of row i is column d + i - (BLOCK - 1).
    rows = tl.arange(0, BLOCK)[:, None]
    diagonals = tl.arange(0, 2 * BLOCK)[None, :]
    columns = diagonals + rows - (BLOCK - 1)
    on_tile = (columns >= 0) & (columns < BLOCK)
    columns = tl.where(on_tile, columns, 0)  # any in-range index; masked below
    parts_row = DTABLE_PARTS + ((pid_bh * NUM_BLOCKS + pid_m) * (2 * NUM_BLOCKS - 1)) * (2 * BLOCK)

    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dgate = tl.zeros([BLOCK], tl.float32)
    for n in range(0, NUM_BLOCKS):
        offs_n = n * BLOCK + tl.arange(0, BLOCK)
        key_ok = _keys_ok(KEEP, stride_keep_b, stride_keep_t, b, offs_n, T, HAS_KEEP)
        kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
        k = tl.load(_tile(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kt, stride_kd),
                    mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vt, stride_vd),
                    mask=kv_mask, other=0.0)
        s, bias = _gated_scores(q, k, gate_q, table_row, stride_table_r, offs_m, offs_n, key_ok, T, scale,
                                DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # d score, fp32; 0 on padding keys and rows past T

        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dgate += tl.sum(ds * bias, 1)
        # d table: this tile's sum of dS * gate[q] along each of its diagonals.
        skewed = tl.gather(ds * gate_q[:, None], columns, 1)
        diagonal_sums = tl.sum(tl.where(on_tile, skewed, 0.0), 0)  # (2 BLOCK,), the last one 0
        slot = n - pid_m + NUM_BLOCKS - 1  # the tile's block diagonal
        tl.store(parts_row + slot * (2 * BLOCK) + tl.arange(0, 2 * BLOCK), diagonal_sums)

    tl.store(_tile(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqt, stride_dqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)
    tl.store(DGATE + pid_bh * T + offs_m, dgate, mask=m_ok)


@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, GATE, TABLE, KEEP, DOUT, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_gb, stride_gh, stride_gt,
    stride_table_h, stride_table_r,
    stride_keep_b, stride_keep_t,
    H, T, D, scale,
    HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one key block, over all query blocks (recomputing P from lse)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
    key_ok = _keys_ok(KEEP, stride_keep_b, stride_keep_t, b, offs_n, T, HAS_KEEP)
    k = tl.load(_tile(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kt, stride_kd),
                mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vt, stride_vd),
                mask=kv_mask, other=0.0)
    table_row = TABLE + h * stride_table_h

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qt, stride_qd),
                    mask=qd_mask, other=0.0)
        do = tl.load(_tile(DOUT, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_dot, stride_dod),
                     mask=qd_mask, other=0.0)
        gate_q = _gate_rows(GATE, b, h, offs_m, m_ok, stride_gb, stride_gh, stride_gt)
        lse = tl.load(LSE + pid_bh * T + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_ok, other=0.0)

        s, _ = _gated_scores(q, k, gate_q, table_row, stride_table_r, offs_m, offs_n, key_ok, T, scale,
                             DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    tl.store(_tile(DK, b, h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkt, stride_dkd),
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(DV, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvt, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------- host side


def _diagonal_sums_to_table(parts, batch, heads, time, block):
    """d table (H, 2T - 1) from the kernel's per-tile diagonal sums.

    parts[b, h, m, j, d] holds tile (m, n = j + m - nB + 1)'s sum along its diagonal d,
    which is table entry r = j * block + d + T - nB * block. Sum over b and m (the
    tiles of one block diagonal j share their diagonals), then overlap-add: diagonal
    d < block of window j and diagonal d + block of window j - 1 are the same entry."""
    num_blocks = triton.cdiv(time, block)
    windows = parts.view(batch, heads, num_blocks, 2 * num_blocks - 1, 2 * block).sum((0, 2))
    flat = windows.new_zeros(heads, 2 * num_blocks, block)
    flat[:, :-1] += windows[..., :block]
    flat[:, 1:] += windows[..., block:]
    start = num_blocks * block - time  # entry x of `flat` is table entry x - start
    return flat.view(heads, -1)[:, start:start + 2 * time - 1]


def _strides4(x):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


# The kernels enter autograd and torch.compile as two custom operators (forward,
# backward) with shape functions: a compiled layer calls them as opaque kernels and
# fuses everything around them; eager code calls them like any operator.
@torch.library.custom_op("wavlm_ddp::gated_bias_attention", mutates_args=())
def _forward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor,
                table: torch.Tensor, keep: Optional[torch.Tensor], scale: float,
                block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, T, D) over (B, T, H, D) memory, logsumexp (B x H, T) in fp32)."""
    batch, heads, time, head_dim = query.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    out, lse = _forward_outputs(query)
    keep_arg = keep.view(torch.uint8) if keep is not None else lse  # any pointer: unused without HAS_KEEP
    keep_strides = keep.stride() if keep is not None else (0, 0)
    grid = (triton.cdiv(time, block), batch * heads)
    _forward_kernel[grid](
        query, key, value, gate, table, keep_arg, out, lse,
        *_strides4(query), *_strides4(key), *_strides4(value), *_strides4(out),
        *gate.stride(), *table.stride(), *keep_strides,
        heads, time, head_dim, scale,
        HAS_KEEP=keep is not None, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, DOT_PRECISION=_precision(query),
    )
    return out, lse


def _forward_outputs(query):
    """(B, T, H, D) memory returned as a (B, H, T, D) view: merging the heads after it
    is a view, not a copy; and the logsumexp of every query."""
    batch, heads, time, head_dim = query.shape
    out = query.new_empty(batch, time, heads, head_dim).transpose(1, 2)
    return out, torch.empty(batch * heads, time, device=query.device, dtype=torch.float32)


@_forward_op.register_fake
def _(query, key, value, gate, table, keep, scale, block):
    return _forward_outputs(query)


@torch.library.custom_op("wavlm_ddp::gated_bias_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 gate: torch.Tensor, table: torch.Tensor, keep: Optional[torch.Tensor], out: torch.Tensor,
                 lse: torch.Tensor, scale: float, block: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    """d query, d key, d value (their layouts), d gate (B, H, T) and d table (H, 2T - 1)
    (contiguous, in the gate's and the table's dtypes)."""
    batch, heads, time, head_dim = query.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_blocks = triton.cdiv(time, block)
    keep_arg = keep.view(torch.uint8) if keep is not None else lse
    keep_strides = keep.stride() if keep is not None else (0, 0)
    common = dict(HAS_KEEP=keep is not None, BLOCK_D=block_d, DOT_PRECISION=_precision(query))

    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    dv = torch.empty_like(value)
    delta = torch.empty_like(lse)
    dgate = torch.empty(batch, heads, time, device=query.device, dtype=torch.float32)
    # Zeroed: each query block writes only the nB of its 2 nB - 1 block diagonals it has.
    parts = torch.zeros(batch * heads * num_blocks * (2 * num_blocks - 1) * 2 * block,
                        device=query.device, dtype=torch.float32)
    grid = (num_blocks, batch * heads)
    _backward_dq_kernel[grid](
        query, key, value, gate, table, keep_arg, out, grad_out, lse, delta, dq, dgate, parts,
        *_strides4(query), *_strides4(key), *_strides4(value), *_strides4(out), *_strides4(grad_out),
        *_strides4(dq), *gate.stride(), *table.stride(), *keep_strides,
        heads, time, head_dim, scale, num_blocks,
        BLOCK=block, **common,
    )
    _backward_dkdv_kernel[grid](
        query, key, value, gate, table, keep_arg, grad_out, lse, delta, dk, dv,
        *_strides4(query), *_strides4(key), *_strides4(value), *_strides4(grad_out),
        *_strides4(dk), *_strides4(dv), *gate.stride(), *table.stride(), *keep_strides,
        heads, time, head_dim, scale,
        BLOCK_M=block, BLOCK_N=block, **common,
    )
    dtable = _diagonal_sums_to_table(parts, batch, heads, time, block)
    return dq, dk, dv, dgate.to(gate.dtype), dtable.to(table.dtype).contiguous()


@_backward_op.register_fake
def _(grad_out, query, key, value, gate, table, keep, out, lse, scale, block):
    batch, heads, time, _ = query.shape
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            gate.new_empty(batch, heads, time), table.new_empty(heads, 2 * time - 1))


def _save_for_backward(ctx, inputs, output):
    query, key, value, gate, table, keep, scale, block = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, gate, table, keep, out, lse)
    ctx.scale, ctx.block = scale, block
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, gate, table, keep, out, lse = ctx.saved_tensors
    grads = _backward_op(grad_out, query, key, value, gate, table, keep, out, lse, ctx.scale, ctx.block)
    return (*grads, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_save_for_backward)


def _precision(query):
    return "ieee" if query.dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


def gated_bias_attention(query, key, value, gate, table, keep=None, *, scale=None, block=DEFAULT_BLOCK):
    """softmax(Q K^T * scale + gate[q] * table[h, k - q + T - 1], -inf on padding keys) V.

    query, key, value: (B, H, T, D), one dtype (float32, bfloat16, float16);
    gate: (B, H, T) or (B, H, T, 1); table: (H, 2T - 1); keep: (B, T) bool, True on
    real frames (None: no padding); scale: default 1/sqrt(D), as SDPA. Returns
    (B, H, T, D). `block` is the tile side (a power of two >= 16).
    """
    batch, heads, time, head_dim = query.shape
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query, key and value must have one shape, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError("query, key and value must have one dtype")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {query.dtype}")
    if head_dim > 128:
        raise ValueError(f"head_dim {head_dim} > 128 is not supported")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if gate.dim() == 4:
        gate = gate.squeeze(-1)
    if gate.shape != (batch, heads, time):
        raise ValueError(f"gate must be (B, H, T) = {(batch, heads, time)}, got {tuple(gate.shape)}")
    if table.shape != (heads, 2 * time - 1):
        raise ValueError(f"table must be (H, 2T - 1) = {(heads, 2 * time - 1)}, got {tuple(table.shape)}")
    if keep is not None:
        if keep.shape != (batch, time):
            raise ValueError(f"keep must be (B, T) = {(batch, time)}, got {tuple(keep.shape)}")
        keep = keep.to(torch.bool)  # a byte per frame, read as != 0
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    return _forward_op(query, key, value, gate, table, keep, float(scale), block)[0]


def reference_attention(query, key, value, gate, table, keep=None, scale=None):
    """The same attention in plain torch, with the (B, H, T, T) bias materialised (small
    shapes only: what the tests compare the kernel with). A row whose keys are all
    padding gives NaN here (softmax of -inf only), 0 in the kernel."""
    time = query.shape[-2]
    if gate.dim() == 4:
        gate = gate.squeeze(-1)
    positions = torch.arange(time, device=query.device)
    relative = positions[None, :] - positions[:, None] + time - 1  # [q, k] -> k - q + T - 1
    bias = gate[..., None] * table[:, relative]  # (B, H, T, 1) * (H, T, T)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    scores = (query @ key.transpose(-2, -1)).float() * scale + bias.float()
    if keep is not None:
        scores = scores.masked_fill(~keep.bool()[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1).to(value.dtype) @ value)


def triton_forward(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
    """Drop-in for `WavLMAttention.forward` (as `attention.flex_forward`, whose
    `position_bias` it takes: the (heads, 2T - 1) table shared by all layers)
    through `gated_bias_attention` (`attention: triton`, attention.patch_attention)."""
    from wavlm_ddp.encoder.attention import _merge_heads, _project, relative_position_values

    if self.training:
        check_no_dropout(self.dropout)
    time = hidden_states.shape[1]
    if position_bias is None:
        position_bias = relative_position_values(self, time)
    gate, query, key, value = _project(self, hidden_states)
    keep = None if attention_mask is None else attention_mask.bool()
    block = getattr(self, "triton_block", None) or DEFAULT_BLOCK  # patch_attention sets it (the YAML's key)
    attended = gated_bias_attention(query, key, value, gate.squeeze(-1), position_bias, keep, block=block)
    return _merge_heads(self, attended), None, position_bias
