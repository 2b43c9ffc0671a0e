"""One run per output folder, with the holders a cluster really has: a holder on
another node known only by its heartbeat, two launches of one SLURM allocation, a
requeued job, and two runs breaking one stale hold at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wavlm_ddp.faults.run_lock import LOCK_NAME, FolderLock
from wavlm_ddp.preflight import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# A holder in another process; HOST names the node it claims to run on (another node:
# its pid cannot be looked for, only its heartbeat); it holds until its stdin closes.
HOLDER = """
import socket, sys
if {host!r}:
    socket.gethostname = lambda: {host!r}
from wavlm_ddp.faults.run_lock import FolderLock
FolderLock(sys.argv[1], float(sys.argv[2])).acquire()
print("held", flush=True)
sys.stdin.read()
"""
# Two breakers start together (a start file), each prints "won" or its error line.
BREAKER = """
import os, sys, time
from wavlm_ddp.faults.run_lock import FolderLock
from wavlm_ddp.preflight import ConfigError
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    FolderLock(sys.argv[1], 10).acquire()
    print("won", flush=True)
    sys.stdin.read()
except ConfigError as error:
    print(error, flush=True)
"""


def start_holder(folder, stale_minutes, env, host=""):
    process = subprocess.Popen([sys.executable, "-c", HOLDER.format(host=host), str(folder), str(stale_minutes)],
                               cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def slurm(job, restart, launch):
    return {"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": str(restart), "WAVLM_RUN_ID": f"slurm-{job}-{launch}",
            "WAVLM_LAUNCHER_PID": ""}


def acquire_as(folder, env, stale_minutes=10):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return FolderLock(folder, stale_minutes).acquire()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_a_holder_on_another_node_keeps_the_folder_by_its_heartbeat_beyond_the_stale_time(tmp_path):
    """lock_stale_minutes 0.02 (1.2 s): a holder whose pid this node cannot look for
    keeps the hold for as long as it beats, also while it is still checking."""
    holder = start_holder(tmp_path / "run", 0.02, {"WAVLM_RUN_ID": "node-a-launch"}, host="node-a")
    try:
        first = (tmp_path / "run" / LOCK_NAME).stat().st_mtime
        for _ in range(3):
            time.sleep(1.0)  # 3 s in all: 2.5 stale times
            with pytest.raises(ConfigError, match="is in use by the run WAVLM_RUN_ID=node-a-launch on node-a"):
                acquire_as(tmp_path / "run", {"WAVLM_RUN_ID": "node-b-launch"}, stale_minutes=0.02)
        assert (tmp_path / "run" / LOCK_NAME).stat().st_mtime > first  # refreshed meanwhile
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_second_launch_in_one_slurm_allocation_is_refused_while_the_first_lives_and_a_requeue_takes_over(tmp_path):
    folder = tmp_path / "run"
    first = start_holder(folder, 10, slurm("4242", 0, "launch-1"))
    try:
        with pytest.raises(ConfigError, match="in use by the run WAVLM_RUN_ID=slurm-4242-launch-1"):
            acquire_as(folder, slurm("4242", 0, "launch-2"))  # a second srun of the same job
    finally:
        first.stdin.close()
        first.wait()
    # The first is dead but its record says another host: only the requeue proves it over.
    record = json.loads((folder / LOCK_NAME).read_text())
    (folder / LOCK_NAME).write_text(json.dumps({**record, "host": "node-of-the-first-allocation"}))
    with pytest.raises(ConfigError, match="in use by the run"):
        acquire_as(folder, slurm("4242", 0, "launch-3"))
    requeued = acquire_as(folder, slurm("4242", 1, "launch-4"))
    record = json.loads((folder / LOCK_NAME).read_text())
    assert record["run"] == "WAVLM_RUN_ID=slurm-4242-launch-4" and record["slurm_restart"] == 1
    assert record["holder_pid"] == os.getpid()  # the new holder, not the first one's host and pid
    requeued._stop.set()


@pytest.mark.parametrize("round_", range(3))
def test_two_runs_breaking_one_stale_hold_at_once_leave_exactly_one_holder(tmp_path, round_):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"run": "WAVLM_RUN_ID=dead", "host": "lost-node", "pid": 1, "holder_pid": 1,
                                "started": "-", "slurm_job": None, "slurm_restart": 0}))
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # an hour without heartbeat: stale
    go = tmp_path / "go"
    breakers = [subprocess.Popen([sys.executable, "-c", BREAKER, str(folder), str(go)], cwd=ROOT,
                                 env={**os.environ, "WAVLM_RUN_ID": f"breaker-{i}", "WAVLM_LAUNCHER_PID": ""},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(2)]
    time.sleep(0.5)
    go.touch()
    answers = [b.stdout.readline().strip() for b in breakers]
    for b in breakers:
        b.stdin.close()
        b.wait()
    winner = answers.index("won")
    assert answers[1 - winner].startswith(f"output_folder={folder} is in use by the run WAVLM_RUN_ID=breaker-{winner}")


def dead_pid():
    """A pid that no process has (a child that has been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("other", [{}, {"boot": "another-boot"}, {"pid_namespace": "pid:[1]"}])
def test_a_dead_pid_frees_the_folder_at_once_only_when_taken_on_this_machine_boot_and_pid_namespace(tmp_path, other):
    """A container on this host (same name, its own pid namespace) or this host before a
    reboot numbers its processes apart: their pids say nothing here, only the heartbeat."""
    from wavlm_ddp.faults.run_lock import machine

    folder = tmp_path / "run"
    folder.mkdir()
    pid = dead_pid()
    (folder / LOCK_NAME).write_text(json.dumps({"run": "WAVLM_RUN_ID=gone", **machine(), **other, "pid": pid,
                                                "holder_pid": pid, "started": "-", "slurm_job": None,
                                                "slurm_restart": 0}))
    if not other:
        taken = acquire_as(folder, {"WAVLM_RUN_ID": "next", "WAVLM_LAUNCHER_PID": ""})
        assert json.loads((folder / LOCK_NAME).read_text())["run"] == "WAVLM_RUN_ID=next"
        taken._stop.set()
    else:
        with pytest.raises(ConfigError, match="is in use by the run WAVLM_RUN_ID=gone"):
            acquire_as(folder, {"WAVLM_RUN_ID": "next", "WAVLM_LAUNCHER_PID": ""})


def test_the_lock_appears_whole_and_is_never_replaced_by_a_second_creation(tmp_path):
    """Written beside its name and hard-linked there: a reader finds the whole record or no
    file, and a second creation fails instead of overwriting (nothing left beside it)."""
    folder = tmp_path / "run"
    lock = acquire_as(folder, {"WAVLM_RUN_ID": "first", "WAVLM_LAUNCHER_PID": ""})
    lock._stop.set()
    record = json.loads((folder / LOCK_NAME).read_text())
    with pytest.raises(FileExistsError):
        FolderLock(folder, 10)._create({**record, "run": "WAVLM_RUN_ID=second"})
    assert json.loads((folder / LOCK_NAME).read_text()) == record
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def test_a_file_system_without_hard_links_stops_the_run_with_one_line(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(ConfigError, match=r"could not take .*\.run-lock\.json \(Operation not permitted\): the output "
                                          r"folder must be writable and its file system must support hard links"):
        acquire_as(tmp_path / "run", {"WAVLM_RUN_ID": "first", "WAVLM_LAUNCHER_PID": ""})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # nothing left beside it
