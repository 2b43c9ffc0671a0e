"""One YAML on any number of ranks, through launch_ddp.sh on 2 CPU gloo processes
or 1: the same global batch, optimizer steps and learning rates, from CSV manifests,
a save_to_disk dataset and parquet shards alike; a preempted run resumed on another
world size continues the schedule row for row; one run per output folder; the checks
run once, before the workers. (A killed or frozen worker and its restart: test_exact_resume.py.)"""

import csv
import os
import shutil
import sys
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from wavlm_ddp.encoder.loading import make_local_checkpoint
from helpers import demo_slice, free_port, hf_copies, wait_for, worker_pid

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
ROWS = {"train": 72, "valid": 8, "test": 8}  # a slice of the demo corpus: about 5 optimizer steps per epoch


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(folder, manifest arguments) for a slice of the demo corpus; the same slice as
    parquet shards and as a save_to_disk DatasetDict without a duration column
    (helpers.hf_copies) lie in folder / "parquet" and folder / "save_to_disk"."""
    folder = tmp_path_factory.mktemp("world_size")
    manifests = demo_slice(folder, ROWS)
    hf_copies(folder, manifests, DEMO)
    # The demo model made once, before any run: every run here finds it.
    from hyperpyyaml import load_hyperpyyaml

    demo = load_hyperpyyaml((ROOT / "hparams" / "demo.yaml").read_text())["wavlm"].keywords
    make_local_checkpoint(folder / "wavlm-small", demo["init_config"], demo["init_seed"])
    return folder, [f"--{split}_csv={path}" for split, path in manifests.items()]


def parquet_args(corpus):
    return [f"--{split}_data={corpus[0] / 'parquet' / split}" for split in ROWS]


def save_to_disk_args(corpus):
    return [*(f"--{split}_data={corpus[0] / 'save_to_disk'}" for split in ROWS),
            "--hf_columns={id: id, audio: audio, text: text, duration: null}"]


def start(corpus, nproc, name, *args, log=""):
    """launch_ddp.sh with NPROC_PER_NODE=nproc, 2 epochs; returns (process, output folder, log path)."""
    folder, manifests = corpus
    out, log_path = folder / name, folder / f"{name}-{nproc}{log}.log"
    command = [str(ROOT / "launch_ddp.sh"), *manifests, "--number_of_epochs=2", "--noprogressbar",
               f"--output_folder={out}", f"--wavlm_source={folder / 'wavlm-small'}", *args]
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port())}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, out, log_path


def finish(process, log_path):
    code = process.wait(timeout=600)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    return text


def step_rows(out):
    """train_steps.csv as a list of (step, epoch, lr_wavlm, lr_head, encoder_frozen, the
    fingerprint of the step's global batch: the sum of its utterance IDs' CRC-32)."""
    with open(out / "train_steps.csv", newline="") as f:
        return [(int(r["step"]), int(r["epoch"]), r["lr_wavlm"], r["lr_head"], r["encoder_frozen"],
                 int(r["batch_ids_crc_sum"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def reference_runs(corpus):
    """The YAML trained uninterrupted by 2 ranks from the CSV manifests, and checked
    (--check_only: nothing to train) for 1 process from the save_to_disk copy:
    {nproc: (log, output folder)}. (Training on 1 process, accumulating, against 2 ranks:
    the preempted run below, which trains on both.)"""
    process, out, log_path = start(corpus, 2, "reference2", "--freeze_encoder=0.2")
    runs = {2: (finish(process, log_path), out)}
    folder, manifests = corpus
    out = folder / "reference1"
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *manifests, "--number_of_epochs=2",
                          "--freeze_encoder=0.2", "--noprogressbar", f"--output_folder={out}",
                          f"--wavlm_source={folder / 'wavlm-small'}", "--check_only", "--world_size=1",
                          *save_to_disk_args(corpus)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    runs[1] = one.stdout + one.stderr, out
    return runs


def plan_line(log):
    lines = [line for line in log.splitlines() if "global batch: world size" in line]
    assert len(lines) == 1, log[-3000:]  # printed once, by launch_ddp.sh's check
    return lines[0][lines[0].index("global batch:"):]


def test_one_process_accumulating_and_two_ranks_plan_the_same_global_batch_and_optimizer_steps(reference_runs):
    (two_log, two_out), (one_log, _) = reference_runs[2], reference_runs[1]
    two, one = plan_line(two_log), plan_line(one_log)
    assert two.startswith("global batch: world size 2 x 12 s per rank x accumulation 1 = 24 s")
    assert one.startswith("global batch: world size 1 x 12 s per rank x accumulation 2 = 24 s")
    assert two.split(" = ")[1] == one.split(" = ")[1]  # the same audio per step and the same optimizer steps
    total = int(re.search(r"= (\d+) optimizer steps$", two).group(1))
    rows = step_rows(two_out)
    assert [r[0] for r in rows] == list(range(total))
    assert {r[4] for r in rows} == {"0", "1"} and rows[0][2] == "0.000000e+00"  # frozen first, then trained
    assert re.search(rf"epoch 2: train loss .*\(optimizer step {total}\)", two_log), two_log[-3000:]
    assert "schedule wavlm (optimizer steps): frozen for steps 0-" in two_log + one_log


def test_the_workers_reuse_the_manifest_check_of_launch_ddp_sh(reference_runs):
    log, out = reference_runs[2]
    assert "checks passed for world size" in log
    assert "manifests unchanged since their last check" in log  # rank 0 did not read the audio again
    assert (out / "save" / "manifest_check.json").exists()


def alignments(wer_file):
    """(the summary line, the per-utterance blocks sorted) of a wer_test.txt."""
    text = wer_file.read_text()
    blocks = [block.strip() for block in text.split("=" * 80) if block.strip().startswith("test-")]
    return text.splitlines()[0], sorted(blocks)


def test_sharded_evaluation_on_two_ranks_gives_the_single_process_wer(reference_runs, corpus):
    """The 2-rank run's checkpoint, given a head that emits text (test_last_mile.emit_text:
    the run's own transcripts are empty), evaluated on the test set by 2 ranks, each its
    shard (--test_only, in a copy of the run folder), and transcribed by one process
    (wavlm_ddp.transcribe --beam): the same hypotheses utterance by utterance, so the same
    WER line."""
    from speechbrain.utils.metric_stats import ErrorRateStats
    from test_last_mile import emit_text
    from wavlm_ddp.transcribe import main as transcribe

    folder, _ = corpus
    copy = folder / "sharded-copy"
    shutil.copytree(reference_runs[2][1], copy, ignore=shutil.ignore_patterns(".run-lock*"))
    # One checkpoint, so that both pick the same: the run's empty transcripts tie every valid WER.
    for older in sorted((copy / "save").glob("CKPT+*"), key=lambda c: (c / "CKPT.yaml").stat().st_mtime)[:-1]:
        shutil.rmtree(older)
    emit_text(copy)
    process, _, log_path = start(corpus, 2, copy.name, "--freeze_encoder=0.2", "--test_only", "--resume=True")
    finish(process, log_path)
    sharded = alignments(copy / "wer_test.txt")
    # wer_test.txt holds the run's best decoding: its beam search with the LM, as --beam decodes.
    hypotheses, failed = transcribe([str(copy), "--csv", str(folder / "test.csv"), "--data_root", str(DEMO), "--beam"])
    assert not failed
    references = {row["ID"]: row["wrd"].split() for row in csv.DictReader(open(folder / "test.csv", newline=""))}
    single = ErrorRateStats()
    single.append(list(references), [dict(hypotheses)[key].split() for key in references], list(references.values()))
    (folder / "single_wer.txt").write_text("")
    with open(folder / "single_wer.txt", "w") as f:
        single.write_stats(f)
    one = alignments(folder / "single_wer.txt")
    assert sharded == one  # %WER x [ edits / words, ins, del, sub ], then each utterance's alignment
    summary, blocks = one
    assert len(blocks) == ROWS["test"]
    assert re.search(r" (\d+) sub \]", summary).group(1) != "0", summary  # the hypotheses hold words


def test_a_save_to_disk_dataset_without_durations_is_measured_once_and_kept(reference_runs):
    log, out = reference_runs[1]  # by the check alone
    durations = list((out / "save").glob("manifest_check.*.durations.npy"))
    assert sorted(p.name.split(".")[1] for p in durations) == ["test", "train", "valid"]


def test_transcribe_and_tune_decoding_read_a_parquet_split_like_its_manifest(preempted_run, corpus, monkeypatch):
    from wavlm_ddp import tune_decoding
    from wavlm_ddp.inference import TrainedModel, Transcriber
    from wavlm_ddp.transcribe import main as transcribe

    _, out = preempted_run  # trained from the parquet shards
    folder, _ = corpus
    parquet = folder / "parquet"
    # The model's transcripts are empty (a few steps of training): what is compared is
    # what the decoder gets, each utterance's log-probabilities.
    decoded, decode = [], Transcriber.decode

    def recorded(self, log_probs, wav_lens):  # the decoder's input, then the decoding
        decoded.append(log_probs[0].clone())
        return decode(self, log_probs, wav_lens)

    monkeypatch.setattr(Transcriber, "decode", recorded)
    from_hf, failed = transcribe([str(out), "--data", str(parquet / "test")])
    from_csv, _ = transcribe([str(out), "--csv", str(folder / "test.csv"), "--data_root", str(DEMO)])
    assert not failed and dict(from_hf) == dict(from_csv) and len(from_hf) == ROWS["test"]
    hf_log_probs, csv_log_probs = dict(zip(dict(from_hf), decoded)), dict(zip(dict(from_csv), decoded[len(from_hf):]))
    assert len(decoded) == 2 * ROWS["test"] and hf_log_probs.keys() == csv_log_probs.keys()
    for key, log_probs in hf_log_probs.items():
        torch.testing.assert_close(log_probs, csv_log_probs[key], msg=key)
    model = TrainedModel(out)
    hf_valid = tune_decoding.valid_set(model.hparams)
    csv_valid = tune_decoding.valid_set({**model.hparams, "valid_data": None, "valid_csv": str(folder / "valid.csv"),
                                         "data_folder": str(DEMO)})
    assert [(i, w) for i, _, w in hf_valid] == [(i, w) for i, _, w in csv_valid]
    for (_, audio, _), (_, path, _) in zip(hf_valid, csv_valid):
        assert model.load(audio).equal(model.load(path))


def wait_rows(out, process, log_path, count):
    """Wait until train_steps.csv has `count` rows (or fail with the log)."""
    wait_for(lambda: (out / "train_steps.csv").exists() and len(step_rows(out)) >= count, process, log_path)


@pytest.fixture(scope="session")
def preempted_run(corpus):
    """The reference configuration, from the parquet shards, stopped twice and rerun to
    the end, each time on another world size: 2 ranks, SIGUSR1 to rank 1 alone; 1
    process (accumulating 2 batches), SIGTERM to launch_ddp.sh; 2 ranks to the end.
    Meanwhile a second launch on the same folder. {name: (exit status, log), "first":
    the rows logged by the first 2-rank launch}, the output folder."""
    args = ("--freeze_encoder=0.2", *parquet_args(corpus))
    runs = {}
    process, out, log_path = start(corpus, 2, "preempted", *args)
    lock = out / ".run-lock.json"
    wait_for(lock.exists, process, log_path, timeout=300, poll=0.05)  # taken by launch_ddp.sh's check, before the workers
    holder = lock.read_text()
    second, _, second_log = start(corpus, 2, "preempted", *args, log="second")
    runs["second"] = second.wait(timeout=600), second_log.read_text()
    runs["holder_kept"] = lock.read_text() == holder
    wait_rows(out, process, log_path, 2)
    os.kill(worker_pid(str(out), rank=1), signal.SIGUSR1)
    runs["rank1"] = process.wait(timeout=600), log_path.read_text()
    runs["first"] = (out / "train_steps.csv").read_text().splitlines()
    rows = len(step_rows(out))
    process, _, log_path = start(corpus, 1, "preempted", *args, log="again")  # resumed on 1 process
    wait_rows(out, process, log_path, rows + 2)
    os.kill(process.pid, signal.SIGTERM)  # the launcher
    runs["launcher"] = process.wait(timeout=600), log_path.read_text()
    process, _, log_path = start(corpus, 2, "preempted", *args, log="last")  # and on 2 ranks again
    runs["last"] = process.wait(timeout=600), log_path.read_text()
    return runs, out


def test_a_preempted_run_saves_at_the_next_step_and_resumes_there_on_any_world_size_as_if_never_stopped(preempted_run,
                                                                                      reference_runs):
    runs, out = preempted_run
    for name, who in (("rank1", "a signal on another rank"), ("launcher", "SIGTERM")):
        code, log = runs[name]
        assert code == 75, log[-3000:]  # launch_ddp.sh's preemption status
        assert f"preempted by {who}: checkpoint saved after optimizer step" in log, log[-3000:]
        assert "Traceback" not in log and "SignalException" not in log and "ChildFailedError" not in log
    code, log = runs["last"]
    assert code == 0, log[-3000:]
    for name, world, accumulation in (("launcher", 1, 2), ("last", 2, 1)):
        resumed = re.search(r"resumed from checkpoint: epoch (\d), batch (\d+) of the epoch, optimizer step (\d+) of "
                            r"(\d+)", runs[name][1])
        assert resumed and 0 < int(resumed.group(3)) < int(resumed.group(4)), runs[name][1][-3000:]
        if int(resumed.group(2)) > 0:  # mid-epoch: translated into this world size's micro-batches
            assert f"resuming mid-epoch with world size {world} x accumulation {accumulation}" in runs[name][1]
    # Row for row what the uninterrupted run logged: no step lost, none repeated, on any world size,
    # and each step's global batch the same utterances (2 ranks' micro-batches, or 1 process's 2
    # accumulated ones: the fingerprint of their IDs).
    rows = step_rows(out)
    assert rows == step_rows(reference_runs[2][1])
    assert {row[1] for row in rows} == {1, 2}
    for epoch in (1, 2):
        fingerprints = [row[5] for row in rows if row[1] == epoch]
        assert 0 not in fingerprints and len(set(fingerprints)) == len(fingerprints)  # each step its own utterances


def test_parquet_shards_give_the_manifests_batches_and_losses(preempted_run, reference_runs):
    """Until its first preemption the parquet run is the CSV reference's configuration
    on the same 2 ranks: the same audio in the same batches, so the same losses."""
    runs, _ = preempted_run
    first = runs["first"]
    assert len(first) > 2  # the header and at least 2 steps
    assert first == (reference_runs[2][1] / "train_steps.csv").read_text().splitlines()[: len(first)]
    assert plan_line(runs["rank1"][1]) == plan_line(reference_runs[2][0])


def test_a_second_run_on_a_folder_in_use_stops_with_one_line_and_writes_nothing(preempted_run, reference_runs):
    runs, out = preempted_run
    code, log = runs["second"]
    assert code == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == log.strip().splitlines()[-1]
    assert f"error: output_folder={out} is in use by the run WAVLM_RUN_ID=" in errors[0]
    assert "(pid " in errors[0] and "choose another --output_folder" in errors[0]
    assert runs["holder_kept"] and "Experiment folder" not in log and "rank 0 of world size" not in log
    assert step_rows(out) == step_rows(reference_runs[2][1])  # the first run as if alone


def test_a_bad_manifest_stops_launch_ddp_sh_once_with_the_error_as_the_last_line(corpus, tmp_path):
    folder, _ = corpus
    lines = (folder / "train.csv").read_text().splitlines()
    broken = tmp_path / "train.csv"
    broken.write_text("\n".join(lines + ["ghost,1.5,$data_root/audio/ghost.ogg,x,SIX RED CAT"]) + "\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [str(ROOT / "launch_ddp.sh"), f"--train_csv={broken}", f"--output_folder={out}", "--noprogressbar"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MASTER_PORT": str(free_port())})
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, output[-30:]
    errors = [i for i, line in enumerate(output) if line.startswith("error: ")]
    assert len(errors) == 1 and "--skip_invalid=True" in output[errors[0]]
    assert output[errors[0] + 1:] == [f"{broken}:{len(lines) + 1} (ghost): missing file: "
                                      "recipes/demo_data/audio/ghost.ogg"]
    text = "\n".join(output)
    assert "ChildFailedError" not in text and "Traceback" not in text and "rank 0 of world size" not in text
    assert not out.exists()
