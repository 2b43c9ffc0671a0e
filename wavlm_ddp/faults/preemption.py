"""Preemption without lost work: a run told to stop (SIGTERM or SIGUSR1, as SLURM
sends before it takes the GPUs back) saves a checkpoint at the next optimizer-step
boundary and exits; the same command resumes it at exactly that step.

Every rank must stop at the same step, also when only some ranks got the signal.
The request travels in the all-reduce that the non-finite guard already runs once
per micro-batch (guards.NonFiniteGuard.agree): no extra collective, no
cost per step beyond one more number in a one-number all-reduce.
"""

import os
import signal
from pathlib import Path

# EX_TEMPFAIL: "try again later". launch_ddp.sh exits with it after a preemption
# (and requeues the job under SLURM); `python train.py` alone too.
PREEMPTED_EXIT_CODE = 75
# The file through which torchrun's workers tell launch_ddp.sh that they stopped for a
# preemption (they exit 0 so that torchrun does not restart them).
MARKER_ENV = "WAVLM_PREEMPT_MARKER"


class Preempted(Exception):
    """Raised once the preemption checkpoint is saved."""


class PreemptionWatch:
    """Records that one of `signal_names` (e.g. ["SIGTERM", "SIGUSR1"]) arrived;
    the training step reads `requested`. Handlers are installed by `start`."""

    def __init__(self, signal_names):
        self.signals = [signal.Signals[name] for name in signal_names]
        self.received = None
        self._previous = {}

    @property
    def requested(self):
        return self.received is not None

    def start(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def stop(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def check_signal_names(names):
    """The preempt_signals key: a list of signal names this system has."""
    from wavlm_ddp.preflight import ConfigError

    known = {s.name for s in signal.Signals}
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in known for n in names):
        raise ConfigError(f"preempt_signals={names!r} is not a list of signal names: set "
                          "--preempt_signals=[SIGTERM,SIGUSR1] ([] turns preemption handling off)")


def exit_code_after_preemption():
    """0 under torchrun (after telling launch_ddp.sh through its marker file, so
    that torchrun does not restart the workers), else PREEMPTED_EXIT_CODE."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text("preempted\n")
    return 0 if "LOCAL_RANK" in os.environ else PREEMPTED_EXIT_CODE
