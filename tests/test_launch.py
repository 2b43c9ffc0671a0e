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
    command = [str(ROOT / "launch_ddp.sh"), *FAST, *args,
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
    """Three debug epochs: with a checkpoint folder per rank (SpeechBrain's debug mode),
    rank 0 deletes from epoch 3 on checkpoints that rank 1 does not see, and the ranks hang."""
    result, out = launch(tmp_path, "--layerdrop=0.5", "--debug_epochs=3", "--debug_batches=2")
    log = assert_trained(result, out)
    assert "epoch 3: train loss" in log
    assert "rank 0 of world size 2" in log and "rank 1 of world size 2" in log
    assert "find_unused_parameters=True set automatically" in log
    assert "DDP wraps the encoder with find_unused_parameters=True; training precision fp32" in log
    assert "steps each layer was dropped" in log
    assert "Debug mode: every rank checkpoints into" in log
    assert not list(out.glob("debug-checkpoints-*"))  # removed at exit


def slurm_job_id():
    """A job id whose derived port (20000 + id % 20000, launch_ddp.sh) is free here."""
    for _ in range(50):
        port = free_port()
        if 20000 <= port < 40000:
            return str(port - 20000)
    pytest.fail("no free port in 20000-39999")


def test_two_nodes_started_by_srun_train_as_one_job_from_slurms_environment(tmp_path):
    """What `srun --ntasks-per-node=1 ./launch_ddp.sh` gives each node, on localhost:
    no NNODES, NODE_RANK or MASTER_ADDR; the node list names the head node first.
    The job trains in bf16, without LayerDrop and without find_unused_parameters (the
    other supported configuration of DDP)."""
    job = slurm_job_id()
    env = {"SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
           "NPROC_PER_NODE": "1"}
    nodes = []
    for node_rank in ("0", "1"):
        command = [str(ROOT / "launch_ddp.sh"), *FAST, f"--output_folder={tmp_path / 'shared'}",
                   f"--wavlm_source={tmp_path / 'wavlm-small'}", "--layerdrop=0.0", "--find_unused_parameters=False",
                   "--precision=bf16"]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
        nodes.append(subprocess.Popen(command, cwd=ROOT, env={**clean, **env, "SLURM_NODEID": node_rank},
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    codes = [process.wait(timeout=600) for process in nodes]
    logs = [(tmp_path / f"node{r}.log").read_text() for r in ("0", "1")]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "rank 0 of world size 2" in logs[0] and "rank 1 of world size 2" in logs[1]
    assert "test WER" in logs[0]
    assert "DDP wraps the encoder with find_unused_parameters=False; training precision bf16" in logs[0]
    assert (tmp_path / "shared" / "wer_test.txt").exists()


@pytest.mark.parametrize("env,message", [
    ({"SLURM_NODEID": "2"}, "error: SLURM_NODEID=2 is not below the job's node count 2: start launch_ddp.sh with "
                            "srun, one task per node"),
    ({"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": ""},
     "error: SLURM job 4242 has 2 nodes but no SLURM_JOB_NODELIST to find the head node in: set MASTER_ADDR"),
    ({}, "error: SLURM job 4242 has 2 nodes but SLURM_NODEID is unset: start launch_ddp.sh with srun"),
], ids=["rank-beyond-count", "no-node-list", "no-node-id"])
def test_a_wrong_slurm_environment_is_one_error_line_and_exit_2(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in ("NNODES", "MASTER_ADDR")}
    full = {**clean, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", **env}
    result = subprocess.run([str(ROOT / "launch_ddp.sh"), f"--output_folder={tmp_path / 'out'}"], cwd=ROOT,
                            env=full, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.strip().startswith(message)
    assert not (tmp_path / "out").exists()


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


