"""What keeps a long run alive when a step or a peer goes wrong: a guard that
skips non-finite steps on every rank at once, and a watchdog that turns a hang
into a restart."""

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import zlib

import torch

from wavlm_ddp.distributed import collective_device, rank
from wavlm_ddp.preflight import ConfigError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Decide, the same way on every rank, whether a step's loss is usable.

    A rank that skipped backward while another ran it would hang DDP, so the
    finiteness of the loss is all-reduced first: if any rank's loss is NaN or
    inf, every rank skips the step. After `patience` consecutive skipped steps,
    training stops with an error naming the keys to change.
    """

    def __init__(self, patience):
        self.patience = patience
        self.fingerprint = 0  # of the last agree's micro-batch, every rank's IDs
        self.skipped_total = 0
        self.consecutive = 0

    def step_is_finite(self, loss):
        return self.agree(loss)[0]

    def agree(self, loss, stop_requested=False, ids=()):
        """(whether every rank's loss is finite, whether any rank asked to stop, the
        sum over every rank of the CRC-32 of each utterance ID in `ids`): one all-reduce
        of three numbers (the stop request of preemption.py and the batch's fingerprint
        ride along). The fingerprint is a sum, so it does not depend on which rank or
        micro-batch held an utterance: summed over an optimizer step's micro-batches it
        names the global batch alike on any world size. It is exact in float64 below 2**53:
        up to 2**21 utterances in a micro-batch over all ranks."""
        fingerprint = float(sum(zlib.crc32(str(i).encode()) for i in ids))
        flags = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0, float(stop_requested), fingerprint],
                             dtype=torch.float64, device=collective_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        bad, stop, fingerprint = flags.tolist()
        self.fingerprint = int(fingerprint)
        if bad == 0:
            self.consecutive = 0
            return True, stop > 0
        self.skipped_total += 1
        self.consecutive += 1
        logger.warning(f"Non-finite loss: step skipped ({self.skipped_total} so far)")
        if self.consecutive > self.patience:
            raise ConfigError(
                f"loss was NaN/inf for {self.consecutive} steps in a row (nonfinite_patience="
                f"{self.patience}): lower the learning rate (lr), use --precision=bf16 instead "
                "of fp16, or lower max_grad_norm"
            )
        return False, stop > 0


WATCHDOG_EXIT_CODE = 3
_watchdog = None


def progress(what):
    """Tell the watchdog (if one is armed) that this rank made progress."""
    if _watchdog is not None:
        _watchdog.progress(what)


class Watchdog:
    """Ends a rank that made no progress for `timeout_minutes`.

    A hung rank (a peer frozen or gone without closing its sockets, a deadlocked
    collective, a stuck file system) would otherwise wait until the collective
    timeout, hours later. The watchdog thread wakes every few seconds; once the
    last call of `progress` is older than the timeout, it prints one line naming
    the rank and what it did last, the Python stacks of all its threads, and exits
    with status 3, so torchrun ends the group and `--max-restarts` restarts it from
    the last checkpoint. Collective waits release the GIL, so the thread runs.
    """

    def __init__(self, timeout_minutes):
        self.timeout_s = timeout_minutes * 60.0
        self.last, self.what = time.monotonic(), "start of training"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def progress(self, what):
        self.last, self.what = time.monotonic(), what

    def start(self):
        global _watchdog
        _watchdog = self
        self._thread.start()
        return self

    def stop(self):
        global _watchdog
        _watchdog = None
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(10.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                sys.stderr.write(
                    f"watchdog: rank {rank()} on {socket.gethostname()} made no progress for {idle / 60:.1f} min "
                    f"(hang_timeout_minutes={self.timeout_s / 60:g}; last progress: {self.what}); the stacks of "
                    "all its threads follow, then it exits so that torchrun can restart from the last checkpoint\n"
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)
