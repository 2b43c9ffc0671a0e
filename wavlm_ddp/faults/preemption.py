"""Preemption without lost work: a run told to stop (SIGTERM or SIGUSR1, as SLURM
sends before it takes the GPUs back) saves a checkpoint at the next optimizer-step
boundary and exits; the same command resumes it at exactly that step.

Every rank must stop at the same step, also when only some ranks got the signal.
The request travels in the all-reduce that the non-finite guard already runs once
per micro-batch (guards.NonFiniteGuard.agree): no extra collective, no
cost per step beyond one more number in a one-number all-reduce.

A request can arrive before a worker has installed its handlers (the interpreter
starting, torch importing) or reach the launcher only (a user's `kill`). So
launch_ddp.sh also writes it into a file (STOP_FILE_ENV) that every rank reads
wherever it asks whether to stop: the request is never lost. Before step 1 and
after each epoch's checkpoint, `stop_point` asks every rank at once.
"""

import os
import signal
from pathlib import Path

import torch

# EX_TEMPFAIL: "try again later". launch_ddp.sh exits with it after a preemption
# (and requeues the job under SLURM); `python train.py` alone too.
PREEMPTED_EXIT_CODE = 75
# The file through which torchrun's workers tell launch_ddp.sh that they stopped for a
# preemption (they exit 0 so that torchrun does not restart them).
MARKER_ENV = "WAVLM_PREEMPT_MARKER"
# The file into which launch_ddp.sh writes the name of a stop signal it received.
STOP_FILE_ENV = "WAVLM_STOP_FILE"
# What a worker watches from its start, before the YAML (and its preempt_signals) is read.
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """Raised once the preemption checkpoint is saved."""


class PreemptionWatch:
    """Records that one of `signal_names` (e.g. ["SIGTERM", "SIGUSR1"]) arrived;
    the training step reads `requested`. Handlers are installed by `start`."""

    def __init__(self, signal_names):
        self.signals = [signal.Signals[name] for name in signal_names]
        self.received = None
        self._previous = {}
        self._stop_file = os.environ.get(STOP_FILE_ENV)

    @property
    def requested(self):
        if self.received is None and self._stop_file and os.path.exists(self._stop_file):
            try:
                name = Path(self._stop_file).read_text().strip()
            except OSError:
                name = ""
            if name in {sig.name for sig in self.signals}:  # a signal this run does not watch stops nothing
                self.received = name
        return self.received is not None

    def start(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def watch(self, signal_names):
        """Watch `signal_names` instead (the YAML's preempt_signals): the others get their
        default action back, also where the launcher started this process ignoring them;
        an empty list turns preemption handling off (the launcher's stop file too)."""
        keep = [signal.Signals[name] for name in signal_names]
        for sig in [s for s in self.signals if s not in keep]:
            signal.signal(sig, signal.SIG_DFL)
            self._previous.pop(sig, None)
        for sig in [s for s in keep if s not in self.signals]:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.signals = keep
        if not self.signals:
            self._stop_file = None
        return self

    def stop(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def ignore_in_loader_workers(signal_names):
    """A DataLoader's worker_init_fn: loader processes leave the stop signals to their
    rank (SLURM signals every process of the job; a loader that died of it would take
    its rank's step, and the checkpoint, with it). They end with their rank."""
    def ignore(worker_id):
        for name in signal_names:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
    return ignore


def end_loader_workers():
    """Stop the DataLoader processes still running when a rank ends early (a preemption
    or an error raised mid-epoch leaves the loader's iterator unfinished). At exit,
    multiprocessing would end them with SIGTERM, which they ignore, and wait for them
    forever; they hold nothing to save, so SIGKILL."""
    import multiprocessing

    loaders = [child for child in multiprocessing.active_children() if child.daemon]
    if not loaders:
        return
    # torch's SIGCHLD handler would raise "DataLoader worker ... is killed" for each of them.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in loaders:
        try:
            child.kill()
        except OSError:
            pass
    for child in loaders:
        child.join()


def stop_point(watch, where):
    """At a point that every rank reaches in the same order (before step 1, after an
    epoch's checkpoint, after the test): raise Preempted on every rank when any rank
    was asked to stop. One all-reduce of one number."""
    from wavlm_ddp.distributed import collective_device

    flag = torch.tensor([float(watch is not None and watch.requested)], device=collective_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        raise Preempted(f"{(watch and watch.received) or 'a signal on another rank'} {where}")


def clear_marker():
    """A restarted group (torchrun --max-restarts) starts without the marker of an
    earlier attempt: one process per node removes it before any rank can write it."""
    marker = os.environ.get(MARKER_ENV)
    if marker and os.environ.get("LOCAL_RANK") == "0":
        Path(marker).unlink(missing_ok=True)


def check_signal_names(names):
    """The preempt_signals key: a list of signal names this system has."""
    from wavlm_ddp.preflight import ConfigError

    known = {s.name for s in signal.Signals}
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in known for n in names):
        raise ConfigError(f"preempt_signals={names!r} is not a list of signal names: set "
                          "--preempt_signals=[SIGTERM,SIGUSR1] ([] turns preemption handling off)")


def exit_code_after_preemption():
    """0 under launch_ddp.sh's torchrun, after telling the launcher through its marker
    file (so that torchrun does not restart the workers, and the launcher exits with
    PREEMPTED_EXIT_CODE); PREEMPTED_EXIT_CODE everywhere else (one process, or a plain
    torchrun, which then reports the workers as failed instead of finished)."""
    from wavlm_ddp.faults.run_lock import started_by_torchrun

    marker = os.environ.get(MARKER_ENV)
    if marker and started_by_torchrun():
        Path(marker).write_text("preempted\n")
        return 0
    return PREEMPTED_EXIT_CODE
