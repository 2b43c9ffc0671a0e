"""Check every row of the CSV manifests before training, so that a broken file
stops the run before step 1 (or is skipped, when asked) instead of at hour 6.

Reads only audio headers and the last frames of each file (a truncated file
fails there), so it is cheap enough for LibriSpeech 960 h.
"""

import csv
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

logger = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")
TAIL_FRAMES = 1024
CHECK_VERSION = 4  # bump when the checks change, so saved results are not reused
CHUNK_ROWS = 2000  # rows a check worker takes at a time


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int  # line number in the CSV (the header is line 1)
    utt_id: str
    reason: str

    def __str__(self):
        return f"{self.file}:{self.row} ({self.utt_id}): {self.reason}"


@dataclass(frozen=True)
class AudioLimits:
    sample_rate: int  # the model's rate
    resample: bool  # False: another rate is an error
    min_samples: int  # at the model's rate: shorter breaks the CNN
    duration_tolerance: float  # seconds the duration column may differ from the audio's real length


def validate_manifests(csv_paths, data_root, limits, charset, workers=1, share=(0, 1)):
    """Check the manifests {split: path}; return the list of BadRow.

    charset: the characters the tokenizer can encode (the training transcripts'
    characters, as the tokenizer is trained on them). A length limit
    (max_duration) is a choice, not a data error: `length_filter` applies it.
    The rows' audio is checked by `workers` processes (in_parallel), each file
    opened once; with share=(rank, world size), only this rank's share of the rows
    (and the header and duplicate checks on rank 0): gather the ranks' lists.
    """
    bad, seen, rows = [], {}, []
    for split, path in csv_paths.items():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                bad.append(BadRow(str(path), 1, "-", f"missing column(s) {', '.join(missing)}: "
                                  f"the header must have {', '.join(REQUIRED_COLUMNS)}"))
                continue
            for line, row in enumerate(reader, start=2):
                if row["ID"] in seen:
                    bad.append(BadRow(str(path), line, row["ID"], f"duplicate ID, first at {seen[row['ID']]}"))
                seen.setdefault(row["ID"], f"{path}:{line}")
                rows.append((str(path), line, row))
    if share[0] != 0:
        bad = []
    check = functools.partial(_check_csv_rows, data_root=data_root, limits=limits, charset=charset)
    for _, found in in_parallel(check, rows, workers, share):
        bad.extend(found)
    return ordered(bad, csv_paths.values())


def ordered(bad_rows, files):
    """Bad rows in the order of the files, then rows (a duplicate ID after the row's own problems)."""
    order = {str(path): i for i, path in enumerate(files)}
    return sorted(bad_rows, key=lambda b: (order.get(b.file, -1), b.row, b.reason.startswith("duplicate ID")))


def _check_csv_rows(rows, data_root, limits, charset):
    return [BadRow(path, line, row["ID"], reason) for path, line, row in rows
            for reason in _row_problems(row, data_root, limits, charset)]


_check = None  # what the forked check workers run, set before the pool starts


def _call(chunk):
    return _check(chunk)


def in_parallel(check, items, workers, share=(0, 1)):
    """[(chunk number, check(chunk))] over `items` cut into chunks of CHUNK_ROWS, for
    this rank's share of the chunks (rank r of N takes chunks r, r + N, ...), by
    `workers` forked processes: nothing is imported again, and `check` is not pickled."""
    global _check
    chunks = [items[i : i + CHUNK_ROWS] for i in range(0, len(items), CHUNK_ROWS)]
    numbers = list(range(share[0], len(chunks), share[1]))
    mine = [chunks[i] for i in numbers]
    if workers <= 1 or len(mine) < 2:
        return list(zip(numbers, map(check, mine)))
    _check = check
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(mine))) as pool:
            return list(zip(numbers, pool.map(_call, mine, chunksize=1)))
    finally:
        _check = None


def read_manifest(path, data_root, leave_out=()):
    """A manifest as {ID: row} for SpeechBrain's DynamicItemDataset: `$data_root`
    replaced, `duration` a float. Rows whose ID is in `leave_out` (bad rows, with
    skip_invalid) are dropped before any of their values is read, so a bad
    duration never reaches float()."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            utt_id = row.pop("ID")
            if utt_id in leave_out:
                continue
            row = {key: (value or "").replace("$data_root", str(data_root)) for key, value in row.items()}
            row["duration"] = float(row["duration"])
            rows[utt_id] = row
    return rows


def empty_splits(csv_paths, bad_rows):
    """One line for each split that keeps no row once the bad rows are left out:
    the split, its row count and why each row went."""
    bad_ids = {b.utt_id for b in bad_rows}
    messages = []
    for split, path in csv_paths.items():
        with open(path, newline="", encoding="utf-8") as f:
            ids = [row.get("ID") for row in csv.DictReader(f)]
        if not ids:
            messages.append(f"the {split} split is empty: {path} has no rows")
        elif all(utt_id in bad_ids for utt_id in ids):
            causes = sorted({b.reason.split(" (")[0].split(":")[0] for b in bad_rows
                             if b.file == str(path)})
            messages.append(f"the {split} split is empty after leaving out bad rows: all {len(ids)} row(s) "
                            f"of {path} are bad ({'; '.join(causes)})")
    return messages


def length_filter(rows, max_duration):
    """Leave out the utterances longer than `max_duration` seconds (None: none).
    Returns (the rows kept, one line that says what was left out, or None)."""
    if not max_duration:
        return rows, None
    kept = {utt_id: row for utt_id, row in rows.items() if row["duration"] <= max_duration}
    dropped = len(rows) - len(kept)
    if not dropped:
        return kept, None
    total = sum(row["duration"] for row in rows.values())
    left = total - sum(row["duration"] for row in kept.values())
    return kept, (f"max_duration={max_duration:g} s: left out {dropped} of {len(rows)} training utterances "
                  f"({left / 3600:.2f} h of {total / 3600:.2f} h, {100 * left / total:.1f} % of the audio) "
                  "longer than it")


def training_charset(train_csv):
    with open(train_csv, newline="") as f:
        return set("".join(row.get("wrd") or "" for row in csv.DictReader(f)))


def _row_problems(row, data_root, limits, charset):
    problems = text_problems(row.get("wrd"), charset)
    stated = stated_duration(row.get("duration"))
    if stated is None:
        problems.append(f"duration {row.get('duration')!r} is not a number of seconds > 0")
    path = Path(row["wav"].replace("$data_root", str(data_root)))
    audio, _ = audio_problems(str(path), limits, stated)
    if audio and audio[0].startswith("unreadable") and not path.exists():
        audio = [f"missing file: {path}"]
    elif audio and audio[0].startswith("unreadable"):
        audio = [f"{audio[0]}: {path}"]
    return problems + audio


def audio_problems(source, limits, stated):
    """(problems, seconds) of one audio file or bytes (anything soundfile opens),
    opened once: its header, then its last frames (a truncated or corrupt body fails
    there). `stated`: the duration the data claims (None: not checked). seconds is
    None when the audio does not open."""
    try:
        with sf.SoundFile(source) as audio:
            frames, rate = audio.frames, audio.samplerate
            if frames > TAIL_FRAMES:
                audio.seek(frames - TAIL_FRAMES)
                audio.read(TAIL_FRAMES)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as error:
        return [f"unreadable or corrupt audio ({str(error).splitlines()[0][:200]})"], None
    problems = []
    if rate != limits.sample_rate and not limits.resample:
        problems.append(f"sample rate {rate} Hz, the model needs {limits.sample_rate} Hz "
                        "(set resample: True to resample on load)")
    seconds = frames / rate
    if seconds * limits.sample_rate < limits.min_samples:
        problems.append(f"too short for the CNN: {seconds:.3f} s < {limits.min_samples} samples")
    if stated is not None and abs(stated - seconds) > limits.duration_tolerance:
        problems.append(_duration_mismatch(stated, seconds, rate, limits))
    return problems, seconds


def text_problems(text, charset):
    """What is wrong with a transcript: empty, or characters the tokenizer cannot encode."""
    problems = []
    text = (text or "").strip()
    if not text:
        problems.append("empty transcript")
    unknown = sorted(set(text) - charset - {" "})
    if unknown:
        problems.append(f"characters the tokenizer cannot encode: {''.join(unknown)!r}")
    return problems


def stated_duration(text):
    """A stated duration (the manifest's text, or a dataset's value) as a float > 0, or None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _duration_mismatch(stated, seconds, file_rate, limits):
    """The duration column disagrees with the audio: dynamic batching and the
    max_duration filter read the column, so a wrong one breaks both."""
    reason = (f"duration column says {stated:g}, the audio lasts {seconds:.3f} s "
              f"(more than duration_tolerance={limits.duration_tolerance} s apart)")
    ratio = stated / seconds
    units = {"samples": {file_rate, limits.sample_rate}, "milliseconds": {1000}}
    for unit, scales in units.items():
        if any(abs(ratio / scale - 1) < 0.05 for scale in scales):
            return f"{reason}: durations must be in seconds, this looks like {unit}"
    return reason


def fingerprint(csv_paths, data_root, limits, charset):
    """A digest of everything the check reads: the manifests' bytes, each audio
    file's size and modification time, and the settings. Equal digests mean the
    check would find the same rows again, so its result can be reused (a restart
    does not read 281,000 audio headers twice). Costs one stat() per file."""
    digest = hashlib.sha256(json.dumps([CHECK_VERSION, asdict(limits), sorted(charset), str(data_root)]).encode())
    for split, path in sorted(csv_paths.items()):
        data = Path(path).read_bytes()
        digest.update(f"{split}\0{path}\0".encode() + data)
        for row in csv.DictReader(data.decode("utf-8", errors="replace").splitlines()):
            wav = (row.get("wav") or "").replace("$data_root", str(data_root))
            try:
                stat = os.stat(wav)
                digest.update(f"{wav}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{wav}\0missing\n".encode())
    return digest.hexdigest()


def load_check(cache_path, digest):
    """(bad rows, empty splits) saved by `save_check` for the same digest, else None."""
    try:
        saved = json.loads(Path(cache_path).read_text())
        if saved["fingerprint"] != digest:
            return None
        return [BadRow(**row) for row in saved["bad"]], saved["empty"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, half-written or from another version: check again


def save_check(cache_path, digest, bad_rows, empty):
    """Write the check's result atomically (a torn file is never read as valid)."""
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": digest, "bad": [asdict(b) for b in bad_rows], "empty": empty}))
    os.replace(tmp, cache_path)


def report(bad_rows, limit=50):
    """A readable report: one line per bad row (the first `limit`), then a count."""
    lines = [str(b) for b in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"... and {len(bad_rows) - limit} more")
    return "\n".join(lines)
