"""Bad data, interrupted saves, non-finite losses and invalid hparams."""

import csv
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.utils.checkpoints import METAFNAME

from ddp_worker import results_of
from wavlm_ddp.faults.guards import NonFiniteGuard
from wavlm_ddp.faults.checkpoints import SafeCheckpointer
from wavlm_ddp.preflight import ConfigError, check_hparams, check_output_folder
from wavlm_ddp.data.manifests import (
    AudioLimits,
    BadRow,
    empty_splits,
    length_filter,
    read_manifest,
    training_charset,
    validate_manifests,
)
from wavlm_ddp.data.pipeline import dataio_prepare, read_datasets

ROOT = Path(__file__).resolve().parents[1]
LIMITS = AudioLimits(sample_rate=16000, resample=True, min_samples=400, duration_tolerance=0.1)


def tone(seconds, rate=16000, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([audio] * channels, axis=1) if channels > 1 else audio


def write_csv(path, rows, durations=None):
    """A manifest of (ID, wav, wrd) rows; the duration column is the audio's real
    length where it can be read (1.0 otherwise), or `durations[ID]` when given."""
    durations = durations or {}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writeheader()
        for utt_id, wav, wrd in rows:
            writer.writerow({"ID": utt_id, "duration": durations.get(utt_id, real_duration(path.parent, wav)),
                             "wav": wav, "spk_id": "s", "wrd": wrd})
    return path


def real_duration(root, wav):
    try:
        return str(sf.info(str(wav).replace("$data_root", str(root))).duration)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return "1.0"


@pytest.fixture
def audio_dir(tmp_path):
    sf.write(tmp_path / "good.wav", tone(1.0), 16000)
    sf.write(tmp_path / "rate8k.wav", tone(1.0, rate=8000), 8000)
    sf.write(tmp_path / "stereo.wav", tone(1.0, channels=2), 16000)
    sf.write(tmp_path / "short.wav", tone(0.0125), 16000)  # 200 samples
    sf.write(tmp_path / "long.wav", tone(3.0), 16000)
    sf.write(tmp_path / "full.flac", tone(2.0), 16000)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    return tmp_path


def test_every_kind_of_bad_row_is_reported_with_file_row_and_reason(audio_dir):
    train = write_csv(audio_dir / "train.csv", [
        ("ok", "$data_root/good.wav", "HELLO"),
        ("stereo", "$data_root/stereo.wav", "HELLO"),
        ("rate", "$data_root/rate8k.wav", "HELLO"),
        ("gone", "$data_root/missing.wav", "HELLO"),
        ("corrupt", "$data_root/garbage.wav", "HELLO"),
        ("cut", "$data_root/truncated.flac", "HELLO"),
        ("short", "$data_root/short.wav", "HELLO"),
        ("long", "$data_root/long.wav", "HELLO"),
        ("empty", "$data_root/good.wav", "  "),
        ("ok", "$data_root/good.wav", "HELLO"),
    ])
    test = write_csv(audio_dir / "test.csv", [("t1", "$data_root/good.wav", "HÉLLO")])
    bad = validate_manifests({"train": train, "test": test}, audio_dir, LIMITS, training_charset(train))
    found = {(b.file.split("/")[-1], b.row, b.utt_id, b.reason.split(":")[0].split(" (")[0]) for b in bad}
    assert "long" not in {b.utt_id for b in bad}  # a length limit filters; it is no data error
    assert found == {
        ("train.csv", 5, "gone", "missing file"),
        ("train.csv", 6, "corrupt", "unreadable or corrupt audio"),
        ("train.csv", 7, "cut", "unreadable or corrupt audio"),
        ("train.csv", 8, "short", "too short for the CNN"),
        ("train.csv", 10, "empty", "empty transcript"),
        ("train.csv", 11, "ok", "duplicate ID, first at " + str(train)),
        ("test.csv", 2, "t1", "characters the tokenizer cannot encode"),
    }


@pytest.mark.parametrize(
    "duration,reason",
    [
        ("abc", "duration 'abc' is not a number of seconds > 0"),
        ("", "duration '' is not a number of seconds > 0"),
        ("-1", "duration '-1' is not a number of seconds > 0"),
        ("16000", "duration column says 16000, the audio lasts 1.000 s (more than duration_tolerance=0.1 s "
                  "apart): durations must be in seconds, this looks like samples"),  # 1 s at 16 kHz
        ("1000", "duration column says 1000, the audio lasts 1.000 s (more than duration_tolerance=0.1 s "
                 "apart): durations must be in seconds, this looks like milliseconds"),
        ("1.5", "duration column says 1.5, the audio lasts 1.000 s (more than duration_tolerance=0.1 s apart)"),
    ],
)
def test_a_duration_column_that_is_no_length_in_seconds_is_a_bad_row(audio_dir, duration, reason):
    train = write_csv(audio_dir / "train.csv", [("ok", "$data_root/good.wav", "HELLO"),
                                                ("d", "$data_root/good.wav", "HELLO")], durations={"d": duration})
    bad = validate_manifests({"train": train}, audio_dir, LIMITS, training_charset(train))
    assert [(b.row, b.utt_id) for b in bad] == [(3, "d")]
    assert bad[0].reason == reason


def test_a_duration_within_the_tolerance_is_accepted(audio_dir):
    train = write_csv(audio_dir / "train.csv", [("d", "$data_root/good.wav", "HELLO")], durations={"d": "1.05"})
    assert validate_manifests({"train": train}, audio_dir, LIMITS, training_charset(train)) == []


def test_empty_splits_are_named_with_their_row_count_and_causes(audio_dir):
    empty = audio_dir / "valid.csv"
    empty.write_text("ID,duration,wav,spk_id,wrd\n")
    train = write_csv(audio_dir / "train.csv", [("a", "$data_root/garbage.wav", "HELLO"),
                                                ("b", "$data_root/missing.wav", "HELLO")])
    test = write_csv(audio_dir / "test.csv", [("t", "$data_root/good.wav", "HELLO")])
    csvs = {"train": train, "valid": empty, "test": test}
    bad = validate_manifests(csvs, audio_dir, LIMITS, training_charset(train))
    assert empty_splits(csvs, bad) == [
        f"the train split is empty after leaving out bad rows: all 2 row(s) of {train} are bad "
        "(missing file; unreadable or corrupt audio)",
        f"the valid split is empty: {empty} has no rows",
    ]


def test_the_manifest_reader_drops_left_out_rows_before_reading_their_duration(audio_dir):
    train = write_csv(audio_dir / "train.csv", [("ok", "$data_root/good.wav", "HELLO"),
                                                ("d", "$data_root/good.wav", "HELLO")], durations={"d": "abc"})
    rows = read_manifest(train, audio_dir, leave_out={"d"})
    assert rows == {"ok": {"duration": 1.0, "wav": f"{audio_dir}/good.wav", "spk_id": "s", "wrd": "HELLO"}}


def test_another_sample_rate_is_invalid_only_when_resampling_is_off(audio_dir):
    manifest = write_csv(audio_dir / "m.csv", [("rate", "$data_root/rate8k.wav", "HI")])
    strict = AudioLimits(16000, resample=False, min_samples=400, duration_tolerance=0.1)
    bad = validate_manifests({"train": manifest}, audio_dir, strict, {"H", "I"})
    assert [b.reason.split(" Hz")[0] for b in bad] == ["sample rate 8000"]
    assert validate_manifests({"train": manifest}, audio_dir, LIMITS, {"H", "I"}) == []


def test_a_manifest_without_the_required_columns_is_reported(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("ID,path,text\na,b,c\n")
    bad = validate_manifests({"train": path}, tmp_path, LIMITS, set())
    assert len(bad) == 1 and "missing column(s) duration, wav, wrd" in bad[0].reason


class CharTokenizer:
    def encode_as_ids(self, text):
        return [ord(c) for c in text]


def test_audio_is_downmixed_and_resampled_on_load(audio_dir):
    manifest = write_csv(audio_dir / "m.csv", [("stereo", "$data_root/stereo.wav", "A"),
                                               ("rate", "$data_root/rate8k.wav", "B")])
    hparams = {"data_folder": str(audio_dir), "train_csv": manifest, "valid_csv": manifest,
               "test_csv": manifest, "max_duration": 10.0, "sample_rate": 16000}
    data = dataio_prepare(hparams, CharTokenizer(), bad_rows=[])["train"]
    items = {item["id"]: item["sig"] for item in data}
    assert items["stereo"].shape == (16000,)
    assert items["rate"].shape == (16000,)
    torch.testing.assert_close(items["stereo"], torch.from_numpy(tone(1.0)).float(), atol=1e-4, rtol=0)


def test_skipped_rows_are_left_out_of_the_datasets(audio_dir):
    manifest = write_csv(audio_dir / "m.csv", [("a", "$data_root/good.wav", "A"), ("b", "$data_root/good.wav", "B")])
    hparams = {"data_folder": str(audio_dir), "train_csv": manifest, "valid_csv": manifest,
               "test_csv": manifest, "max_duration": 10.0, "sample_rate": 16000}
    data = dataio_prepare(hparams, CharTokenizer(), bad_rows=[BadRow(str(manifest), 2, "a", "empty transcript")])
    assert [item["id"] for item in data["test"]] == ["b"]


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(1))


class FailingSave:
    """A recoverable whose save dies half-way (like a kill during a save)."""

    def __init__(self):
        self.fail = False

    def save(self, path):
        if self.fail:
            raise KeyboardInterrupt("interrupted during the save")
        path.write_text("ok")

    def load(self, path, end_of_epoch):
        pass


def test_an_interrupted_save_is_never_loaded_and_is_removed(tmp_path):
    model, failing = Counter(), FailingSave()
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"a_model": model})
    checkpointer.add_recoverable("z_state", failing, custom_save_hook=FailingSave.save,
                                 custom_load_hook=FailingSave.load)
    model.value.data.fill_(1.0)
    checkpointer.save_checkpoint(meta={"WER": 50.0})
    model.value.data.fill_(2.0)
    failing.fail = True
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save_checkpoint(meta={"WER": 40.0})
    folders = sorted(tmp_path.glob("CKPT+*"))
    assert len(folders) == 2 and not (folders[-1] / METAFNAME).exists()  # the half-written one

    restored = Counter()
    reader = SafeCheckpointer(tmp_path, recoverables={"a_model": restored})
    checkpoint = reader.recover_if_possible()
    assert checkpoint.meta["WER"] == 50.0 and restored.value.item() == 1.0
    assert reader.remove_interrupted_saves() == [folders[-1]]
    assert sorted(tmp_path.glob("CKPT+*")) == folders[:1]


def test_the_best_wer_checkpoint_survives_later_worse_ones(tmp_path):
    model = Counter()
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"a_model": model})
    for epoch, wer in enumerate([30.0, 20.0, 25.0, 40.0, 35.0]):
        model.value.data.fill_(float(epoch))
        checkpointer.save_and_keep_only(meta={"WER": wer}, min_keys=["WER"])
        # an intra-epoch save, as SpeechBrain makes it
        checkpointer.save_and_keep_only(end_of_epoch=False, num_to_keep=1, meta={"intra": True},
                                        ckpt_predicate=lambda c: "intra" in c.meta)
    kept = {c.meta.get("WER") for c in checkpointer.list_checkpoints()}
    assert 20.0 in kept
    restored = Counter()
    SafeCheckpointer(tmp_path, recoverables={"a_model": restored}).recover_if_possible(min_key="WER")
    assert restored.value.item() == 1.0


def test_nonfinite_steps_are_skipped_then_stop_after_patience(caplog):
    guard = NonFiniteGuard(patience=2)
    assert guard.step_is_finite(torch.tensor(1.0))
    assert not guard.step_is_finite(torch.tensor(float("nan")))
    assert not guard.step_is_finite(torch.tensor(float("inf")))
    assert guard.step_is_finite(torch.tensor(0.5))  # a good step resets the run of bad ones
    assert not guard.step_is_finite(torch.tensor(float("nan")))
    assert not guard.step_is_finite(torch.tensor(float("nan")))
    with pytest.raises(ConfigError, match="nonfinite_patience=2.*--precision=bf16"):
        guard.step_is_finite(torch.tensor(float("nan")))
    assert guard.skipped_total == 5


def two_rank_plan(base, tiny_wavlm_dir):
    """The scenarios of this module that need two ranks (run in conftest's one 2-rank
    spawn for the whole suite, conftest.two_rank_scenarios), with their folders under `base`."""
    for name in ("own_folders", "damaged", "disk_full", "nan_in_backward", "nan_accumulated"):
        (base / name).mkdir()
    (base / "shared" / "node0" / "shards").mkdir(parents=True)
    (base / "shared" / "node0" / "shards" / "train-00000.parquet").write_bytes(b"PAR1")
    (base / "shared" / "node1").mkdir()
    return {
        "nonfinite": ("nonfinite_on_one_rank", dict(patience=2)),
        # Rank 1's loss NaN at micro-batch 2 of 3 (one per step), and at micro-batch 3 of 6 (two per
        # step: the first of step 2, whose gradients DDP all-reduces only with micro-batch 4).
        "nan_in_backward": ("nonfinite_in_ddp_training", dict(
            model_dir=str(tiny_wavlm_dir), base=str(base / "nan_in_backward"), accumulation=1, nan_at=2,
            micro_batches=3)),
        "nan_accumulated": ("nonfinite_in_ddp_training", dict(
            model_dir=str(tiny_wavlm_dir), base=str(base / "nan_accumulated"), accumulation=2, nan_at=3,
            micro_batches=6)),
        "checkpoints_seen_differently": ("checkpoints_seen_differently", dict(base=str(base / "own_folders"))),
        "damaged": ("damaged_checkpoints", dict(base=str(base / "damaged"))),
        "disk_full": ("disk_full_on_the_main_process", dict(base=str(base / "disk_full"))),
        "shared_folders": ("shared_folders_seen_differently", dict(base=str(base / "shared"))),
    }


@pytest.fixture(scope="module")
def two_ranks(two_rank_scenarios):
    """(this module's base folder, {name: each rank's result}) of two_rank_plan."""
    return two_rank_scenarios[__name__]


def test_a_nonfinite_loss_on_one_rank_makes_every_rank_skip(two_ranks):
    ranks = results_of(two_ranks[1], "nonfinite")
    for result in ranks:
        assert result["decisions"] == [True, False, False]
        assert "nonfinite_patience=2" in result["error"]


@pytest.mark.parametrize("scenario", ["nan_in_backward", "nan_accumulated"])
def test_a_nan_loss_on_one_rank_inside_ddps_backward_skips_the_whole_step_on_every_rank(two_ranks, scenario):
    """The recipe's fit_batch under DDP (train.ASR, 2 gloo ranks, each its own batches):
    rank 1's NaN loss goes through backward, and DDP's all-reduce puts NaN into every
    rank's gradients; every rank must then drop the step, also when the NaN came in
    an earlier micro-batch of an accumulated step. Optimizer steps 1 and 3 train;
    step 2 leaves every parameter exactly as it was, on both ranks."""
    ranks = results_of(two_ranks[1], scenario)
    for result in ranks:
        assert result["ddp"] and result["optimizer_step"] == 2 and result["skipped"] == 1
        before, after_nan = result["boundaries"][1], result["boundaries"][2]
        assert all(torch.equal(before[name], after_nan[name]) for name in before)
        for start, end in ((0, 1), (2, 3)):  # the steps around it trained
            first, last = result["boundaries"][start], result["boundaries"][end]
            assert not torch.equal(first["ctc_head.w.weight"], last["ctc_head.w.weight"])
            assert any(not torch.equal(first[n], last[n]) for n in first if n.startswith("wavlm."))
        assert all(torch.isfinite(value).all() for state in result["boundaries"] for value in state.values())
    for state0, state1 in zip(ranks[0]["boundaries"], ranks[1]["boundaries"]):
        assert all(torch.equal(state0[name], state1[name]) for name in state0)


@pytest.fixture
def hparams(tmp_path):
    return {"layerdrop": 0.1, "layerdrop_mode": "synced", "data_folder": str(tmp_path), "hang_timeout_minutes": 30}


@pytest.mark.parametrize(
    "change,precision,device,message",
    [
        ({"layerdrop": 1.0}, "fp32", "cpu", "layerdrop=1.0 is outside"),
        ({"layerdrop": -0.2}, "fp32", "cpu", "--layerdrop"),
        ({"layerdrop_mode": "random"}, "fp32", "cpu", "layerdrop_mode=.random. is not one of synced, independent"),
        ({}, "fp8", "cpu", "precision=fp8 is unknown: set --precision"),
        ({}, "fp16", "cpu", "precision=fp16 needs a CUDA GPU"),
        ({"attention": "flex"}, "bf16", "cpu", "attention=flex needs a CUDA GPU .*--attention=sdpa"),
        ({"cuda_graphs": True}, "bf16", "cpu", "cuda_graphs=True needs a CUDA GPU .*--cuda_graphs=False"),
        ({"data_folder": "/no/such/folder"}, "fp32", "cpu", "data_folder=/no/such/folder does not exist"),
        ({"hang_timeout_minutes": -1}, "fp32", "cpu", "hang_timeout_minutes=-1 is not a number of minutes"),
        ({"hang_timeout_minutes": "soon"}, "fp32", "cpu", "--hang_timeout_minutes=30"),
        ({"max_duration": 0}, "fp32", "cpu", "max_duration=0 is not a number > 0: set --max_duration=20.0"),
        ({"keep_latest_checkpoints": 0}, "fp32", "cpu", "keep_latest_checkpoints=0 is not an integer >= 1"),
        ({"number_of_epochs": 2.5}, "fp32", "cpu", "number_of_epochs=2.5 is not an integer >= 1"),
        ({"batches_per_bucket": True}, "fp32", "cpu", "batches_per_bucket=True is not an integer >= 1"),
        ({"duration_tolerance": -0.1}, "fp32", "cpu", "duration_tolerance=-0.1 is not a number >= 0"),
        ({"dynamic_batch_sampler": {"num_buckets": 0}}, "fp32", "cpu",
         r"dynamic_batch_sampler.num_buckets=0 is not an integer >= 1: set --dynamic_batch_sampler='\{num_buckets: 60\}'"),
    ],
)
def test_invalid_hparams_fail_with_one_line_naming_the_key(hparams, change, precision, device, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_hparams({**hparams, **change}, precision, device)
    assert "\n" not in str(error.value)


def test_valid_hparams_pass(hparams):
    check_hparams(hparams, "bf16", "cpu")
    check_hparams(hparams, "fp16", "cuda:0")
    check_hparams({**hparams, "attention": "flex"}, "bf16", "cuda:0")
    check_hparams({**hparams, "cuda_graphs": True}, "bf16", "cuda:0")


def test_triton_attention_runs_on_the_cpu_only_through_the_interpreter_and_not_in_bf16(hparams, monkeypatch):
    triton = {**hparams, "attention": "triton"}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="attention=triton needs a CUDA GPU .*--attention=sdpa"):
        check_hparams(triton, "fp32", "cpu")
    check_hparams(triton, "bf16", "cuda:0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_hparams(triton, "fp32", "cpu")
    with pytest.raises(ConfigError, match="attention=triton in bf16 needs a CUDA GPU .*--precision=fp32"):
        check_hparams(triton, "bf16", "cpu")


def test_an_output_folder_of_another_configuration_is_refused_unless_asked(tmp_path):
    (tmp_path / "hyperparams.yaml").write_text("# Generated 2026-11-28 from:\n# /x.yaml\n# yamllint disable\n"
                                               "seed: 1\nlayerdrop: 0.1\nlr: 0.5\n")
    assert check_output_folder(tmp_path / "fresh", "seed: 1\n", False, False) == "new"
    assert check_output_folder(tmp_path, "seed: 1\nlayerdrop: 0.1\nlr: 0.5\n", False, False) == "same"
    other = "seed: 1\nlayerdrop: 0.3\nlr: 0.5\n"
    with pytest.raises(ConfigError, match=r"another configuration \(changed: layerdrop\).*--resume=True.*--overwrite=True"):
        check_output_folder(tmp_path, other, False, False)
    assert check_output_folder(tmp_path, other, True, False) == "resume"
    assert check_output_folder(tmp_path, other, False, True) == "overwrite"
    assert check_output_folder(tmp_path, "seed: 1\nlayerdrop: 0.1\nlr: 0.5\n", False, True) == "overwrite"  # asked


def test_ranks_that_list_different_checkpoints_keep_delete_and_recover_alike(two_ranks):
    """Each rank has its own checkpoint folder (as SpeechBrain's debug mode gave
    them): rank 0 sees checkpoints to delete, rank 1 none. SpeechBrain's own
    deletion hung here; the decisions now come from the main process."""
    ranks = results_of(two_ranks[1], "checkpoints_seen_differently")
    assert ranks[0]["recovered"] == ranks[1]["recovered"] == 20.0  # the best WER, on both ranks
    assert ranks[0]["kept"] == ranks[1]["kept"] == [20.0, 35.0]  # the best and the latest
    assert ranks[1]["own_folder"] == []  # rank 1 never wrote a checkpoint of its own


def test_the_watchdog_prints_the_rank_and_every_thread_then_exits_for_a_restart(tmp_path):
    code = textwrap.dedent("""
        import threading, time
        from wavlm_ddp.faults.guards import Watchdog, progress
        watchdog = Watchdog(timeout_minutes=0.02).start()  # 1.2 s
        progress("training step 7")
        threading.Thread(target=time.sleep, args=(60,), name="loader", daemon=True).start()
        time.sleep(60)  # a hang
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3  # the watchdog's exit: the hang alone would end in the timeout
    first = result.stderr.splitlines()[0]
    assert first.startswith("watchdog: rank 0 on ") and "last progress: training step 7" in first
    assert "hang_timeout_minutes=0.02" in first
    assert result.stderr.count("hread 0x") == 3  # the stacks of main, loader and watchdog
    assert "loader" in result.stderr or result.stderr.count("File ") >= 3


class FakeClock:
    """time.monotonic for guards.Watchdog, and its stop event: each wait advances the
    clock by the time waited, then calls `on_wait(watchdog, now)`; `exit` records os._exit."""

    class Exited(Exception):
        pass

    def __init__(self, on_wait=lambda watchdog, now: None):
        self.now, self.on_wait, self.exits, self.watchdog = 0.0, on_wait, [], None

    def monotonic(self):
        return self.now

    def wait(self, seconds):
        self.now += seconds
        self.on_wait(self.watchdog, self.now)
        return False  # never stopped

    def exit(self, code):
        self.exits.append((self.now, code))
        raise self.Exited


def watch_with(clock, monkeypatch, timeout_minutes):
    """Run Watchdog._watch on `clock` (last progress at 0 s) until it exits: (its
    stderr, clock.exits)."""
    import io

    from wavlm_ddp.faults import guards

    monkeypatch.setattr(guards.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(guards.os, "_exit", clock.exit)
    monkeypatch.setattr(guards.faulthandler, "dump_traceback", lambda **kwargs: None)
    stderr = io.StringIO()
    monkeypatch.setattr(guards.sys, "stderr", stderr)
    watchdog = clock.watchdog = guards.Watchdog(timeout_minutes)
    watchdog._stop = clock
    watchdog.progress("training step 0")
    try:
        watchdog._watch()
    except FakeClock.Exited:
        pass
    return stderr.getvalue(), clock.exits


def test_the_watchdog_fires_at_its_first_check_after_the_timeout_and_not_before(monkeypatch):
    """1 minute without progress, checked every 10 s (min(10 s, a quarter of the
    timeout)): the check at 60 s sees exactly the timeout and waits, the one at 70 s
    exits with status 3."""
    stderr, exits = watch_with(FakeClock(), monkeypatch, timeout_minutes=1.0)
    assert exits == [(70.0, 3)]
    assert stderr.startswith("watchdog: rank 0 on ") and "made no progress for 1.2 min (hang_timeout_minutes=1; " \
        "last progress: training step 0)" in stderr


def test_a_watchdog_that_sees_progress_stays_quiet(monkeypatch):
    """Progress every 50 s for half an hour with a 1-minute timeout: no exit; the
    first check more than a minute after the last progress ends the rank."""
    def steps(watchdog, now):
        if now % 50 == 0 and now <= 1800:
            watchdog.progress(f"training step {int(now)}")

    stderr, exits = watch_with(FakeClock(steps), monkeypatch, timeout_minutes=1.0)
    assert exits == [(1870.0, 3)] and "last progress: training step 1800)" in stderr


@pytest.fixture(scope="module")
def damaged(two_ranks):
    """Both damage scenarios of ddp_worker.damaged_checkpoints: (their folder, each rank's result)."""
    base, runs = two_ranks
    return base / "damaged", results_of(runs, "damaged")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_on_every_rank(damaged):
    _, ranks = damaged
    for result in (rank["newest"] for rank in ranks):
        assert result["kept"] == [20.0, 25.0, 30.0]  # the best, and the latest two
        assert result["error"] is None
        assert result["recovered"] == 30.0 and result["value"] == 30.0  # the one before the damaged newest


def test_when_no_checkpoint_loads_every_rank_stops_with_one_line_naming_the_folder_and_the_fix(damaged):
    save, ranks = damaged
    for result in (rank["all"] for rank in ranks):
        assert result["error"] == (f"no checkpoint in {save / 'all'} loads (3 damaged): pass "
                                   f"--overwrite=True to start afresh, or delete {save / 'all'}")


def test_utterances_over_max_duration_are_left_out_of_training_with_one_line():
    rows = {"a": {"duration": 1.0}, "b": {"duration": 2.5}, "c": {"duration": 3.0}, "d": {"duration": 2.0}}
    kept, line = length_filter(rows, 2.0)
    assert sorted(kept) == ["a", "d"]
    assert line == ("max_duration=2 s: left out 2 of 4 training utterances (0.00 h of 0.00 h, 64.7 % of the audio) "
                    "longer than it")
    assert length_filter(rows, 3.0) == (rows, None)
    assert length_filter(rows, None) == (rows, None)


def test_a_train_split_left_empty_by_max_duration_stops_naming_the_key(audio_dir):
    train = write_csv(audio_dir / "train.csv", [("l", "$data_root/long.wav", "HELLO")])
    other = write_csv(audio_dir / "other.csv", [("g", "$data_root/good.wav", "HELLO")])
    hparams = {"train_csv": train, "valid_csv": other, "test_csv": other, "data_folder": audio_dir,
               "max_duration": 2.0}
    with pytest.raises(ConfigError, match=r"the train split is empty: max_duration=2 s: left out 1 of 1 .*"
                                          r"raise --max_duration"):
        read_datasets(hparams, [])


class DiskFull:
    """A recoverable whose save writes part of its file, then finds the disk full."""

    def __init__(self):
        self.full = False

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
            if self.full:
                raise OSError(28, "No space left on device")

    def load(self, path, end_of_epoch):
        pass


def test_a_checkpoint_write_that_hits_a_full_disk_removes_its_partial_files_and_keeps_the_last_one(tmp_path):
    model, disk = Counter(), DiskFull()
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"a_model": model})
    checkpointer.add_recoverable("z_state", disk, custom_save_hook=DiskFull.save, custom_load_hook=DiskFull.load)
    model.value.data.fill_(1.0)
    first = checkpointer.save_checkpoint(meta={"WER": 50.0})
    model.value.data.fill_(2.0)
    disk.full = True
    with pytest.raises(ConfigError) as refused:
        checkpointer.save_checkpoint(meta={"WER": 40.0})
    message = str(refused.value)
    assert message.startswith(f"could not save a checkpoint in {tmp_path} (No space left on device)")
    assert "1 earlier checkpoint(s) are intact" in message and "MB are free" in message
    size = sum(f.stat().st_size for f in first.path.rglob("*") if f.is_file())
    assert f"takes about {size / 2**20:.1f} MB" in message
    assert sorted(tmp_path.glob("CKPT+*")) == [first.path]  # nothing partial left
    restored = Counter()  # the rerun, once space is free
    checkpoint = SafeCheckpointer(tmp_path, recoverables={"a_model": restored}).recover_if_possible()
    assert checkpoint.path == first.path and restored.value.item() == 1.0


def test_a_full_disk_on_the_main_process_stops_every_rank_alike_without_a_hang(two_ranks):
    """SpeechBrain writes each file on the main process and then broadcasts: the failed
    write must not skip that broadcast (the other rank would wait in it until the
    collective timeout). Both ranks get the same line; the earlier checkpoint recovers."""
    base, runs = two_ranks
    ranks = results_of(runs, "disk_full")
    first = ranks[0]["first"]
    for result in ranks:
        assert result["error"].startswith(f"could not save a checkpoint in {base / 'disk_full'} (No space left on "
                                          "device): the partial save was removed and the 1 earlier checkpoint(s)")
        assert result["folders"] == [first]  # nothing partial left
        assert result["recovered"] == first and result["value"] == 1.0


def test_a_rank_that_cannot_see_a_parquet_dataset_stops_every_rank_with_one_line(two_ranks):
    """Multi-node: each rank must see the `<split>_data` files that the main process
    sees, else every rank stops before anything is written (not later in a collective)."""
    base, runs = two_ranks
    for seen, blind in results_of(runs, "shared_folders"):
        assert seen is None
        assert blind.startswith(f"rank 1 on {socket.gethostname()} cannot see the output_folder={base / 'shared' / 'out'} "
                                f"and data_folder={base / 'shared'}, shards of rank 0 on ")
        assert "--<split>_data" in blind and "\n" not in blind
    assert not (base / "shared" / "out").exists()  # made for the check, removed again
