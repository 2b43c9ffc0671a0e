"""One run per output folder. A run holds its output folder while it runs: the file
`.run-lock.json` in it names the holder (host, pid, start time, run id). A second
run pointed at the folder (a job submitted twice, nodes that did not join one
world) stops at once, naming the holder, and writes nothing.

The holder's own restarts are not blocked: they carry the same run id (the
launch_ddp.sh invocation, the SLURM job id of a requeued job, or torchrun's run id).
A dead holder does not block the folder forever. The lock is created with O_EXCL
(atomic on local file systems and NFS) but file locks are never relied on: the
holder's main process rewrites the file's time every HEARTBEAT_S seconds, and a hold
is stale when its time is older than `lock_stale_minutes` (a crash, SIGKILL or a
lost node stops the heartbeat), or at once when its host is this one and its pid no
longer runs.
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

from wavlm_ddp.preflight import ConfigError

LOCK_NAME = ".run-lock.json"
HEARTBEAT_S = 30.0
RUN_ID_ENV = "WAVLM_RUN_ID"  # set by launch_ddp.sh for everything it starts
HOLDER_PID_ENV = "WAVLM_LAUNCHER_PID"  # the launcher's pid: the process whose death frees the folder


def run_id():
    """Who this process runs for: the same value in every process of one run and its restarts."""
    for name in (RUN_ID_ENV, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return f"pid={os.getpid()}@{socket.gethostname()}"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """The hold of one output folder (acquire, heartbeat, release)."""

    def __init__(self, folder, stale_minutes):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_NAME
        self.stale_s = stale_minutes * 60.0
        self.created_folder = False
        self._stop = threading.Event()
        self._thread = None

    def holder(self):
        """The holder's record, or None (no lock, or a torn one)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def stale(self, record):
        """Why `record`'s hold is dead, or None while it may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "gone"
        if age > self.stale_s:
            return f"not refreshed for {age / 60:.1f} min (lock_stale_minutes={self.stale_s / 60:g})"
        if record and record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", 0))):
            return f"its process {record.get('pid')} on this host is gone"
        return None

    def acquire(self):
        """Hold the folder, or raise ConfigError naming its holder. Creates the folder
        when missing (`created_folder` then says so, for `release(remove_folder=True)`)."""
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": int(os.environ.get(HOLDER_PID_ENV, os.getpid())),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "run": run_id()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                record = self.holder()
                if record and record.get("run") == me["run"]:
                    os.utime(self.path)  # our own earlier process (a restart, the launcher's check)
                    return self
                why = self.stale(record)
                if record is None and why is None:
                    time.sleep(0.5)  # being written right now
                    continue
                if why is None:
                    raise ConfigError(
                        f"output_folder={self.folder} is in use by the run {record['run']} on {record['host']} "
                        f"(pid {record['pid']}, since {record['started']}): wait for it to finish, stop it, or "
                        "choose another --output_folder")
                self.path.unlink(missing_ok=True)  # a dead run's hold
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ConfigError(f"could not take {self.path}: another run keeps writing it; choose another --output_folder")

    def start_heartbeat(self):
        self._thread = threading.Thread(target=self._beat, name="folder-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self, remove_folder=False):
        """Give the folder back (and remove it when this run created it and left it empty)."""
        self._stop.set()
        record = self.holder()
        if record and record.get("run") == run_id():
            self.path.unlink(missing_ok=True)
        if remove_folder and self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass
