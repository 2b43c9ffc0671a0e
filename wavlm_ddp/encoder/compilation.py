"""torch.compile for the encoder: each encoder layer on its own (skipping a layer
never changes a graph, and the layers share their code, hence their graphs: one per
padded length), and the frozen CNN (dynamic in the number of samples)."""

import math

import torch

# Compiled layers keep one graph per padded length; the recompile limit allows
# lengths up to this many seconds (the CNN gives 50 frames per second) in each of
# the modes a layer runs in, each its own graphs (torch.compile guards on them):
# training, training without gradients (the frozen-encoder phase) and evaluation.
MAX_COMPILED_SECONDS = 60
FRAMES_PER_SECOND = 50
MODES = 3


def compile_layers(layers, backend, pad_frames_to, cuda_graphs=False):
    """The layers, each wrapped in torch.compile; raises the process-wide recompile
    limit to the number of padded lengths up to MAX_COMPILED_SECONDS in each mode. With
    `cuda_graphs`, inductor's mode 'reduce-overhead': each step replays the kernels
    recorded for its shapes instead of launching them one by one from Python
    (loading.check_cuda_graphs says when that is refused)."""
    limit = MODES * (math.ceil(MAX_COMPILED_SECONDS * FRAMES_PER_SECOND / max(pad_frames_to, 64)) + 2)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    mode = {"mode": "reduce-overhead"} if cuda_graphs else {}
    return [torch.compile(layer, backend=backend, **mode) for layer in layers]


def begin_graphed_step():
    """Tell the CUDA graph trees that a new forward begins, so that the memory of the last
    one's outputs (consumed by then) is reused. The trees infer it when no backward is
    pending; this says it at every forward, as torch's documentation advises, whatever
    ran before (an evaluation after training, a forward whose backward an error cut off)."""
    torch.compiler.cudagraph_mark_step_begin()


def compile_cnn(feature_extractor, backend):
    """A compiled function of the CNN, not a module: a registered copy would add its
    parameters to the state dict a second time (checkpoints would change)."""
    return torch.compile(feature_extractor.forward, backend=backend, dynamic=True)


def mark_shapes(hidden, frame_mask, position_bias, static_length):
    """Tell torch.compile which sizes vary: the batch does (one graph for every
    batch size); a padded length does not (one graph per length, with static
    index arithmetic; a symbolic length made the fused bias kernels several times
    slower on an H200). Unpadded lengths (pad_frames_to 1) are left to PyTorch's
    automatic dynamic shapes: one graph per length would recompile every batch.
    Sizes of 1 are specialised by PyTorch anyway."""
    for tensor in (hidden, frame_mask):
        if tensor is not None:
            if tensor.shape[0] > 1:
                torch._dynamo.mark_dynamic(tensor, 0)
            if static_length:
                torch._dynamo.mark_static(tensor, 1)
    if position_bias is not None:
        if static_length:
            torch._dynamo.mark_static(position_bias)
        else:
            torch._dynamo.mark_static(position_bias, 0)  # the head count
