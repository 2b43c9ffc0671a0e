"""LayerDrop that is correct under DDP: which encoder layers a training step skips.

HF draws the layers to skip from each process's global RNG, so DDP ranks skip
different layers. Here the draw is a pure function of (seed, optimizer step, rank):
in the synced mode every rank passes rank 0 and drops the same layers, so training
equals single-process training on the global batch; `LayerDrop.check_in_sync`
proves it across ranks at run time.
"""

import numpy as np
import torch

from wavlm_ddp.distributed import collective_device


def layerdrop_schedule(step, num_layers, layerdrop, seed, rank=0):
    """The layers to drop at optimizer step `step`, as a list of bools.

    A pure function of (seed, step, rank): no global RNG, no data. Layer 0 owns
    WavLM's relative position bias and is never dropped (as in HF).
    """
    if layerdrop <= 0.0:
        return [False] * num_layers
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    draws = torch.rand(num_layers, generator=torch.Generator().manual_seed(int(state)))
    drop = (draws < layerdrop).tolist()
    drop[0] = False
    return drop


class LayerDrop:
    """The draw of each step, how often each layer was dropped, and the cross-rank check.

    `probability` is read at every draw from `config` (the live HF config, where the
    YAML's layerdrop was written), so there is one source of truth for it.
    """

    def __init__(self, config, num_layers, mode, seed):
        self.config, self.num_layers, self.mode, self.seed = config, num_layers, mode, seed
        self.last = [False] * num_layers  # the pattern of the last draw
        self.reset_counts()

    @property
    def probability(self):
        return self.config.layerdrop

    def reset_counts(self):
        """Start counting anew (each epoch): per layer, the steps it was dropped."""
        self.counts = [0] * self.num_layers
        self._counted_step = None

    def draw(self, step):
        """The drop pattern for optimizer step `step`; counted once per step however
        many micro-batches gradient accumulation runs in it."""
        rank = 0
        if self.mode == "independent" and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        drop = layerdrop_schedule(step, self.num_layers, self.probability, self.seed, rank)
        if step != self._counted_step:
            self._counted_step = step
            self.counts = [c + d for c, d in zip(self.counts, drop)]
        self.last = drop
        return drop

    def check_in_sync(self):
        """In synced mode every rank must have dropped the same layers: compare the
        last pattern across ranks with two all-reduces of one integer."""
        if self.mode != "synced" or not torch.distributed.is_initialized():
            return
        code = sum(1 << i for i, d in enumerate(self.last) if d)
        low = torch.tensor([code], dtype=torch.int64, device=collective_device())
        high = low.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if low.item() != high.item():
            raise RuntimeError(
                f"ranks dropped different layers (rank {torch.distributed.get_rank()}: {self.last}): "
                "layerdrop_mode=synced is broken; report it, or set --layerdrop_mode=independent"
            )
