"""Workers end with their launcher.

torchrun starts each worker in a session of its own, so a worker outlives a launcher
or a torchrun that was killed (SIGKILL, the OOM killer, a lost shell): it trains on,
saves checkpoints into a folder that no run holds any more, and a second launch on
that folder writes beside it. A thread in each worker therefore watches its parent
(torchrun) and the launcher (launch_ddp.sh, WAVLM_LAUNCHER_PID, on the same node)
and ends the worker at once when either is gone. A checkpoint being written then is
left without its commit, which the next run removes (faults/checkpoints.py)."""

import ctypes
import os
import signal
import sys
import threading

from wavlm_ddp.faults.run_lock import HOLDER_PID_ENV, pid_alive, started_by_torchrun

POLL_S = 1.0  # how often the parent and the launcher are looked for
ORPHANED_EXIT_CODE = 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent):
    """Have the kernel kill this process (SIGKILL) when the thread that forked it ends,
    and end now when `parent` is already gone: for the forked helpers of a rank (the data
    check's workers), which would otherwise check on for a rank that was killed."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: they end at their next message instead
        pass
    if os.getppid() != parent:
        os._exit(ORPHANED_EXIT_CODE)


class LauncherWatch:
    """Started in each torchrun worker; does nothing elsewhere."""

    def __init__(self):
        self.parent = os.getppid()
        launcher = os.environ.get(HOLDER_PID_ENV)
        self.launcher = int(launcher) if launcher and launcher.isdigit() else None
        self._stop = threading.Event()

    def start(self):
        if started_by_torchrun():
            threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()
        return self

    def stop(self):
        self._stop.set()

    def gone(self):
        """What is gone (torchrun, the launcher), or None."""
        if os.getppid() != self.parent:
            return f"its torchrun (pid {self.parent})"
        if self.launcher is not None and not pid_alive(self.launcher):
            return f"its launcher (pid {self.launcher})"
        return None

    def _watch(self):
        while not self._stop.wait(POLL_S):
            what = self.gone()
            if what:
                sys.stderr.write(f"worker {os.getpid()} stops: {what} is gone, and no worker may write to the "
                                 "output folder without it (rerun the launch to resume from the last checkpoint)\n")
                sys.stderr.flush()
                os._exit(ORPHANED_EXIT_CODE)
