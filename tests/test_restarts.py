"""A run that survives a frozen worker, through launch_ddp.sh --max-restarts on 2 CPU
gloo processes: one run on a slice of the demo corpus has rank 1 frozen (SIGSTOP: the
other rank's watchdog restarts the group) and resumes from its last checkpoint; its
folder then has its newest checkpoint damaged, and the next run falls back to the one
before. The run trains with independent LayerDrop, which the other launch tests do not
(synced or none). (A killed worker and its restart, losses included: test_exact_resume.py.)"""

import csv
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import demo_slice, free_port, wait_for, worker_pid

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
ROWS = {"train": 200, "valid": 8, "test": 8}  # about 15 optimizer steps in the epoch


def checkpoints(out):
    return {c.name for c in (out / "save").glob("CKPT+*") if (c / "CKPT.yaml").exists()}


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restarts")
    args = [f"--{split}_csv={path}" for split, path in demo_slice(folder, ROWS).items()]
    return folder, [str(ROOT / "launch_ddp.sh"), "--max-restarts", "1", f"--output_folder={folder / 'run'}",
                    f"--wavlm_source={folder / 'wavlm-small'}", "--noprogressbar", "--number_of_epochs=1",
                    "--ckpt_interval_steps=2", "--hang_timeout_minutes=0.25", "--layerdrop=0.5",
                    "--layerdrop_mode=independent", *args]


@pytest.fixture(scope="module")
def restarted_run(command):
    """Rank 1 frozen after the first checkpoint, then the run to its end: (exit status,
    log, output folder)."""
    folder, argv = command
    out, log_path = folder / "run", folder / "run.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MASTER_PORT": str(free_port())})
        wait_for(lambda: checkpoints(out), process, log_path)
        os.kill(worker_pid(str(out), rank=1), signal.SIGSTOP)
        code = process.wait(timeout=600)
    return code, log_path.read_text(), out


def test_a_frozen_worker_makes_the_other_ranks_watchdog_restart_the_run_from_its_last_checkpoint(restarted_run):
    """SIGSTOP freezes rank 1 mid-epoch: rank 0 waits in a collective, its watchdog
    fires after hang_timeout_minutes (15 s), torchrun ends the group and restarts it,
    and the restarted group resumes from the last checkpoint and finishes the epoch."""
    code, text, out = restarted_run
    assert code == 0, text[-3000:]
    line = next(l for l in text.splitlines() if "watchdog: rank 0" in l)
    assert "made no progress for" in line
    assert re.search(r"last progress: (training step \d+|checkpoint saved)", line)
    assert "Thread 0x" in text or "Current thread 0x" in text  # the stacks follow the line
    resumed = re.findall(r"resumed from checkpoint: epoch 1, batch (\d+) of the epoch, optimizer step (\d+)", text)
    assert len(resumed) == 1 and 0 < int(resumed[0][1]) and int(resumed[0][1]) % 2 == 0, text[-3000:]
    per_epoch = int(re.search(r"(\d+) optimizer steps per epoch", text).group(1))
    final = int(re.search(r"epoch 1: train loss .*\(optimizer step (\d+)\)", text).group(1))
    assert final == per_epoch  # nothing skipped, nothing counted twice
    assert "layerdrop=0.5 (independent)" in text and "DDP wraps the encoder with find_unused_parameters=True" in text
    with open(out / "train_steps.csv", newline="") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f)]
    assert sorted(set(logged)) == list(range(per_epoch))  # every step logged (repeats: redone after the restart)
    assert "test WER" in text


def test_a_run_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before(restarted_run, command, tmp_path):
    _, _, out = restarted_run
    folder, argv = command
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    kept = sorted(c for c in (copy / "save").glob("CKPT+*"))
    assert len(kept) == 2  # the end of the epoch and the one before (keep_latest_checkpoints: 2)
    newest = kept[-1] / "wavlm.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut in half
    argv = [a.replace(str(out), str(copy)) for a in argv] + ["--resume=True"]  # the folder moved: accept its path
    # Resumed by one process (the 2-rank fallback: test_fault_tolerance's damaged checkpoints).
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"Checkpoint {kept[-1]} is damaged (wavlm.ckpt do(es) not load)" in log
    assert re.search(r"resumed from checkpoint: epoch 1, batch \d+ of the epoch", log) and "test WER" in log
