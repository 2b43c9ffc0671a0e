"""The parts of a stop request that a launch test cannot time exactly: the request
that arrives before a worker's handlers exist, what the ranks exit with, and the
DataLoader processes that get the cluster's signal too."""

import multiprocessing
import os
import signal

import pytest
import torch

from wavlm_ddp.faults.preemption import (MARKER_ENV, PREEMPTED_EXIT_CODE, STOP_FILE_ENV, Preempted, PreemptionWatch,
                                         end_loader_workers, exit_code_after_preemption, ignore_in_loader_workers,
                                         stop_point)


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_stop_the_launcher_wrote_before_the_handlers_existed_is_seen_at_the_next_stop_point(tmp_path, monkeypatch,
                                                                                             restore_signals):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))
    watch = PreemptionWatch(["SIGTERM", "SIGUSR1"]).start()
    stop_point(watch, "before step 1")  # nothing asked: passes
    stop_file.write_text("SIGUSR1\n")  # launch_ddp.sh got it while this process was importing torch
    with pytest.raises(Preempted, match="^SIGUSR1 before step 1$"):
        stop_point(watch, "before step 1")
    watch.stop()


def test_a_signal_is_recorded_and_an_empty_preempt_signals_gives_the_signals_their_default_action(tmp_path, monkeypatch,
                                                                                                 restore_signals):
    monkeypatch.setenv(STOP_FILE_ENV, str(tmp_path / "stop"))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as launch_ddp.sh starts its children
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    watch = PreemptionWatch(["SIGTERM", "SIGUSR1"]).start().watch(["SIGUSR1"])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # not watched: its default action back
    (tmp_path / "stop").write_text("SIGTERM\n")
    assert not watch.requested  # the launcher's file names a signal this run does not watch
    os.kill(os.getpid(), signal.SIGUSR1)
    assert watch.requested and watch.received == "SIGUSR1"
    watch.stop()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # as started: a late signal cannot kill the exit
    off = PreemptionWatch(["SIGTERM"]).start().watch([])
    assert not off.requested and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("env, code, marker", [
    ({"TORCHELASTIC_RUN_ID": "r", MARKER_ENV: "set"}, 0, True),  # launch_ddp.sh's torchrun: the launcher exits 75
    ({"TORCHELASTIC_RUN_ID": "r"}, PREEMPTED_EXIT_CODE, False),  # a plain torchrun: reported as failed, not finished
    ({}, PREEMPTED_EXIT_CODE, False),  # one process
    ({MARKER_ENV: "set"}, PREEMPTED_EXIT_CODE, False),  # launch_ddp.sh's single-process check
])
def test_a_preempted_rank_exits_0_only_where_the_launcher_turns_its_marker_into_75(tmp_path, monkeypatch, env, code,
                                                                                  marker):
    for key in ("TORCHELASTIC_RUN_ID", MARKER_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(tmp_path / "marker") if value == "set" else value)
    assert exit_code_after_preemption() == code
    assert (tmp_path / "marker").exists() == marker


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        return torch.tensor([index])


def test_loader_processes_ignore_the_clusters_signal_and_end_with_their_rank(restore_signals):
    """SLURM signals every process, the loader's too: the batches keep coming, and
    the loader processes of an unfinished epoch are ended when the rank stops."""
    signal.signal(signal.SIGTERM, lambda *_: None)  # the rank's own handler (PreemptionWatch)
    loader = torch.utils.data.DataLoader(Slow(), batch_size=2, num_workers=2,
                                         worker_init_fn=ignore_in_loader_workers(["SIGTERM", "SIGUSR1"]))
    batches = iter(loader)
    seen = [next(batches), next(batches)]  # one batch from each loader process: both have started
    children = multiprocessing.active_children()
    assert len(children) == 2
    for child in children:
        os.kill(child.pid, signal.SIGTERM)
        os.kill(child.pid, signal.SIGUSR1)
    seen += list(batches)  # no "DataLoader worker ... killed by signal"
    assert torch.cat(seen).flatten().tolist() == list(range(40))
    unfinished = iter(loader)
    next(unfinished)  # a preemption mid-epoch leaves this iterator open
    assert len(multiprocessing.active_children()) == 2
    end_loader_workers()
    assert multiprocessing.active_children() == []
