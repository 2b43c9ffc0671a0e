"""HF datasets as a run's data, beside the CSV manifests: a folder written by
`Dataset.save_to_disk` (a Dataset, or a DatasetDict with the split named in the
YAML), or parquet files (a file, a folder of *.parquet, or a glob), with the audio
inside (HF's audio struct {bytes, path}, bytes, or a path) and a text column.

The audio is decoded with soundfile (audio.load_audio), never by `datasets` (whose
decoding needs torchcodec). Parquet is read through `datasets` into its Arrow cache
(HF_DATASETS_CACHE) once; a save_to_disk folder is memory-mapped as it is.
Rows are read by index: SpeechBrain's dataset keys are row numbers, and each row
carries its own ID (the id column, else `<split>-<row>`), by which bad rows are left out.

A shard is known by its content (content_digests): datasets keys its Arrow cache of
local parquet files on their modification time alone, and a copy that keeps it
(`cp -p`, `rsync -t`, `tar x`) would otherwise reuse both that cache and the check.
"""

import glob
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wavlm_ddp.data.audio import audio_source
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.data.manifests import BadRow, audio_problems, file_state, stated_duration, text_problems

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
        files = data_files(spec)
        # The shards' content in the cache's key: datasets would key it on their mtime alone.
        dataset = datasets.Dataset.from_parquet(files, description=f"content {combined(content_digests(files))}")
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


def rows_of_ids(dataset, id_column, split, ids):
    """The row numbers of a split whose ID is in `ids`: by the id column, so a saved
    check names the same rows after the shards were reordered; without one the IDs
    are `<split>-<row number>`, which name other rows once the rows move."""
    if not ids:
        return []
    if id_column:
        found = pc.is_in(dataset.data.column(id_column).cast(pa.string()), value_set=pa.array(sorted(ids)))
        return np.flatnonzero(found.to_numpy(zero_copy_only=False)).tolist()
    prefix = f"{split}-"
    return sorted(int(i[len(prefix):]) for i in ids if i.startswith(prefix) and i[len(prefix):].isdigit())


def duplicate_ids(dataset, id_column, label):
    """A BadRow for each row whose ID an earlier row of the split has: rows are left
    out by ID, so an ID must name one row."""
    if not id_column:
        return []
    first, bad = {}, []
    for row, utt_id in enumerate(dataset.data.column(id_column).to_pylist()):
        utt_id = str(utt_id)
        if utt_id in first:
            bad.append(BadRow(label, row, utt_id, f"duplicate ID, first at row {first[utt_id]}"))
        first.setdefault(utt_id, row)
    return bad


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

    def ids(self, numbers):
        """The IDs of rows `numbers`, without reading their audio."""
        if self.columns.get("id"):
            column = self.dataset.data.column(self.columns["id"])
            return [str(value) for value in column.take(pa.array(numbers, type=pa.int64())).to_pylist()]
        return [f"{self.split}-{n}" for n in numbers]

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


def split_fingerprint(spec, hf_split, columns, dataset):
    """What the check of an HF split depends on: each shard file's path and content
    (content_digests), and the size and modification time of each audio file that a
    row names by path instead of holding its bytes (as for a CSV manifest's audio)."""
    files = data_files(spec)
    digest = hashlib.sha256(json.dumps([str(spec), hf_split, columns]).encode())
    for name, content in content_digests(files).items():
        digest.update(f"{name}\0{content}\n".encode())
    for path in referenced_audio(dataset, columns["audio"]):
        digest.update(file_state(path))
    return digest.hexdigest()


def referenced_audio(dataset, audio_column):
    """The paths of the audio that rows hold by path (HF's audio struct without bytes,
    or a column of paths), read from the Arrow table without touching any audio bytes
    (the bytes' validity and offsets only)."""
    paths = []
    for chunk in dataset.data.column(audio_column).chunks:
        if pa.types.is_struct(chunk.type):
            fields = dict(zip((field.name for field in chunk.type), chunk.flatten()))
            if "path" not in fields:
                continue
            if "bytes" in fields:
                no_bytes = pc.fill_null(pc.equal(pc.binary_length(fields["bytes"]), 0), True)
                chunk = fields["path"].filter(no_bytes)
            else:
                chunk = fields["path"]
        elif not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            continue  # bytes: nothing on disk
        paths += [path for path in chunk.to_pylist() if path]
    return paths


_MEMO_NAME = "wavlm_ddp_content_digests.json"  # beside datasets' Arrow cache
_memo = None  # {path: [size, mtime_ns, ctime_ns, inode, sha256]}, loaded once per process


def content_digests(files):
    """{file: SHA-256 of its bytes}, which any rewrite changes (a parquet footer costs
    far less to read, but stays the same when audio bytes change in place, and
    hashing reads every byte). Each digest is kept in a memo beside
    datasets' cache with the file's size, modification time, inode and status-change
    time (ctime): every write and every utime sets the ctime to the present, and no
    copying tool sets it back. So a restart costs one stat per shard, and a shard
    whose identity changed is hashed again: a copy of the same bytes keeps the check,
    other bytes are checked again."""
    global _memo
    if _memo is None:
        _memo = _read_memo()
    digests, fresh = {}, {}
    for name in files:
        before = os.stat(name)
        key = [before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino]
        saved = _memo.get(os.path.abspath(name))
        if saved and saved[:4] == key:
            digests[name] = saved[4]
            continue
        digests[name] = _file_digest(name)
        after = os.stat(name)
        # Not kept while the file may still change within one tick of the ctime clock.
        if [after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino] == key and \
                time.time() - max(after.st_ctime_ns, after.st_mtime_ns) / 1e9 > 1:
            fresh[os.path.abspath(name)] = key + [digests[name]]
    if fresh:
        _memo.update(fresh)
        _write_memo(fresh)
    return digests


def combined(digests):
    """One digest for {file: digest}."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def _file_digest(name):
    digest = hashlib.sha256()
    with open(name, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _memo_path():
    return Path(_datasets().config.HF_DATASETS_CACHE) / _MEMO_NAME


def _read_memo():
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}  # absent or torn: the files are hashed again


def _write_memo(fresh):
    """Add `fresh` to the memo on disk (other processes may have added theirs)."""
    path = _memo_path()
    try:
        memo = {name: saved for name, saved in {**_read_memo(), **fresh}.items() if os.path.exists(name)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the digests are computed again next time


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
