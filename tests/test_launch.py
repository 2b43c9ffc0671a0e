"""End to end through launch_ddp.sh: 2 CPU gloo processes train the demo config.

This is the CI smoke test, and the acceptance commands of the LayerDrop issue."""

import os
import subprocess
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
    assert "steps each layer was dropped" in log


def test_layerdrop_with_find_unused_parameters_false_stops_before_step_1_with_one_line(tmp_path):
    result, _ = launch(tmp_path, "--layerdrop=0.5", "--find_unused_parameters=False")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "--find_unused_parameters=True" in errors[0]
    assert "Going into epoch" not in result.stdout + result.stderr
    assert "Expected to have finished reduction" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [["--layerdrop=0.0", "--find_unused_parameters=False"], ["--layerdrop=0.5", "--layerdrop_mode=independent"]],
    ids=["layerdrop0-no-find-unused", "independent"],
)
def test_other_supported_configurations_train_and_exit_0(tmp_path, args):
    assert_trained(*launch(tmp_path, *args))


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


def test_sharded_evaluation_on_two_ranks_gives_the_single_process_wer(tmp_path):
    out = tmp_path / "run"
    common = [f"--output_folder={out}", f"--wavlm_source={tmp_path / 'wavlm-small'}", "--noprogressbar",
              "--number_of_epochs=1"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    two = subprocess.run([str(ROOT / "launch_ddp.sh"), *common, "--optimizer_step_limit=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    sharded = (out / "wer_test.txt").read_text()
    one = subprocess.run(["python3", str(ROOT / "train.py"), *common, "--test_only"],
                         cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    single = (out / "wer_test.txt").read_text()
    assert sharded.splitlines()[0] == single.splitlines()[0]  # %WER x [ edits / words, ins, del, sub ]
    ids = lambda text: sorted(line.split(",")[0] for line in text.splitlines() if line.startswith("test-"))
    assert ids(sharded) == ids(single) and len(ids(single)) == 40
