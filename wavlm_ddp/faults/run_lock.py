"""One run per output folder. A run holds its output folder from its first check to
its end: the file `.run-lock.json` in it names the holder (run id, host, the
launcher's pid and the pid of the process that holds it, start time, SLURM job and
requeue count). A second run pointed at the folder (a job submitted twice, two sruns
of one allocation, nodes that did not join one world) stops at once, naming the
holder, and writes nothing.

What counts as the same run: everything one launch starts (launch_ddp.sh's check,
its workers, torchrun's restarts of them) carries the launch's run id. Another
launch is a new run even inside one SLURM allocation; a requeued SLURM job (a higher
SLURM_RESTART_COUNT of the same job) takes over at once, since SLURM requeues a job
only after it ended.

A dead holder does not block the folder for long. File locks are not relied on (they
often fail across nodes on NFS): the lock is written whole and hard-linked into place
(a link fails where the file exists), its holder rewrites its time every HEARTBEAT_S
seconds from the moment it takes it, and a hold is stale when its time is older than
`lock_stale_minutes`, or at once when it was taken on this machine (host, boot and
pid namespace) and neither its launcher nor its holding process runs. A stale hold is broken
by one breaker at a time (a second O_EXCL file), which looks again before it breaks.
A heartbeat that finds the lock taken by another run stops its process instead of
writing on.
"""

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from wavlm_ddp.preflight import ConfigError

LOCK_NAME = ".run-lock.json"
HEARTBEAT_S = 30.0  # at most; four beats fit in lock_stale_minutes whatever it is
BREAK_STALE_S = 60.0  # a breaker's file older than this was left by a breaker that died
RUN_ID_ENV = "WAVLM_RUN_ID"  # set by launch_ddp.sh for everything it starts
HOLDER_PID_ENV = "WAVLM_LAUNCHER_PID"  # the launcher's pid: while it runs, the run lives
LOST_HOLD_EXIT_CODE = 2


def started_by_torchrun():
    """Whether this process is a torchrun worker (torchrun sets the variable for each)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def run_id():
    """Who this process runs for: the same value in every process of one launch and its restarts."""
    if os.environ.get(RUN_ID_ENV):
        return f"{RUN_ID_ENV}={os.environ[RUN_ID_ENV]}"
    if started_by_torchrun():  # a plain torchrun: its agent is the launch
        return f"torchrun={os.getppid()}@{socket.gethostname()}"
    return f"pid={os.getpid()}@{socket.gethostname()}"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def machine():
    """Where a pid means one process: this host's name, its boot (a reboot reuses pids) and
    the pid namespace (two containers on one host may share a name and number pids alike)."""
    def read(how):
        try:
            return how()
        except OSError:
            return None

    return {"host": socket.gethostname(),
            "boot": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            "pid_namespace": read(lambda: os.readlink("/proc/self/ns/pid"))}


def _slurm():
    """(job id, requeue count) of this SLURM job, or (None, 0)."""
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class FolderLock:
    """The hold of one output folder (acquire, heartbeat, release)."""

    def __init__(self, folder, stale_minutes):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_NAME
        self.break_path = self.path.with_name(LOCK_NAME + ".break")
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
        """Why `record`'s hold is over, or None while it may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return "gone"
        if age > self.stale_s:
            return f"not refreshed for {age / 60:.1f} min (lock_stale_minutes={self.stale_s / 60:g})"
        if not record:
            return None
        job, restarts = _slurm()
        if job and record.get("slurm_job") == job and int(record.get("slurm_restart", 0)) < restarts:
            return f"SLURM job {job} was requeued (restart {restarts})"
        pids = [int(record.get(key) or 0) for key in ("pid", "holder_pid")]
        here = machine()
        if all(record.get(key) == value for key, value in here.items()) and not any(pid and pid_alive(pid)
                                                                                    for pid in pids):
            return f"its processes {', '.join(str(p) for p in pids if p)} on this host are gone"
        return None

    def _record(self):
        job, restarts = _slurm()
        return {"run": run_id(), **machine(), "pid": int(os.environ.get(HOLDER_PID_ENV) or os.getpid()),
                "holder_pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "slurm_job": job, "slurm_restart": restarts}

    def acquire(self):
        """Hold the folder and start the heartbeat, or raise ConfigError naming its
        holder. Creates the folder when missing (`created_folder` then says so, for
        `release(remove_folder=True)`)."""
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = self._record()
        for _ in range(20):
            try:
                self._create(me)
            except FileExistsError:
                record = self.holder()
                if record and record.get("run") == me["run"]:
                    self._write({**record, "holder_pid": os.getpid()})  # the launcher's check, a restart
                    return self._start_heartbeat()
                why = self.stale(record)
                if record is None and why is None:
                    time.sleep(0.5)  # unreadable (not one of ours): judged again, then by its age
                    continue
                if why is None and self.holder() != record:
                    continue  # replaced while it was judged (a breaker took it): judge the new holder
                if why is None:
                    raise ConfigError(
                        f"output_folder={self.folder} is in use by the run {record['run']} on {record['host']} "
                        f"(pid {record['pid']}, since {record['started']}): wait for it to finish, stop it, or "
                        "choose another --output_folder")
                self._break(record)
                continue
            return self._start_heartbeat()
        raise ConfigError(f"could not take {self.path}: another run keeps writing it; choose another --output_folder")

    def _break(self, record):
        """Remove a stale hold, one breaker at a time: the breaker looks again while it
        holds the break file, so a hold that another breaker already replaced stays."""
        try:
            fd = os.open(self.break_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - self.break_path.stat().st_mtime > BREAK_STALE_S:
                    self.break_path.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            now = self.holder()
            if now == record and self.stale(now):
                self.path.unlink(missing_ok=True)
        finally:
            self.break_path.unlink(missing_ok=True)

    def _create(self, record):
        """Create the lock with `record` in it, or raise FileExistsError: written whole
        beside it, then hard-linked to its name (a link never replaces a file, on NFS too),
        so that no reader ever sees the lock empty."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}")
        try:
            tmp.write_text(json.dumps(record))
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError as error:
            raise ConfigError(f"could not take {self.path} ({error.strerror or error}): the output folder must be "
                              "writable and its file system must support hard links (the lock is one); choose "
                              "another --output_folder") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self, record):
        tmp = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def _start_heartbeat(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="folder-lock", daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(min(HEARTBEAT_S, self.stale_s / 4)):
            self.beat()

    def beat(self):
        """Refresh the hold; a process whose hold another run took stops at once."""
        record = self.holder()
        if record is not None and record.get("run") != run_id():
            sys.stderr.write(f"error: output_folder={self.folder} was taken by the run {record.get('run')} on "
                             f"{record.get('host')} (this run's hold was judged stale): this process stops so that "
                             "two runs never write one folder; rerun when that run has ended\n")
            sys.stderr.flush()
            os._exit(LOST_HOLD_EXIT_CODE)
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
