"""End to end through launch_ddp.sh: 2 CPU gloo processes train the demo config.

This is the CI smoke test, and the acceptance commands of the LayerDrop issue."""

import sys
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--debug", "--debug_batches=3", "--debug_epochs=1", "--noprogressbar"]


def launch(tmp_path, *args, env=None, name="run"):
    """Run ./launch_ddp.sh from the project root with the outputs under tmp_path."""
    out = tmp_path / name
    command = [str(ROOT / "launch_ddp.sh"), *args, *FAST,
               f"--output_folder={out}", f"--wavlm_source={tmp_path / 'wavlm-small'}"]
    full_env = {**os.environ, "MASTER_PORT": str(free_port()), **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600), out


def assert_trained(result, out):
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "epoch 1: train loss" in log and "test WER" in log
    assert (out / "wer_test.txt").read_text().startswith("%WER")
    return log


def test_demo_trains_on_two_gloo_processes_with_layerdrop_and_writes_a_wer_file(tmp_path):
    result, out = launch(tmp_path, "--layerdrop=0.5")
    log = assert_trained(result, out)
    assert "rank 0 of world size 2" in log and "rank 1 of world size 2" in log
    assert "find_unused_parameters=True set automatically" in log
    assert "DDP wraps the encoder with find_unused_parameters=True; training precision fp32" in log
    assert "steps each layer was dropped" in log


def test_layerdrop_with_find_unused_parameters_false_stops_before_step_1_with_one_line(tmp_path):
    result, _ = launch(tmp_path, "--layerdrop=0.5", "--find_unused_parameters=False")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "--find_unused_parameters=True" in errors[0]
    assert "Going into epoch" not in result.stdout + result.stderr
    assert "Expected to have finished reduction" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args,ddp_line",
    [
        (["--layerdrop=0.0", "--find_unused_parameters=False"], "find_unused_parameters=False; training precision fp32"),
        (["--layerdrop=0.5", "--layerdrop_mode=independent", "--precision=bf16"],
         "find_unused_parameters=True; training precision bf16"),
    ],
    ids=["layerdrop0-no-find-unused", "independent-bf16"],
)
def test_other_supported_configurations_train_and_exit_0(tmp_path, args, ddp_line):
    log = assert_trained(*launch(tmp_path, *args))
    assert f"DDP wraps the encoder with {ddp_line}" in log


def test_two_nodes_of_one_process_train_as_one_job_of_world_size_2(tmp_path):
    port = str(free_port())
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    nodes = []
    for node_rank in ("0", "1"):
        out = tmp_path / f"node{node_rank}"
        command = [str(ROOT / "launch_ddp.sh"), *FAST, f"--output_folder={tmp_path / 'shared'}",
                   f"--wavlm_source={tmp_path / 'wavlm-small'}"]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        nodes.append((subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env, "NODE_RANK": node_rank},
                                       stdout=log, stderr=subprocess.STDOUT, text=True), out))
    codes = [process.wait(timeout=600) for process, _ in nodes]
    logs = [(tmp_path / f"node{r}.log").read_text() for r in ("0", "1")]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "rank 0 of world size 2" in logs[0] and "rank 1 of world size 2" in logs[1]
    assert "test WER" in logs[0]
    assert (tmp_path / "shared" / "wer_test.txt").exists()


def test_two_nodes_that_do_not_share_the_output_folder_stop_at_once_with_one_line(tmp_path):
    """Two "nodes" on localhost whose output_folders differ, as on two machines
    without a shared file system: both stop before anything is written."""
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = []
    for node_rank in ("0", "1"):
        command = [str(ROOT / "launch_ddp.sh"), *FAST, f"--output_folder={tmp_path / f'node{node_rank}'}",
                   f"--wavlm_source={tmp_path / 'wavlm-small'}"]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env, "NODE_RANK": node_rank},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=300) for process in nodes]
    assert [process.returncode for process in nodes] == [2, 2] or all(p.returncode != 0 for p in nodes)
    for stdout, stderr in outputs:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr[-3000:]
        assert "rank 1 on " in errors[0] and "cannot see the output_folder=" in errors[0]
        assert "file system shared by all nodes" in errors[0] and "--output_folder" in errors[0]
        assert "Going into epoch" not in stdout + stderr
    assert not (tmp_path / "node0").exists() and not (tmp_path / "node1").exists()  # nothing written


def test_debug_mode_with_several_epochs_finishes_on_two_ranks(tmp_path):
    """The hang of issue 13: in debug mode every rank had its own checkpoint folder,
    and from epoch 3 on rank 0 deleted checkpoints that rank 1 did not see."""
    command = [str(ROOT / "launch_ddp.sh"), "--debug", "--debug_epochs=4", "--debug_batches=2", "--noprogressbar",
               f"--output_folder={tmp_path / 'run'}", f"--wavlm_source={tmp_path / 'wavlm-small'}"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "MASTER_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "epoch 4: train loss" in log and "test WER" in log
    assert "Debug mode: every rank checkpoints into" in log
    assert not list((tmp_path / "run").glob("debug-checkpoints-*"))  # removed at exit


def test_a_run_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before(tmp_path):
    out = tmp_path / "run"
    command = [str(ROOT / "launch_ddp.sh"), "--debug", "--debug_batches=2", "--debug_epochs=2",
               "--debug_persistently", "--noprogressbar", f"--output_folder={out}",
               f"--wavlm_source={tmp_path / 'wavlm-small'}"]
    run = lambda: subprocess.run(command, cwd=ROOT, env={**os.environ, "MASTER_PORT": str(free_port())},
                                 capture_output=True, text=True, timeout=300)
    first = run()
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    checkpoints = sorted((out / "save").glob("CKPT+*"))
    assert len(checkpoints) == 2  # both epochs kept (keep_latest_checkpoints: 2)
    newest = checkpoints[-1] / "wavlm.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a save cut in half
    second = run()
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert f"Checkpoint {checkpoints[-1]} is damaged (wavlm.ckpt do(es) not load)" in log
    assert "resumed from checkpoint: epoch 2" in log and "test WER" in log


def test_sharded_evaluation_on_two_ranks_gives_the_single_process_wer(tmp_path):
    out = tmp_path / "run"
    # debug_batches=10 covers the whole test set (50 utterances, batches of 16) on one process too
    common = [f"--output_folder={out}", f"--wavlm_source={tmp_path / 'wavlm-small'}", "--noprogressbar",
              "--debug", "--debug_batches=10", "--debug_epochs=1", "--debug_persistently"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    two = subprocess.run([str(ROOT / "launch_ddp.sh"), *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    sharded = (out / "wer_test.txt").read_text()
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--test_only"],
                         cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    single = (out / "wer_test.txt").read_text()
    assert sharded.splitlines()[0] == single.splitlines()[0]  # %WER x [ edits / words, ins, del, sub ]
    ids = lambda text: sorted(line.split(",")[0] for line in text.splitlines() if line.startswith("test-"))
    assert ids(sharded) == ids(single) and len(ids(single)) == 50


def run_train(tmp_path, *args):
    """train.py on one process (no torchrun), outputs under tmp_path."""
    command = [sys.executable, str(ROOT / "train.py"), *args, f"--wavlm_source={tmp_path / 'wavlm-small'}",
               "--noprogressbar"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layerdrop=1.5"], "error: layerdrop=1.5 is outside [0, 1)"),
        (["--precision=fp16"], "error: precision=fp16 needs a CUDA GPU"),
        (["--data_folder=/no/such/place"], "error: data_folder=/no/such/place does not exist"),
        (["--layerdorp=0.5"], "error: --layerdorp is not a key of " + str(ROOT / "hparams" / "demo.yaml")
         + ": did you mean --layerdrop?"),
        (["hparams/no_such.yaml"], "error: the hparams file hparams/no_such.yaml does not exist"),
        (["--number_of_epochs=0"], "error: number_of_epochs=0 is not an integer >= 1: set --number_of_epochs="),
        (["--dynamic_batch_sampler={max_batch_length: 0}"],
         "error: dynamic_batch_sampler.max_batch_length=0 is not a number > 0: set --dynamic_batch_sampler="),
    ],
)
def test_invalid_hparams_stop_at_start_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_train(tmp_path, *args, f"--output_folder={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_manifest_rows_stop_the_run_or_are_skipped_when_asked(tmp_path):
    demo = ROOT / "recipes" / "demo_data"
    rows = (demo / "train.csv").read_text().splitlines()
    broken = tmp_path / "train.csv"
    broken.write_text("\n".join(rows + ["ghost-0001,1.5,$data_root/audio/ghost.ogg,x,SIX RED CAT SEES THE DOG"]) + "\n")
    out = tmp_path / "out"
    stopped = run_train(tmp_path, f"--train_csv={broken}", f"--output_folder={out}")
    assert stopped.returncode == 2
    assert f"{broken}:{len(rows) + 1} (ghost-0001): missing file" in stopped.stderr
    assert "--skip_invalid=True" in stopped.stderr
    assert not out.exists()

    skipped = run_train(tmp_path, f"--train_csv={broken}", f"--output_folder={out}", "--skip_invalid=True",
                        *FAST)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skip_invalid: 1 utterance(s) left out" in skipped.stdout + skipped.stderr


@pytest.mark.parametrize(
    "duration,message",
    [("abc", "duration 'abc' is not a number of seconds > 0"),
     ("samples", "durations must be in seconds, this looks like samples")],
    ids=["not-a-number", "samples"],
)
def test_a_bad_duration_column_stops_the_launch_naming_the_row_and_writes_nothing(tmp_path, duration, message):
    rows = (ROOT / "recipes" / "demo_data" / "train.csv").read_text().splitlines()
    fields = rows[1].split(",")
    fields[1] = str(round(float(fields[1]) * 16000)) if duration == "samples" else duration
    broken = tmp_path / "train.csv"
    broken.write_text("\n".join([rows[0], ",".join(fields)] + rows[2:]) + "\n")
    result, out = launch(tmp_path, f"--train_csv={broken}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-3000:]
    assert f"{broken}:2 ({fields[0]}): " in result.stderr and message in result.stderr
    assert "could not convert string to float" not in result.stderr
    assert not out.exists()


def test_a_split_left_empty_stops_the_run_naming_it_before_anything_is_written(tmp_path):
    header = (ROOT / "recipes" / "demo_data" / "valid.csv").read_text().splitlines()[0]
    empty = tmp_path / "valid.csv"
    empty.write_text(header + "\n")
    result, out = launch(tmp_path, f"--valid_csv={empty}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0] == f"error: the valid split is empty: {empty} has no rows: fix the manifest " \
                                   "or the settings named there"
    assert not out.exists()


def test_a_second_run_with_another_configuration_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    first = run_train(tmp_path, f"--output_folder={out}", *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(tmp_path, f"--output_folder={out}", "--layerdrop=0.3", *FAST)
    assert second.returncode == 2
    assert "changed: layerdrop" in second.stderr and "--resume=True" in second.stderr
    again = run_train(tmp_path, f"--output_folder={out}", "--layerdrop=0.3", "--overwrite=True", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]


def worker_pid(marker, rank):
    """The pid of the torchrun worker of `rank` whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(marker.encode() in part for part in cmdline) and f"RANK={rank}".encode() in environ \
                and b"train.py" in b" ".join(cmdline):
            return int(proc.name)
    return None


def signal_rank1_after_first_checkpoint(tmp_path, sig, *args, on_signal=None):
    """Train one epoch through launch_ddp.sh --max-restarts 1 with a checkpoint every 5
    steps; once the first one is on disk, send `sig` to rank 1 (then call
    `on_signal(log_path)`), and return the exit code and the whole log."""
    out = tmp_path / "run"
    log_path = tmp_path / "run.log"
    command = [str(ROOT / "launch_ddp.sh"), "--max-restarts", "1", f"--output_folder={out}",
               f"--wavlm_source={tmp_path / 'wavlm-small'}", "--noprogressbar", "--number_of_epochs=1",
               "--ckpt_interval_steps=5", *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MASTER_PORT": str(free_port())})
        deadline = time.time() + 600  # generous: a loaded CI machine starts slowly
        while not any((c / "CKPT.yaml").exists() for c in (out / "save").glob("CKPT+*")):
            assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        victim = worker_pid(str(out), rank=1)
        assert victim is not None
        os.kill(victim, sig)
        if on_signal is not None:
            on_signal(log_path)
        code = process.wait(timeout=600)
    return code, log_path.read_text()


def test_a_killed_worker_is_restarted_and_training_resumes_from_the_last_checkpoint(tmp_path):
    code, text = signal_rank1_after_first_checkpoint(tmp_path, signal.SIGKILL)
    assert code == 0, text[-3000:]
    resumed = re.search(r"resumed from checkpoint: epoch 1, batch (\d+) of the epoch, optimizer step (\d+)", text)
    assert resumed, text[-3000:]
    assert int(resumed.group(2)) > 0 and int(resumed.group(2)) % 5 == 0
    per_epoch = int(re.search(r"(\d+) optimizer steps per epoch", text).group(1))
    final = int(re.search(r"epoch 1: train loss .*\(optimizer step (\d+)\)", text).group(1))
    assert final == per_epoch  # nothing skipped, nothing counted twice
    assert "test WER" in text


def test_a_frozen_worker_makes_the_other_ranks_watchdog_restart_the_run(tmp_path):
    """SIGSTOP freezes rank 1 in the middle of the epoch: rank 0 waits in a collective,
    its watchdog fires after hang_timeout_minutes, torchrun ends the group and
    restarts it, and training resumes from the last checkpoint and finishes."""

    def watchdog_fires_in_time(log_path):
        frozen_at = time.time()
        while "watchdog: rank 0" not in log_path.read_text():
            assert time.time() - frozen_at < 60, log_path.read_text()[-3000:]  # 15 s timeout, 4 s checks
            time.sleep(0.5)

    code, text = signal_rank1_after_first_checkpoint(tmp_path, signal.SIGSTOP, "--hang_timeout_minutes=0.25",
                                                     on_signal=watchdog_fires_in_time)
    assert code == 0, text[-3000:]
    line = next(l for l in text.splitlines() if "watchdog: rank 0" in l)
    assert "made no progress for" in line
    assert re.search(r"last progress: (training step \d+|checkpoint saved)", line)
    assert "Thread 0x" in text or "Current thread 0x" in text  # the stacks follow the line
    assert re.search(r"resumed from checkpoint: epoch 1, batch \d+ of the epoch, optimizer step \d+", text)
    assert "test WER" in text


def test_max_duration_leaves_longer_training_utterances_out_with_one_line_and_the_run_proceeds(tmp_path):
    out = tmp_path / "out"
    result = run_train(tmp_path, "--max_duration=1.5", "--check_only", "--world_size=2", f"--output_folder={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert ("max_duration=1.5 s: left out 760 of 800 training utterances (0.40 h of 0.42 h, 96.1 % of the audio) "
            "longer than it") in output
    assert "bad row" not in output
    assert "checks passed for world size 2" in output
