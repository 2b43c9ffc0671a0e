"""HF datasets as a run's data, beside the CSV manifests: a folder written by
`Dataset.save_to_disk` (a Dataset, or a DatasetDict with the split named in the
YAML), or parquet files (a file, a folder of *.parquet, or a glob), with the audio
inside (HF's audio struct {bytes, path}, bytes, or a path) and a text column.

The audio is decoded with soundfile (audio.load_audio), never by `datasets` (whose
decoding needs torchcodec). Parquet is read through `datasets` into its Arrow cache
(HF_DATASETS_CACHE) once; a save_to_disk folder is memory-mapped as it is.
Rows are read by index: SpeechBrain's dataset keys are row numbers, and each row
carries its own ID (the id column, else `<split>-<row>`).
"""

import glob
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from wavlm_ddp.data.audio import audio_source
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.data.manifests import BadRow, audio_problems, stated_duration, text_problems

INSTALL_HINT = "pip install -e '.[datasets]' (docs/data.md)"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"HF datasets as input need the datasets package: {INSTALL_HINT}") from None
    return datasets


def data_files(spec):
    """The files behind a dataset: the Arrow files of a save_to_disk folder, or the
    parquet files. Raises ConfigError naming the path when there are none."""
    path = Path(spec)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return sorted(str(p) for p in path.rglob("*.arrow"))
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    else:
        files = sorted(glob.glob(str(spec))) if any(c in str(spec) for c in "*?[") else \
            ([str(path)] if path.is_file() else [])
    if not files:
        raise ConfigError(f"{spec} is neither a save_to_disk folder nor parquet file(s): give the folder that "
                          "Dataset.save_to_disk wrote, a .parquet file, a folder of them or a glob")
    return files


def open_split(spec, split, hf_split, columns):
    """The HF Dataset of `spec` with only the recipe's columns, the audio undecoded.
    `columns`: the YAML's hf_columns {id, audio, text, duration}; `hf_split` names
    the split of a DatasetDict folder."""
    datasets = _datasets()
    path = Path(spec)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(path))
        if hf_split not in splits:
            raise ConfigError(f"{spec} has the splits {', '.join(splits)}, not {hf_split!r}: set "
                              f"--hf_splits with the name of the {split} split")
        dataset = splits[hf_split]
    elif path.is_dir() and (path / "state.json").exists():
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.Dataset.from_parquet(data_files(spec))
    wanted = [name for name in columns.values() if name]
    missing = [name for name in wanted if name not in dataset.column_names]
    if missing:
        raise ConfigError(f"{spec} ({split}) has no column(s) {', '.join(missing)} (it has "
                          f"{', '.join(dataset.column_names)}): set --hf_columns to its names")
    dataset = dataset.select_columns(wanted)
    if isinstance(dataset.features[columns["audio"]], datasets.Audio):
        dataset = dataset.cast_column(columns["audio"], datasets.Audio(decode=False))
    return dataset


def row_ids(rows, id_column, split, numbers):
    """The IDs of `rows` (a Dataset, or a block read from one), whose row numbers in
    their split are `numbers`: the id column's values, else `<split>-<row number>`."""
    if id_column:
        return [str(value) for value in rows[id_column]]
    return [f"{split}-{n}" for n in numbers]


class ArrowRows(Mapping):
    """A split's rows as SpeechBrain's DynamicItemDataset reads them: key = row
    number, value = {"utt_id", "wav" (the audio value), "wrd", "duration"} (SpeechBrain
    reserves "id" for the key: data.dataio_prepare outputs utt_id as the batch's id). The
    durations come from the duration column or from the check (one array)."""

    def __init__(self, dataset, columns, split, durations, leave_out=()):
        self.dataset, self.columns, self.split = dataset, columns, split
        self.durations = np.asarray(durations, dtype=np.float64)
        left = set(leave_out)
        self.keys_ = [i for i in range(len(dataset)) if i not in left]

    def __getitem__(self, index):
        row = self.dataset[int(index)]
        utt_id = str(row[self.columns["id"]]) if self.columns.get("id") else f"{self.split}-{index}"
        return {"utt_id": utt_id, "wav": row[self.columns["audio"]], "wrd": row[self.columns["text"]],
                "duration": float(self.durations[index])}

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self):
        return len(self.keys_)

    def keys(self):
        return list(self.keys_)


def stated_durations(dataset, columns):
    """The duration column as floats (NaN where it is not a number), or None."""
    if not columns.get("duration"):
        return None
    values = dataset.data.column(columns["duration"]).to_pylist()
    out = np.full(len(values), np.nan)
    for i, value in enumerate(values):
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            pass
    return out


def check_rows(dataset, columns, split, spec, indices, limits, charset):
    """(bad rows, measured seconds of each row in `indices`, NaN when unreadable)
    for rows `indices` of a split: text, audio (decoded from its bytes or path,
    opened once), length, and the duration column when there is one."""
    bad, seconds = [], np.full(len(indices), np.nan)
    if not len(indices):
        return bad, seconds
    start, stop = int(indices[0]), int(indices[-1]) + 1
    block = dataset[start:stop]  # one read of a contiguous block (open_split kept only the recipe's columns)
    ids = row_ids(block, columns.get("id"), split, range(start, stop))
    label = f"{spec} [{split}]"
    for k, index in enumerate(indices):
        j = int(index) - start
        problems = text_problems(block[columns["text"]][j], charset)
        stated = None
        if columns.get("duration"):
            value = block[columns["duration"]][j]
            stated = stated_duration(value)
            if stated is None:
                problems.append(f"duration {value!r} is not a number of seconds > 0")
        audio = block[columns["audio"]][j]
        if audio is None or (isinstance(audio, dict) and not (audio.get("bytes") or audio.get("path"))):
            problems.append("no audio (neither bytes nor a path)")
        else:
            found, measured = audio_problems(audio_source(audio), limits, stated)
            problems += found
            if measured is not None:
                seconds[k] = measured
        bad.extend(BadRow(label, int(index), ids[j], reason) for reason in problems)
    return bad, seconds


def split_fingerprint(spec, hf_split, columns):
    """What the check of an HF split depends on, per shard file (path, size,
    modification time): no row is read, so a restart costs one stat per shard."""
    files = data_files(spec)
    digest = hashlib.sha256(json.dumps([str(spec), hf_split, columns]).encode())
    for name in files:
        stat = os.stat(name)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def durations_file(check_file, split):
    """Where the measured durations of a split without a duration column are kept."""
    return Path(check_file).with_name(f"{Path(check_file).stem}.{split}.durations.npy")


def save_durations(check_file, split, seconds):
    path = durations_file(check_file, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, seconds)
    os.replace(tmp, path)


def load_durations(check_file, split, rows):
    """The saved durations of a split, or None when absent or of another length."""
    try:
        seconds = np.load(durations_file(check_file, split))
    except (OSError, ValueError):
        return None
    return seconds if len(seconds) == rows else None
