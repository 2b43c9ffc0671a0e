"""WavLM's attention, patched in one place: the same maths as HF's `WavLMAttention`
(gated relative position bias, scale, key padding) without HF's hard-coded
`need_weights=True`, which keeps the (batch x heads, T, T) probabilities in fp32
for backward.

Two kernels compute it (`attention` key of the encoder):
- ``sdpa``: `scaled_dot_product_attention` with the gated bias as a float mask
  (the memory-efficient kernel, the only SDPA kernel that takes a bias with a
  gradient). The bias is a (batch, heads, T, T) tensor in every layer.
- ``flex``: FlexAttention with a score modifier that adds the gated bias inside the
  kernel, from the (heads, 2T - 1) table of relative positions and the
  (batch, heads, T) gate: no T^2 tensor is written, and the gradients into the
  table and the gate are accumulated by the kernel. FlexAttention has no
  attention dropout, so ``flex`` needs ``attention_dropout: 0``.
- ``triton``: a Triton flash-attention kernel that reads the gated bias from the same
  table and gate inside its tiles, forward and backward, and reduces the gradients of
  the table per diagonal without atomics (gated_attention.py). No attention dropout
  either; a CUDA GPU (or Triton's interpreter, TRITON_INTERPRET=1, on CPU tensors).

Both project queries, keys and values with one matrix product (the three weights
concatenated; the parameters stay HF's, so checkpoints and exports are unchanged).
Every layer of the model must run the same kind: the first layer's table is
passed on to the others as `position_bias`.
"""

import functools
import types

import torch
import torch.nn.functional as F

KINDS = ("sdpa", "flex", "triton", "eager")  # eager: HF's own code, unpatched
TABLE_KINDS = ("flex", "triton")  # those that take the (heads, 2T - 1) table, not the (heads, T, T) bias


def relative_position_values(attention, time):
    """The bias of every relative position k - q in [1 - T, T - 1], as (heads, 2T - 1):
    HF's bucket table looked up once per relative position, not once per (q, k) pair."""
    device = attention.rel_attn_embed.weight.device
    relative = torch.arange(1 - time, time, device=device)
    return attention.rel_attn_embed(attention._relative_positions_bucket(relative)).t()


def relative_position_bias(attention, time):
    """WavLM's relative position bias for `time` frames, as one (heads, T, T) tensor.

    Equal to HF's `compute_bias(time, time)`, built another way: the bias of (query q,
    key k) depends on k - q only, so the (T, T) matrix is a strided view of the
    2T - 1 relative positions (a Toeplitz matrix). HF looks the table up for all
    T^2 pairs, and the backward of that lookup adds T^2 x heads gradients into
    320 x heads entries: on a GPU that scatter alone costs tens of milliseconds per
    step. Here the backward sums each diagonal and scatters only 2T - 1 rows.
    """
    windows = relative_position_values(attention, time).contiguous().unfold(1, time, 1)
    # windows[h, i, j] = values[h, i + j]; query q is the window that starts at T-1-q.
    return windows.flip(1)  # flip copies into a contiguous (heads, T, T)


def position_table(attention, time, kind):
    """What the first layer passes on as `position_bias` for this kind of attention."""
    if kind in TABLE_KINDS:
        return relative_position_values(attention, time)
    return relative_position_bias(attention, time)


def _project(self, hidden_states):
    """The gate of the relative position bias (batch, heads, T, 1) and the query, key
    and value (batch, heads, T, head_dim), with one matrix product for q, k and v."""
    batch, time, _ = hidden_states.shape
    heads, head_dim = self.num_heads, self.head_dim

    def split_heads(x):
        return x.view(batch, time, heads, head_dim).transpose(1, 2)

    projected = self.gru_rel_pos_linear(split_heads(hidden_states)).view(batch, heads, time, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(projected).chunk(2, dim=-1)
    gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0

    weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
    bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
    query, key, value = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
    return gate, split_heads(query), split_heads(key), split_heads(value)


def _merge_heads(self, attended):
    batch, _, time, _ = attended.shape
    return self.out_proj(attended.transpose(1, 2).reshape(batch, time, self.embed_dim))


def sdpa_forward(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
    """Drop-in for `WavLMAttention.forward` through `scaled_dot_product_attention`;
    `position_bias` is the (heads, T, T) bias shared by all layers."""
    if position_bias is None:  # called alone: only the first layer has the table
        position_bias = relative_position_bias(self, hidden_states.shape[1])
    gate, query, key, value = _project(self, hidden_states)
    bias = (gate * position_bias).to(query.dtype)
    if attention_mask is not None:
        bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
    )
    return _merge_heads(self, attended), None, position_bias


def flex_forward(self, hidden_states, attention_mask=None, position_bias=None, **kwargs):
    """Drop-in for `WavLMAttention.forward` through FlexAttention; `position_bias` is
    the (heads, 2T - 1) table of relative positions shared by all layers."""
    from torch.nn.attention.flex_attention import flex_attention

    time = hidden_states.shape[1]
    if position_bias is None:
        position_bias = relative_position_values(self, time)
    gate, query, key, value = _project(self, hidden_states)
    gate = gate.squeeze(-1)
    table = position_bias
    keep = None if attention_mask is None else attention_mask.bool()

    def add_gated_bias(score, b, h, q, k):
        score = score + gate[b, h, q] * table[h, k - q + time - 1]
        if keep is not None:
            score = torch.where(keep[b, k], score, float("-inf"))
        return score

    attend = flex_attention
    if query.is_cuda and not torch.compiler.is_compiling():
        attend = _compiled_flex_attention()  # eager layers: flex is fused only when compiled
    attended = attend(query, key, value, score_mod=add_gated_bias,
                      kernel_options=getattr(self, "flex_kernel_options", None))
    return _merge_heads(self, attended), None, position_bias


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def patch_attention(layers, kind, kernel_options=None, triton_block=None):
    """Replace HF's attention forward in every layer by the `kind` path (with
    FlexAttention's kernel options, or the Triton kernel's tile side)."""
    if kind == "triton":  # imported only when asked for: it needs triton, which comes with CUDA wheels of torch
        from wavlm_ddp.encoder.gated_attention import triton_forward as forward
    else:
        forward = {"sdpa": sdpa_forward, "flex": flex_forward}.get(kind)
    if forward is None:
        return
    for layer in layers:
        layer.attention.forward = types.MethodType(forward, layer.attention)
        layer.attention.flex_kernel_options = kernel_options
        layer.attention.triton_block = triton_block
