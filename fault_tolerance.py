"""What keeps a long run alive and its work safe: checkpoints that are never
taken for valid when half-written, and a guard that skips non-finite steps on
every rank at once."""

import datetime
import logging
import os
import shutil
from pathlib import Path

import torch
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from preflight import ConfigError

logger = logging.getLogger(__name__)
PENDING_META = f"{METAFNAME}.pending"


class SafeCheckpointer(Checkpointer):
    """SpeechBrain's Checkpointer with an atomic commit.

    SpeechBrain writes `CKPT.yaml`, the file that makes a folder a checkpoint,
    *before* the parameter files, so a save interrupted half-way leaves a folder
    that the next run loads as valid. Here the meta file is written under another
    name and renamed to `CKPT.yaml` only once every file is on disk; folders left
    without it by an interrupted save are ignored, then removed at the next start.
    """

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):
        pending = Path(fpath).with_name(PENDING_META)
        return super()._save_checkpoint_metafile(pending, meta_to_include, end_of_epoch)

    def save_checkpoint(self, *args, **kwargs):
        checkpoint = super().save_checkpoint(*args, **kwargs)
        ddp_barrier()  # every rank has written its files
        if if_main_process():
            (checkpoint.path / PENDING_META).rename(checkpoint.path / METAFNAME)
        ddp_barrier()
        return checkpoint

    def remove_interrupted_saves(self):
        """Delete checkpoint folders that an interrupted save left without CKPT.yaml."""
        removed = []
        if if_main_process() and self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*"):
                if path.is_dir() and not (path / METAFNAME).exists():
                    shutil.rmtree(path)
                    removed.append(path)
                    logger.warning(f"Removed {path}: its save was interrupted (no {METAFNAME})")
        ddp_barrier()
        return removed


def collective_device():
    """Where a small tensor must live for a collective: CUDA for nccl, else CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return "cuda"
    return "cpu"


class NonFiniteGuard:
    """Decide, the same way on every rank, whether a step's loss is usable.

    A rank that skipped backward while another ran it would hang DDP, so the
    finiteness of the loss is all-reduced first: if any rank's loss is NaN or
    inf, every rank skips the step. After `patience` consecutive skipped steps,
    training stops with an error naming the keys to change.
    """

    def __init__(self, patience):
        self.patience = patience
        self.skipped_total = 0
        self.consecutive = 0

    def step_is_finite(self, loss):
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=collective_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        if bad.item() == 0:
            self.consecutive = 0
            return True
        self.skipped_total += 1
        self.consecutive += 1
        logger.warning(f"Non-finite loss: step skipped ({self.skipped_total} so far)")
        if self.consecutive > self.patience:
            raise ConfigError(
                f"loss was NaN/inf for {self.consecutive} steps in a row (nonfinite_patience="
                f"{self.patience}): lower the learning rate (lr), use --precision=bf16 instead "
                "of fp16, or lower max_grad_norm"
            )
        return False


def init_distributed(backend, timeout_s):
    """Join the torchrun process group; returns False when not launched by torchrun.

    torchrun reuses its store across restarts (--max-restarts), and a new worker
    could read the address that a dead worker of the previous attempt left there,
    then wait forever to connect to it. The keys are therefore prefixed with the
    restart count, so every attempt meets only its own workers.
    """
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return False
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(torch.distributed.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch.distributed.PrefixStore(f"attempt_{attempt}/", store)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return True
