"""HF datasets as input, decided in this process with train.py's --check_only:
bad rows named by split and row before anything is written (or left out), the
check reused without decoding a row while no shard changed, and checked again when
one did; durations measured once when there is no duration column. Training from
parquet and save_to_disk against the CSV: test_world_size.py."""

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from wavlm_ddp.data import hf as hf_data
from helpers import demo_slice, hf_copies, run_train
from recipes.to_parquet import SCHEMA, main as to_parquet

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
ROWS = {"train": 40, "valid": 6, "test": 6}


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory):
    """A slice of the demo corpus as parquet shards and as a save_to_disk folder."""
    folder = tmp_path_factory.mktemp("hf")
    manifests = demo_slice(folder, ROWS)
    parquet, disk = hf_copies(folder, manifests, DEMO)
    return folder, parquet, disk


@pytest.fixture
def check(tmp_path, capsys):
    def run(*args):
        return run_train(capsys, *args, f"--wavlm_source={tmp_path / 'wavlm-small'}", "--check_only",
                         "--world_size=2", "--noprogressbar")
    return run


def data_args(parquet, train=None):
    return [f"--train_data={train or parquet / 'train'}", f"--valid_data={parquet / 'valid'}",
            f"--test_data={parquet / 'test'}"]


def wav_bytes(seconds, rate=16000):
    buffer = io.BytesIO()
    sf.write(buffer, np.sin(np.arange(int(seconds * rate)) / 10).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def planted(parquet, folder):
    """The shards plus one shard of bad rows in train and in valid: (data folder,
    [(split, row, ID, reason)])."""
    shutil.copytree(parquet, folder)
    good = pq.read_table(sorted((folder / "train").glob("*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    bad = {"train": [({**good, "id": "undecodable", "audio": {"bytes": b"not audio at all", "path": "x.wav"}},
                      "unreadable or corrupt audio"),
                     ({**good, "id": "silent-text", "text": "  "}, "empty transcript"),
                     ({**good, "id": "too-short", "audio": {"bytes": wav_bytes(0.01), "path": "s.wav"},
                       "duration": 0.01}, "too short for the CNN"),
                     ({**good, "id": "mismatch", "audio": {"bytes": wav_bytes(1.0), "path": "m.wav"},
                       "duration": 9.0}, "duration column says 9, the audio lasts 1.000 s")],
           "valid": [({**good, "id": "unencodable", "text": "SIX BLUE GOAT Ω"},  # Ω: in no training transcript
                      "characters the tokenizer cannot encode: 'Ω'")]}
    expected = []
    for split, rows in bad.items():
        first = sum(pq.read_metadata(p).num_rows for p in (folder / split).glob("*.parquet"))
        pq.write_table(pa.Table.from_pylist([row for row, _ in rows], schema=SCHEMA), folder / split / "zz-bad.parquet")
        expected += [(split, first + i, row["id"], reason) for i, (row, reason) in enumerate(rows)]
    return folder, expected


def test_bad_rows_of_a_parquet_dataset_are_named_by_split_and_row_before_anything_is_written(hf_corpus, check,
                                                                                             tmp_path):
    _, parquet, _ = hf_corpus
    data, expected = planted(parquet, tmp_path / "data")
    out = tmp_path / "out"
    code, _, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 2, err[-3000:]
    assert f"error: {len(expected)} bad row(s) in the data" in err and "--skip_invalid=True" in err
    for split, row, utt_id, reason in expected:
        assert f"{data / split} [{split}]:{row} ({utt_id}): {reason}" in err, err[-3000:]
    assert not out.exists()

    code, stdout, err = check(*data_args(data), f"--output_folder={out}", "--skip_invalid=True")
    assert code == 0, err[-3000:]
    assert f"skip_invalid: {len(expected)} utterance(s) left out" in stdout
    assert "checks passed for world size 2" in stdout


def test_a_restart_reuses_the_check_without_decoding_a_row_and_a_changed_shard_checks_again(hf_corpus, check,
                                                                                            tmp_path, monkeypatch):
    _, parquet, _ = hf_corpus
    data = tmp_path / "data"
    shutil.copytree(parquet, data)
    out = tmp_path / "out"
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0, err[-3000:]
    assert "their audio was not read again" not in stdout

    decoded = []
    original = hf_data.check_rows
    monkeypatch.setattr(hf_data, "check_rows", lambda *a, **k: decoded.append(a[3]) or original(*a, **k))
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0, err[-3000:]
    assert "their audio was not read again" in stdout and decoded == []

    shard = sorted((data / "valid").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)  # rewritten with one row fewer
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0, err[-3000:]
    assert "their audio was not read again" not in stdout and decoded  # every split checked again


def test_without_a_duration_column_the_check_measures_each_row_once_and_keeps_the_durations(hf_corpus, check,
                                                                                            tmp_path):
    folder, _, disk = hf_corpus
    out = tmp_path / "out"
    args = [f"--{split}_data={disk}" for split in ROWS] + ["--hf_columns={id: id, audio: audio, text: text, "
                                                           "duration: null}", f"--output_folder={out}"]
    code, stdout, err = check(*args)
    assert code == 0, err[-3000:]
    measured = np.load(out / "save" / "manifest_check.train.durations.npy")
    with open(folder / "train.csv") as f:
        stated = [float(line.split(",")[1]) for line in f.readlines()[1:]]
    np.testing.assert_allclose(measured, stated, atol=0.001)  # the manifest's durations are rounded to ms
    code, stdout, err = check(*args)
    assert code == 0 and "their audio was not read again" in stdout, err[-3000:]


def test_a_path_that_is_no_dataset_or_a_missing_column_is_one_line_naming_it(hf_corpus, check, tmp_path):
    _, parquet, _ = hf_corpus
    code, _, err = check(*data_args(parquet, tmp_path / "nothing"), f"--output_folder={tmp_path / 'out'}")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: train_data: {tmp_path / 'nothing'} is "
                                                                 "neither a save_to_disk folder nor parquet file(s)")
    code, _, err = check(*data_args(parquet), "--hf_columns={id: id, audio: speech, text: text, duration: duration}",
                         f"--output_folder={tmp_path / 'out'}")
    assert code == 2 and "has no column(s) speech" in err and "set --hf_columns" in err
    assert not (tmp_path / "out").exists()


def test_the_converter_resumes_an_interrupted_run_and_rewrites_nothing(hf_corpus, tmp_path, capsys):
    folder, parquet, _ = hf_corpus
    out = tmp_path / "pq"
    args = [str(out), f"--csv=train={folder / 'train.csv'}", f"--data_folder={DEMO}", "--shard_mb=0.05"]
    assert to_parquet(args) == 0
    shards = sorted((out / "train").glob("*.parquet"))
    assert len(shards) > 2
    times = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the run had stopped before this shard
    (out / "train" / f".{shards[2].name}.tmp").write_bytes(b"half")  # and left a partial file
    assert to_parquet(args) == 0
    assert "1 shard(s) written, " in capsys.readouterr().out
    assert sorted((out / "train").glob("*")) == shards  # no partial file left
    assert all(p.stat().st_mtime_ns == times[p] for p in shards if p != shards[1])
    table = pq.read_table(sorted((out / "train").glob("*.parquet")))
    assert table.column("id").to_pylist() == [line.split(",")[0] for line in
                                              (folder / "train.csv").read_text().splitlines()[1:]]
