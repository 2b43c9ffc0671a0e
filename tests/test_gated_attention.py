"""The Triton gated-bias attention (wavlm_ddp.encoder.gated_attention) on CPU, through
Triton's interpreter: forward and every gradient (query, key, value, gate, table)
equal to the attention with the (B, H, T, T) bias materialised, in float32.

Where the kernels run. `triton.jit` picks the interpreter when it decorates a
function, from TRITON_INTERPRET, and that includes Triton's own library functions
(`tl.sum`, `tl.max`, `tl.zeros` are `@jit` functions of triton.language.standard,
decorated when triton is imported). In a pytest process triton is already imported
before this module (conftest imports transformers, which imports torch._dynamo, which
imports triton), so the interpreter cannot take over here. The kernels therefore run
in a child process: this file run as a script, where the line below sets
TRITON_INTERPRET=1 before anything imports triton. The child writes the kernel's
outputs and gradients (and their inputs) to a file; the tests compare them in this
process with `reference_attention` and SDPA through autograd.

Shapes reach every branch of the kernels at interpreter speed: T = 37 with 16-frame
tiles (3 query blocks x 3 key blocks, the last ones partial, so the d table sums
cross tile and block-diagonal boundaries), 2-3 heads, two utterances of different
lengths (key padding), gate all ones and random, head_dim 16, 32 and 24 (masked up
to 32), and the recipe's non-contiguous layouts (heads split from (B, T, H x D), the
table a transposed view).

Tolerances: float32 with IEEE dot products; the kernel sums in another order than
the reference (online softmax, tiled dots), a few ulps of the largest terms:
rtol = atol = 1e-5 (the differences observed are about 1e-6).
"""

import os
import sys

# Before triton is imported: in the child process (this file run as a script) it makes
# every `triton.jit` an interpreted function. This process only launches the child
# (which inherits it) and puts its own environment back below.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = __name__ == "__main__"
if CHILD:
    sys.path.insert(0, str(ROOT))
elif _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET")
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

pytest.importorskip("triton", reason="Triton comes with torch's Linux wheels; without it there is no kernel to test")
from wavlm_ddp.encoder import gated_attention  # noqa: E402

RTOL = ATOL = 1e-5
BLOCK = 16  # the smallest tile tl.dot takes: several tiles for T = 37

CASES = {
    # name: (batch, heads, time, head_dim, gate, utterance lengths or None, block)
    "padded_random_gate": (2, 3, 37, 16, "random", (37, 23), BLOCK),
    "padded_gate_ones": (2, 2, 37, 32, "ones", (29, 37), BLOCK),
    "no_padding_one_partial_tile": (1, 2, 21, 16, "random", None, 32),
    "head_dim_24_padded_to_32": (2, 2, 19, 24, "random", (19, 7), BLOCK),
    # An utterance of no frame (every key padding) next to a real one.
    "empty_utterance": (2, 2, 21, 16, "random", (21, 0), BLOCK),
}
# float16 query, key and value (the 16-bit path: casts before the dots, fp16 output and
# gradients); bfloat16 cannot run here: the interpreter's tl.dot multiplies bfloat16's
# bit patterns (triton-lang/triton#11584, not supported by the interpreter).
FLOAT16_CASE = (2, 2, 21, 16, "random", (21, 13), BLOCK)
FLOAT16_TOLERANCE = 1e-2  # fp16 operands of the dots against a float32 reference: ~3e-3 seen
GRADIENTS = ("query", "key", "value", "gate", "table")


def _leaves(batch, heads, time, head_dim, gate_kind, seed):
    """The inputs as stored: q, k, v (B, T, H x D), gate (B, H, T), table (2T - 1, H)."""
    generator = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(batch, time, heads * head_dim, generator=generator) for _ in range(3)]
    if gate_kind == "ones":
        gate = torch.ones(batch, heads, time)
    else:  # WavLM's gate lies in (1, 3) at init; a wider range exercises the product more
        gate = 0.5 + 2 * torch.rand(batch, heads, time, generator=generator)
    return (*qkv, gate, torch.randn(2 * time - 1, heads, generator=generator))


def _attention_inputs(leaves, heads):
    """What the attention takes, in the recipe's layouts: (B, H, T, D) views of the
    (B, T, H x D) projections (as attention._project) and the (H, 2T - 1) table as the
    transpose of a (2T - 1, H) tensor (as relative_position_values)."""
    query, key, value, gate, table = leaves
    batch, time, width = query.shape

    def split_heads(x):
        return x.view(batch, time, heads, width // heads).transpose(1, 2)

    return split_heads(query), split_heads(key), split_heads(value), gate, table.t()


def _keep(time, lengths):
    return None if lengths is None else torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]


DROP_IN = dict(batch=2, heads=2, head_dim=16, time=21, lengths=(21, 12))


def _wavlm_attention_stand_in(heads, head_dim):
    """The attributes of HF's WavLMAttention that attention._project and _merge_heads
    read, randomly initialised (no transformers import)."""
    embed = heads * head_dim
    module = torch.nn.Module()
    module.num_heads, module.head_dim, module.embed_dim, module.dropout = heads, head_dim, embed, 0.0
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(module, name, torch.nn.Linear(embed, embed))
    module.gru_rel_pos_linear = torch.nn.Linear(head_dim, 8)
    module.gru_rel_pos_const = torch.nn.Parameter(torch.rand(1, heads, 1, 1) + 0.5)
    return module


def _drop_in_inputs(module_state=None):
    batch, heads, head_dim, time, lengths = DROP_IN.values()
    with torch.random.fork_rng(devices=[]):  # the same draws in both processes; the global state kept
        torch.manual_seed(7)
        module = _wavlm_attention_stand_in(heads, head_dim)
        hidden = torch.randn(batch, time, heads * head_dim, requires_grad=True)
        table = torch.randn(heads, 2 * time - 1, requires_grad=True)
    if module_state is not None:
        module.load_state_dict(module_state)
    return module, hidden, table, _keep(time, lengths).long()


def _drop_in_gradients(module, out, hidden, table):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    inputs = [hidden, table, module.gru_rel_pos_linear.weight, module.q_proj.weight]
    return torch.autograd.grad((out * weights).sum(), inputs)


def _child_main(path):
    """The child: the kernels through Triton's interpreter, outputs and gradients to `path`."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1.0, mask=offsets < n)

    x = torch.arange(10, dtype=torch.float32)
    add_one[(triton.cdiv(10, 4),)](x, 10, BLOCK=4)
    results = {"toy_kernel": x,
               "interpreted": torch.tensor(isinstance(gated_attention._forward_kernel, InterpretedFunction))}

    for seed, (name, (batch, heads, time, head_dim, gate_kind, lengths, block)) in enumerate(CASES.items()):
        leaves = [x.requires_grad_() for x in _leaves(batch, heads, time, head_dim, gate_kind, seed)]
        out = gated_attention.gated_bias_attention(*_attention_inputs(leaves, heads), _keep(time, lengths),
                                                   block=block)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
        grads = torch.autograd.grad((out * weights).sum(), leaves)
        results[name] = dict(leaves=[x.detach() for x in leaves], weights=weights, out=out.detach(),
                             grads=list(grads))

    batch, heads, time, head_dim, gate_kind, lengths, block = FLOAT16_CASE
    leaves = _leaves(batch, heads, time, head_dim, gate_kind, seed=99)
    leaves = [x.half().requires_grad_() for x in leaves[:3]] + [x.requires_grad_() for x in leaves[3:]]
    out = gated_attention.gated_bias_attention(*_attention_inputs(leaves, heads), _keep(time, lengths), block=block)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    results["float16"] = dict(leaves=[x.detach() for x in leaves], weights=weights, out=out.detach(),
                              grads=list(grads))

    module, hidden, table, attention_mask = _drop_in_inputs()
    out, _, _ = gated_attention.triton_forward(module, hidden, attention_mask, position_bias=table)
    results["drop_in"] = dict(state=module.state_dict(), out=out.detach(),
                              grads=list(_drop_in_gradients(module, out, hidden, table)))

    # The same inside torch.compile, one graph (fullgraph): the kernels as opaque custom
    # operators traced by their shape functions, the projections, gate and head merge
    # around them (aot_eager: AOTAutograd's tracing of forward and backward, as inductor
    # does, without its code generation, which costs a CPU run about 20 s more).
    module, hidden, table, attention_mask = _drop_in_inputs()

    def attend(hidden, attention_mask, table):
        return gated_attention.triton_forward(module, hidden, attention_mask, position_bias=table)[0]

    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(hidden, attention_mask, table)
    results["drop_in_compiled"] = dict(out=out.detach(), grads=list(_drop_in_gradients(module, out, hidden, table)))
    torch.save(results, path)


if CHILD:
    _child_main(sys.argv[1])
    sys.exit(0)


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory):
    """The child's results (one child for the whole module: a Python start and the
    interpreter's runs of every case)."""
    path = tmp_path_factory.mktemp("gated_attention") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, __file__, str(path)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"the interpreted kernels failed (status {child.returncode}):\n{child.stderr[-5000:]}")
    return torch.load(path, weights_only=True)


def _reference(name, result, batch_slice=slice(None)):
    """reference_attention's and SDPA's output, and the reference's gradients, for the
    child's inputs of case `name` (only the utterances `batch_slice`)."""
    batch, heads, time, head_dim, gate_kind, lengths, block = CASES[name]
    leaves = [x.clone().requires_grad_() for x in result["leaves"]]
    query, key, value, gate, table = _attention_inputs(leaves, heads)
    query, key, value, gate = (x[batch_slice] for x in (query, key, value, gate))
    keep = _keep(time, lengths)
    keep = None if keep is None else keep[batch_slice]
    reference = gated_attention.reference_attention(query, key, value, gate, table, keep)
    grads = torch.autograd.grad((reference * result["weights"][batch_slice]).sum(), leaves)

    positions = torch.arange(time)
    bias = gate[..., None] * table[:, positions[None, :] - positions[:, None] + time - 1]
    if keep is not None:
        bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    sdpa = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return reference.detach(), sdpa.detach(), grads


@pytest.fixture(scope="module")
def references(kernel_results):
    return {name: _reference(name, kernel_results[name]) for name in CASES if name != "empty_utterance"}


def test_interpreter_ran_the_kernels_on_cpu(kernel_results):
    assert kernel_results["interpreted"].item()
    assert torch.equal(kernel_results["toy_kernel"], torch.arange(1, 11, dtype=torch.float32))


@pytest.mark.parametrize("name", [name for name in CASES if name != "empty_utterance"])
def test_forward_equals_reference_and_sdpa(kernel_results, references, name):
    out = kernel_results[name]["out"]
    reference, sdpa, _ = references[name]
    torch.testing.assert_close(out, reference, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out, sdpa, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index, gradient", list(enumerate(GRADIENTS)))
@pytest.mark.parametrize("name", [name for name in CASES if name != "empty_utterance"])
def test_gradient_equals_reference(kernel_results, references, name, index, gradient):
    grad = kernel_results[name]["grads"][index]
    expected = references[name][2][index]
    assert torch.isfinite(grad).all()
    assert expected.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"d {gradient}: {m}")


def test_utterance_without_frames_gives_zeros_not_nan(kernel_results):
    """Every key of utterance 1 is padding (no softmax): its output rows are 0 and its
    gradients 0 (SDPA gives NaN rows, and NaN into the shared table's gradient);
    utterance 0's output and gradients are those it has alone."""
    result = kernel_results["empty_utterance"]
    batch, heads, time, head_dim = CASES["empty_utterance"][:4]
    out, grads = result["out"], result["grads"]
    assert all(torch.isfinite(x).all() for x in [out, *grads])
    assert (out[1] == 0).all()
    for grad in grads[:4]:  # q, k, v: (B, T, H x D); gate: (B, H, T)
        assert (grad[1] == 0).all()

    reference, _, expected = _reference("empty_utterance", result, slice(0, 1))
    torch.testing.assert_close(out[:1], reference, rtol=RTOL, atol=ATOL)
    for grad, want in zip(grads[:4], expected[:4]):
        torch.testing.assert_close(grad[:1], want[:1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads[4], expected[4], rtol=RTOL, atol=ATOL)  # the table: all utterances'


def test_float16(kernel_results):
    """The 16-bit path against the float32 reference of the same (fp16) inputs."""
    result = kernel_results["float16"]
    batch, heads, time, head_dim, gate_kind, lengths, block = FLOAT16_CASE
    assert result["out"].dtype == torch.float16
    assert [g.dtype for g in result["grads"]] == [torch.float16] * 3 + [torch.float32] * 2
    leaves = [x.float().requires_grad_() for x in result["leaves"]]
    reference = gated_attention.reference_attention(*_attention_inputs(leaves, heads), _keep(time, lengths))
    expected = torch.autograd.grad((reference * result["weights"]).sum(), leaves)
    torch.testing.assert_close(result["out"].float(), reference, rtol=FLOAT16_TOLERANCE, atol=FLOAT16_TOLERANCE)
    for grad, want, gradient in zip(result["grads"], expected, GRADIENTS):
        torch.testing.assert_close(grad.float(), want, rtol=FLOAT16_TOLERANCE, atol=FLOAT16_TOLERANCE,
                                   msg=lambda m: f"d {gradient}: {m}")


def test_drop_in_forward_equals_sdpa_forward(kernel_results):
    """triton_forward (the WavLMAttention.forward replacement) against
    attention.sdpa_forward on the same weights, padding mask and bias table: output and
    the gradients into the hidden states, the table, the gate's and the q projection."""
    from wavlm_ddp.encoder.attention import sdpa_forward

    result = kernel_results["drop_in"]
    module, hidden, table, attention_mask = _drop_in_inputs(result["state"])
    time = hidden.shape[1]
    positions = torch.arange(time)
    bias = table[:, positions[None, :] - positions[:, None] + time - 1]  # as relative_position_bias
    out, _, _ = sdpa_forward(module, hidden, attention_mask, position_bias=bias)
    torch.testing.assert_close(result["out"], out.detach(), rtol=RTOL, atol=ATOL)
    for grad, want in zip(result["grads"], _drop_in_gradients(module, out, hidden, table)):
        torch.testing.assert_close(grad, want, rtol=RTOL, atol=ATOL)


def test_the_compiled_drop_in_equals_the_eager_one(kernel_results):
    """Inside torch.compile (fullgraph: no graph break around the kernels) the attention
    gives the eager kernel's output and gradients."""
    compiled, eager = kernel_results["drop_in_compiled"], kernel_results["drop_in"]
    torch.testing.assert_close(compiled["out"], eager["out"], rtol=RTOL, atol=ATOL)
    for grad, want in zip(compiled["grads"], eager["grads"]):
        torch.testing.assert_close(grad, want, rtol=RTOL, atol=ATOL)


def test_drop_in_refuses_attention_dropout_in_training():
    module, hidden, table, attention_mask = _drop_in_inputs()
    module.dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        gated_attention.triton_forward(module, hidden, attention_mask, position_bias=table)


def test_attention_dropout_is_refused():
    gated_attention.check_no_dropout(0.0)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        gated_attention.check_no_dropout(0.1)


def test_bad_shapes_are_refused():
    query, key, value, gate, table = _attention_inputs(_leaves(1, 2, 5, 16, "ones", seed=0), heads=2)
    with pytest.raises(ValueError, match="table must be"):
        gated_attention.gated_bias_attention(query, key, value, gate, table[:, :-1])
    with pytest.raises(ValueError, match="block must be"):
        gated_attention.gated_bias_attention(query, key, value, gate, table, block=8)
