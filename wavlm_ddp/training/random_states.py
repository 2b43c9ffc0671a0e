"""The random states of every rank, saved in each checkpoint and restored on resume, so
that a resumed run draws the same dropout and SpecAugment masks as the uninterrupted one.

A training step draws from torch's CPU generator (dropout, SDPA's attention dropout),
the CUDA generator of the rank's device (the same on a GPU) and numpy's global RNG (HF's
SpecAugment draws its masks with numpy: `_compute_mask_indices`); Python's `random` is
kept too, for code that draws from it. Each rank has streams of its own, so each rank's
states are saved. Everything else random in training is a function of saved numbers:
LayerDrop's draw of (seed, optimizer step, rank) (encoder/layerdrop.py), the batches of
(seed, epoch) (schedule.py).

The states are taken at the optimizer-step boundary the checkpoint describes and put back
right after the checkpoint is loaded: nothing between two training steps may draw from
these generators, which is why the recipe's DataLoaders have a generator of their own
(brain.RecipeBrain.make_dataloader; torch draws a seed from the global generator each
time a loader's iteration starts).

Only the main process writes checkpoints, so `capture` gathers every rank's states to it
and `restore` broadcasts them back. Both are collectives that every rank calls at the same
point: right before a save and right after the recovery, outside the save and load hooks
(a rank whose earlier write failed skips the save hooks that follow: SafeCheckpointer._guarded).
"""

import logging
import random

import numpy as np
import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks
from speechbrain.utils.distributed import ddp_broadcast, if_main_process, main_process_only

logger = logging.getLogger(__name__)


def local_states():
    """This process's generator states, as tensors and numbers (torch.load's weights_only
    reads them back)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_local_states(states):
    """Put `states` (from local_states) into this process's generators. A CUDA state is
    set when this process uses CUDA and the saved one did."""
    torch.set_rng_state(states["torch"])
    saved = states["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                         saved["gauss"]))
    saved = states["python"]
    random.setstate((saved["version"], tuple(saved["internal"].tolist()), saved["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


@register_checkpoint_hooks
class RandomStates:
    """The checkpoint's `random_states.ckpt`: {"world_size": N, "ranks": [rank 0's
    states, ..., rank N-1's]}, written by the main process."""

    def __init__(self):
        self.gathered = None  # every rank's states (main process), from the last capture
        self.recovered = None  # the file of the checkpoint last loaded, until restore()

    def capture(self):
        """Gather every rank's states to the main process for the next save. Every rank
        must call it, at the step boundary that the checkpoint describes."""
        states = local_states()
        if not torch.distributed.is_initialized():
            self.gathered = [states]
            return
        gathered = [None] * world_size() if if_main_process() else None
        torch.distributed.gather_object(states, gathered, dst=0)
        self.gathered = gathered

    @mark_as_saver
    @main_process_only
    def _save(self, path):
        # A save without a capture before it would hold some older step's states: none then.
        gathered, self.gathered = self.gathered, None
        torch.save({"world_size": len(gathered) if gathered else None, "ranks": gathered or []}, path)

    @mark_as_loader
    def _recover(self, path, end_of_epoch):
        del end_of_epoch  # states are taken at a step boundary either way
        self.recovered = path

    def restore(self):
        """Set each rank's generators to its states in the checkpoint just recovered.
        Every rank must call it, after the recovery; what the main process read decides
        for all. On another world size nothing is restored: a rank of this run computes
        other batches than any rank of the saved one, so no saved stream is its own."""
        ranks, note = None, None
        if if_main_process() and self.recovered is not None:
            ranks, note = self._read(self.recovered)
        self.recovered = None
        ranks, note = ddp_broadcast((ranks, note))
        if note and if_main_process():
            logger.warning(note)
        if ranks:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            set_local_states(ranks[rank])
            if if_main_process():
                logger.info(f"random states of the {len(ranks)} rank(s) restored from the checkpoint")

    @staticmethod
    def _read(path):
        """(every rank's states, None), or (None, why they are not restored)."""
        afresh = "dropout and SpecAugment masks are drawn afresh from here, as no uninterrupted run would draw them"
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file: train on, and say so
            return None, f"could not read the random states in {path} ({error}): {afresh}"
        if saved["world_size"] is None:
            return None, f"{path} holds no random states: {afresh}"
        if saved["world_size"] != world_size():
            return None, (f"the checkpoint's random states are of {saved['world_size']} rank(s) and this run has "
                          f"{world_size()}: {afresh} (LayerDrop and the batches continue exactly)")
        return saved["ranks"], None
