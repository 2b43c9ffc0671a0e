"""Faults as a cluster delivers them, and a resume that is exact in its losses.

Through launch_ddp.sh on 2 CPU gloo processes, with attention dropout (torch's generator)
and SpecAugment (numpy's) on and 2 DataLoader workers per rank, one command is run
uninterrupted, and again interrupted at every place a cluster can interrupt it:
  - SIGUSR1 to every process of the launch (as SLURM signals a job step: the launcher,
    torchrun, the workers in their own sessions, their DataLoader processes) while the
    checks run: it stops with nothing to save;
  - rank 1 frozen (SIGSTOP) after the first checkpoint: rank 0's watchdog ends it after
    hang_timeout_minutes, torchrun (--max-restarts 2) restarts the group from that checkpoint
    (rank 1 thawed once the watchdog fired, which spares torchrun's 30 s grace for it);
  - rank 1 killed (SIGKILL) right after the end-of-epoch-1 checkpoint: torchrun restarts
    the group from it;
  - SIGTERM to every process mid-epoch 2: a checkpoint at the next optimizer step, exit 75;
  - the launcher and torchrun killed (SIGKILL) mid-epoch: the workers end, nothing writes
    into the folder afterwards, and the next launch takes the folder over;
  - SIGUSR1 to every process during epoch 2's validation: it stops after the epoch's
    checkpoint; SIGTERM to every process during the test evaluation: it stops without
    writing the results;
  - the same command once more, to the end.
Every row of train_steps.csv, losses included, the final weights and the test WER must be
the uninterrupted run's. (Rank 0's loss is logged; rank 1's draws reach the weights
through DDP.)

Single-process tests of the states themselves (wavlm_ddp/training/random_states.py) first.
"""

import csv
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import demo_slice, free_port, process_tree, signal_every_process, wait_for
from wavlm_ddp.faults.checkpoints import SafeCheckpointer
from wavlm_ddp.training.random_states import RandomStates

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"train": 72, "valid": 8, "test": 8}  # 7 optimizer steps per epoch
STEPS_PER_EPOCH = 7
LOSS_TOLERANCE = 1.5e-4  # train_steps.csv rounds the loss to 4 decimals


def draws():
    """A few numbers from each generator a training step may draw from (and numpy's and
    Python's cached Gaussian)."""
    return (torch.rand(4).tolist(), torch.randn(3).tolist(), np.random.rand(4).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(4)], random.gauss(0.0, 1.0))


def test_a_checkpoints_random_states_replay_the_draws_that_followed_its_save(tmp_path):
    np.random.randn()
    random.gauss(0.0, 1.0)  # both keep a second Gaussian cached: part of the state
    saved = RandomStates()
    saved.capture()
    SafeCheckpointer(tmp_path, recoverables={"random_states": saved}).save_checkpoint()
    after_save = [draws(), draws()]

    restored = RandomStates()
    SafeCheckpointer(tmp_path, recoverables={"random_states": restored}).recover_if_possible()
    restored.restore()
    assert [draws(), draws()] == after_save


def recover_and_draw(folder):
    """Recover `folder`'s checkpoint into a RandomStates registered as train.py's is (optional);
    the draws that follow, and the draws of the same generators set to a known state."""
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    states = RandomStates()
    checkpointer = SafeCheckpointer(folder)
    checkpointer.add_recoverable("random_states", states, optional_load=True)
    checkpointer.recover_if_possible()
    states.restore()
    recovered = draws()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    return recovered, draws()


def test_random_states_of_another_world_size_are_left_out_and_the_log_says_why(tmp_path, caplog):
    states = RandomStates()
    states.capture()
    states.gathered = states.gathered * 2  # as the main process of 2 ranks gathers them
    SafeCheckpointer(tmp_path, recoverables={"random_states": states}).save_checkpoint()
    with caplog.at_level(logging.WARNING):
        recovered, untouched = recover_and_draw(tmp_path)
    assert recovered == untouched
    assert ("the checkpoint's random states are of 2 rank(s) and this run has 1: dropout and SpecAugment masks are "
            "drawn afresh from here") in caplog.text


def test_a_checkpoint_saved_without_random_states_still_resumes(tmp_path):
    model = torch.nn.Linear(2, 2)
    SafeCheckpointer(tmp_path, recoverables={"model": model}).save_checkpoint()
    recovered, untouched = recover_and_draw(tmp_path)
    assert recovered == untouched


# ---- Through launch_ddp.sh ---------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, the command's arguments but the output folder) on a demo slice."""
    from hyperpyyaml import load_hyperpyyaml

    from wavlm_ddp.encoder.loading import make_local_checkpoint

    folder = tmp_path_factory.mktemp("exact_resume")
    demo = load_hyperpyyaml((ROOT / "hparams" / "demo.yaml").read_text())["wavlm"].keywords
    make_local_checkpoint(folder / "wavlm-small", demo["init_config"], demo["init_seed"])  # once, for both runs
    assert demo["apply_spec_augment"] and demo["mask_time_prob"] > 0  # SpecAugment on in the demo
    args = [f"--{split}_csv={path}" for split, path in demo_slice(folder, ROWS).items()]
    return folder, ["--max-restarts", "2", *args, f"--wavlm_source={folder / 'wavlm-small'}", "--noprogressbar",
                    "--number_of_epochs=2", "--ckpt_interval_steps=3", "--attention_dropout=0.1",
                    "--hang_timeout_minutes=0.25",
                    "--train_dataloader_opts={num_workers: 2}", "--use_tensorboard=True"]


def start(corpus, name, log_name):
    folder, args = corpus
    out, log_path = folder / name, folder / f"{log_name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(ROOT / "launch_ddp.sh"), *args, f"--output_folder={out}"], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MASTER_PORT": str(free_port())}, start_new_session=True)
    return process, out, log_path


def trainer_pid(out, rank):
    """The pid of the training process of `rank` (not one of its DataLoader workers, which
    share its command line and environment)."""
    matches = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmdline and b"train.py" in cmdline and f"RANK={rank}".encode() in environ:
            matches[int(proc.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    trainers = [pid for pid, parent in matches.items() if parent not in matches]
    assert len(trainers) == 1, matches
    return trainers[0]


def step_rows(out):
    """train_steps.csv's rows as dicts, the loss as a float."""
    with open(out / "train_steps.csv", newline="") as f:
        return [{**row, "loss_rank0": float(row["loss_rank0"])} for row in csv.DictReader(f)]


def end_of_epoch_checkpoints(out):
    metas = [yaml.safe_load(p.read_text()) for p in (out / "save").glob("CKPT+*/CKPT.yaml")]
    return [m for m in metas if m["end-of-epoch"]]


def final_weights(out):
    """The encoder and head of the newest checkpoint (the end of the last epoch)."""
    newest = max((out / "save").glob("CKPT+*/CKPT.yaml"), key=lambda p: yaml.safe_load(p.read_text())["unixtime"])
    return {name: torch.load(newest.parent / f"{name}.ckpt", weights_only=True) for name in ("wavlm", "ctc_head")}


@pytest.fixture(scope="module")
def reference(corpus):
    process, out, log_path = start(corpus, "reference", "reference")
    assert process.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    return out


def last_step_of_epoch(out, epoch):
    """Whether the epoch's last optimizer step is logged (no launch before reached it)."""
    last = str(epoch * STEPS_PER_EPOCH - 1)
    return (out / "train_steps.csv").exists() and any(row["step"] == last for row in step_rows(out))


def alive(pid):
    """Whether `pid` still runs (a zombie, awaiting its parent's wait, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def files_of(out):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def interrupted(corpus):
    """The same command interrupted at every place (the module's docstring), each launch's
    (exit status, log) by name; "killed" also holds the rows written until it stopped."""
    runs = {}
    process, out, log_path = start(corpus, "interrupted", "startup")
    wait_for(lambda: (out / ".run-lock.json").exists(), process, log_path, poll=0.02)  # the checks have begun
    signal_every_process(process.pid, signal.SIGUSR1)
    runs["startup"] = process.wait(timeout=600), log_path.read_text()
    runs["startup_files"] = sorted(p.name for p in (out / "save").glob("CKPT+*")) if (out / "save").exists() else []

    process, out, log_path = start(corpus, "interrupted", "interrupted")
    wait_for(lambda: (out / "save").is_dir() and any((out / "save").glob("CKPT+*/CKPT.yaml")), process, log_path,
             poll=0.05)
    frozen = trainer_pid(out, rank=1)
    os.kill(frozen, signal.SIGSTOP)  # frozen: rank 0 waits for it in a collective
    wait_for(lambda: "watchdog: rank 0" in log_path.read_text(), process, log_path)
    # Thawed once rank 0's watchdog has ended the group: torchrun's SIGTERM then ends it at once,
    # where a process that stays stopped costs torchrun's 30 s grace before its SIGKILL.
    os.kill(frozen, signal.SIGCONT)
    wait_for(lambda: "resumed from checkpoint" in log_path.read_text(), process, log_path)
    wait_for(lambda: (out / "save").is_dir() and end_of_epoch_checkpoints(out), process, log_path, poll=0.05)
    os.kill(trainer_pid(out, rank=1), signal.SIGKILL)
    wait_for(lambda: log_path.read_text().count("resumed from checkpoint") == 2, process, log_path)
    rows = len(step_rows(out))
    wait_for(lambda: len(step_rows(out)) >= rows + 2, process, log_path)  # the restarted group trains on
    runs["signalled"] = len(signal_every_process(process.pid, signal.SIGTERM))
    runs["killed"] = (process.wait(timeout=600), log_path.read_text(), step_rows(out))

    process, _, log_path = start(corpus, "interrupted", "orphaned")
    rows = len(step_rows(out))
    wait_for(lambda: len(step_rows(out)) >= rows + 1, process, log_path, poll=0.05)
    tree = process_tree(process.pid)
    torchrun = [pid for pid in tree if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    for pid in [process.pid, *torchrun]:
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=60)
    deadline = time.time() + 120  # generous: the workers look for their parent every second
    while any(alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.1)
    runs["orphans_left"] = [pid for pid in tree if alive(pid)]
    runs["orphaned"] = log_path.read_text(), files_of(out)
    time.sleep(2.0)  # anything still alive would write a row or a checkpoint meanwhile
    runs["orphaned_after"] = files_of(out)

    process, _, log_path = start(corpus, "interrupted", "validation")
    wait_for(lambda: last_step_of_epoch(out, 2), process, log_path, poll=0.02)
    signal_every_process(process.pid, signal.SIGUSR1)
    runs["validation"] = process.wait(timeout=600), log_path.read_text()

    process, _, log_path = start(corpus, "interrupted", "test")
    wait_for(lambda: "resumed from checkpoint" in log_path.read_text(), process, log_path, poll=0.02)
    signal_every_process(process.pid, signal.SIGTERM)
    runs["test"] = process.wait(timeout=600), log_path.read_text()

    process, _, log_path = start(corpus, "interrupted", "rerun")
    runs["rerun"] = process.wait(timeout=600), log_path.read_text()
    return runs, out


def assert_rows_equal(rows, reference_rows):
    """Each row equals the uninterrupted run's row of its step: epoch, learning rates,
    frozen flag, and the loss to the CSV's rounding."""
    expected = {row["step"]: row for row in reference_rows}
    for row in rows:
        want = expected[row["step"]]
        others = [key for key in want if key != "loss_rank0"]
        assert [row[key] for key in others] == [want[key] for key in others], (row, want)
        assert row["loss_rank0"] == pytest.approx(want["loss_rank0"], abs=LOSS_TOLERANCE), (row, want)


def scalars(folder):
    """{tag: [(step, value)]} of every event file in `folder`, read as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def clean(log):
    return not any(word in log for word in ("Traceback", "SignalException", "killed by signal", "ChildFailedError"))


def test_a_signal_to_every_process_during_the_checks_stops_the_launch_with_nothing_to_save(interrupted):
    runs, _ = interrupted
    code, log = runs["startup"]
    assert code == 75 and clean(log), log[-3000:]
    assert re.search(r"preempted by SIGUSR1 during the \w[\w ]+: nothing to save yet", log), log[-3000:]
    assert "preempted: the workers stopped at a safe point" in log and "rank 0 of world size" not in log
    assert runs["startup_files"] == []


def test_a_frozen_worker_makes_rank_0s_watchdog_restart_the_group_from_the_last_checkpoint(interrupted):
    """SIGSTOP freezes rank 1 mid-epoch 1: rank 0 waits in a collective, its watchdog fires
    after hang_timeout_minutes with the stacks of its threads, torchrun ends the group and
    starts it again, and the group resumes from the checkpoint before the freeze."""
    runs, _ = interrupted
    code, log, _ = runs["killed"]
    line = next(line for line in log.splitlines() if "watchdog: rank 0" in line)
    assert "made no progress for" in line and "hang_timeout_minutes=0.25" in line
    assert re.search(r"last progress: (training step \d+|checkpoint saved)", line), line
    assert "Thread 0x" in log or "Current thread 0x" in log  # the stacks follow the line
    resumed = re.findall(r"resumed from checkpoint: epoch (\d+), batch (\d+) of the epoch, optimizer step (\d+)", log)
    assert resumed[0][0] == "1" and 0 < int(resumed[0][2]) < STEPS_PER_EPOCH, log[-3000:]  # mid-epoch 1


def test_a_worker_killed_after_an_epoch_end_resumes_there_with_the_uninterrupted_losses(interrupted, reference):
    """Both restarts of the launch (the frozen worker's and the killed one's) log the
    uninterrupted run's rows, losses included."""
    runs, _ = interrupted
    code, log, rows = runs["killed"]
    assert code == 75, log[-3000:]  # it trained on until the preemption
    resumed = re.findall(r"resumed from checkpoint: epoch (\d+), batch (\d+) of the epoch, optimizer step (\d+)", log)
    assert len(resumed) == 2 and resumed[1][:2] == ("2", "0"), log[-3000:]  # from the end-of-epoch-1 checkpoint
    assert log.count("random states of the 2 rank(s) restored from the checkpoint") == 2
    assert sum(int(row["step"]) >= int(resumed[1][2]) for row in rows) >= 2  # trained by the restarted group
    assert_rows_equal(rows, step_rows(reference))


def test_sigterm_to_every_process_with_loader_workers_saves_at_the_next_step_and_exits_75(interrupted):
    """The launcher, torchrun, 2 workers and their 4 DataLoader processes get SIGTERM
    at once: no process dies of it, the workers save and stop, and torchrun ends cleanly."""
    runs, _ = interrupted
    code, log, _ = runs["killed"]
    assert runs["signalled"] == 8  # launcher, torchrun, 2 ranks, 2 x 2 loader processes
    after_restart = log.split("resumed from checkpoint")[-1]
    assert code == 75 and clean(after_restart), after_restart[-3000:]
    assert "preempted by SIGTERM: checkpoint saved after optimizer step" in after_restart
    assert "preempted: the workers stopped at a safe point; the same command resumes the run (exit 75)" in log


def test_workers_end_with_a_killed_launcher_and_nothing_writes_into_the_folder_afterwards(interrupted):
    runs, _ = interrupted
    log, files = runs["orphaned"]
    assert runs["orphans_left"] == []
    assert re.search(r"worker \d+ stops: its (torchrun|launcher) \(pid \d+\) is gone", log), log[-3000:]
    assert runs["orphaned_after"] == files
    code, log = runs["validation"]  # the next launch took the folder over and resumed
    assert "is in use by the run" not in log and "resumed from checkpoint" in log, log[-3000:]


def test_a_signal_during_validation_stops_after_the_epochs_own_checkpoint(interrupted):
    runs, out = interrupted
    code, log = runs["validation"]
    assert code == 75 and clean(log), log[-3000:]
    assert "preempted by SIGUSR1 during epoch 2's evaluation: checkpoint saved at its end" in log, log[-3000:]
    assert "Saved an end-of-epoch checkpoint" in log and "Saved an intra-epoch checkpoint" not in \
        log.split("epoch 2: train loss")[-1]


def test_a_signal_during_the_test_evaluation_stops_without_writing_its_results(interrupted, reference):
    runs, out = interrupted
    code, log = runs["test"]
    assert code == 75 and clean(log), log[-3000:]
    assert "preempted by SIGTERM during the test evaluation: its results are not written" in log, log[-3000:]
    assert "test WER" not in log
    code, log = runs["rerun"]
    reference_log = (reference.parent / "reference.log").read_text()
    assert code == 0 and clean(log), log[-3000:]
    for pattern in (r"test WER [^:]*", r"test loss: [\d.]+"):  # the decoding's time aside
        assert re.findall(pattern, log) == re.findall(pattern, reference_log) != []


def test_the_interrupted_run_logs_the_uninterrupted_rows_and_ends_with_its_weights(interrupted, reference):
    """Every row any of its launches wrote (steps redone after the killed worker and the
    killed launcher included) is the uninterrupted run's row of that step, loss included."""
    runs, out = interrupted
    rows, reference_rows = step_rows(out), step_rows(reference)
    assert [row["step"] for row in reference_rows] == [str(step) for step in range(2 * STEPS_PER_EPOCH)]
    assert {row["step"] for row in rows} == {row["step"] for row in reference_rows}  # every step, once or redone
    assert_rows_equal(rows, reference_rows)
    weights, expected = final_weights(out), final_weights(reference)
    for name in expected:
        assert weights[name].keys() == expected[name].keys()
        for key, tensor in expected[name].items():
            torch.testing.assert_close(weights[name][key], tensor, msg=f"{name}: {key}")


def test_tensorboard_under_ddp_logs_each_epoch_once_across_every_resume_as_the_uninterrupted_run(interrupted,
                                                                                                   reference):
    """--use_tensorboard=True on 2 ranks: the main process writes, every rank meets the
    checkpoints' collectives, the epoch is the step (a resumed launch continues the
    curves), and the values are the uninterrupted run's."""
    runs, out = interrupted
    history = json.loads((reference / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    expected = scalars(reference / "tensorboard")
    logged = scalars(out / "tensorboard")
    for tag, key in (("loss/train", "train_loss"), ("loss/valid", "valid_loss"), ("WER/valid", "valid_WER"),
                     ("lr_wavlm", "lr_wavlm"), ("lr_head", "lr_head")):
        assert [step for step, _ in expected[tag]] == [1, 2], tag
        assert [value for _, value in expected[tag]] == pytest.approx([r[key] for r in history], rel=1e-6), tag
        assert sorted(set(step for step, _ in logged[tag])) == [1, 2], tag  # each epoch, by the launch that ended it
        assert [value for _, value in sorted(dict(logged[tag]).items())] == pytest.approx(
            [value for _, value in expected[tag]], rel=1e-4, abs=1e-4), tag
