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
import multiprocessing.connection
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

from wavlm_ddp.faults.launcher_watch import end_with_parent
from wavlm_ddp.preflight import ConfigError

logger = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")
TAIL_FRAMES = 1024
CHECK_VERSION = 5  # bump when the checks change, so saved results are not reused
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
    for _, found in in_parallel(check, rows, workers, share, csv_block):
        bad.extend(found)
    return ordered(bad, csv_paths.values())


def ordered(bad_rows, files):
    """Bad rows in the order of the files, then rows (a duplicate ID after the row's own problems)."""
    order = {str(path): i for i, path in enumerate(files)}
    return sorted(bad_rows, key=lambda b: (order.get(b.file, -1), b.row, b.reason.startswith("duplicate ID")))


def _check_csv_rows(rows, data_root, limits, charset):
    return [BadRow(path, line, row["ID"], reason) for path, line, row in rows
            for reason in _row_problems(row, data_root, limits, charset)]


def in_parallel(check, items, workers, share=(0, 1), block=None):
    """[(chunk number, check(chunk))] over `items` cut into chunks of CHUNK_ROWS, for
    this rank's share of the chunks (rank r of N takes chunks r, r + N, ...), by
    `workers` forked processes: nothing is imported again, and `check` is not pickled.
    A worker that dies (a crash in the audio library, the out-of-memory killer) is
    one ConfigError naming its chunk, by `block(chunk)` (file and rows)."""
    chunks = [items[i : i + CHUNK_ROWS] for i in range(0, len(items), CHUNK_ROWS)]
    numbers = list(range(share[0], len(chunks), share[1]))
    mine = [chunks[i] for i in numbers]
    if workers <= 1 or len(mine) < 2:
        return list(zip(numbers, map(check, mine)))
    results = _forked_map(check, mine, min(workers, len(mine)), block or (lambda chunk: f"{len(chunk)} rows"))
    return list(zip(numbers, results))


def _forked_map(check, chunks, workers, block):
    """[check(chunk) for chunk in chunks] on `workers` forked processes, each sent
    one chunk number at a time, so the chunk a dead worker held is known (a pool's
    map would wait for its result forever)."""
    context = multiprocessing.get_context("fork")
    results, pending, held, procs = [None] * len(chunks), list(range(len(chunks)))[::-1], {}, {}
    idle, dead = [], None
    try:
        for _ in range(workers):
            ours, theirs = context.Pipe()
            procs[ours] = context.Process(target=_serve, args=(check, chunks, theirs, os.getpid()), daemon=True)
            procs[ours].start()
            theirs.close()
            idle.append(ours)
        while dead is None and (held or pending):
            while idle and pending and dead is None:
                conn = idle.pop()
                held[conn] = pending.pop()
                try:
                    conn.send(held[conn])
                except OSError:  # it died between two chunks
                    dead = procs[conn], chunks[held[conn]]
            for conn in multiprocessing.connection.wait(list(held)) if dead is None else []:
                try:
                    failed, result = conn.recv()
                except (EOFError, OSError):  # it died holding its chunk
                    dead = procs[conn], chunks[held[conn]]
                    break
                if failed:
                    raise result
                results[held.pop(conn)] = result
                idle.append(conn)
    finally:
        for conn, proc in procs.items():
            proc.kill()
            proc.join()
            conn.close()
    if dead:
        raise ConfigError(_death(dead[0].exitcode, dead[1], check, block))
    return results


def _serve(check, chunks, conn, parent):
    """A check worker: check the chunk whose number arrives, send the result back; it
    ends with its parent (a killed rank or check process leaves no worker behind)."""
    end_with_parent(parent)
    while True:
        try:
            number = conn.recv()
        except EOFError:
            return
        try:
            conn.send((False, check(chunks[number])))
        except Exception as error:  # the parent raises it, as Pool.map would
            try:
                conn.send((True, error))
            except Exception:  # not picklable
                conn.send((True, RuntimeError(f"{type(error).__name__}: {error}")))


def _death(code, chunk, check, block):
    """Why a check worker ended without its result, in one line with the fix: the
    chunk is checked again one row at a time in a fresh process, whose death names the row."""
    how = f"was killed by {_signal_name(-code)}" if code is not None and code < 0 else f"exited with status {code}"
    where = f"a check worker {how} while checking {block(chunk)}"
    row, again = _first_fatal_row(check, chunk)
    if row is not None:
        why = ("reading it takes more memory than the job has, or kills the audio library" if again == -signal.SIGKILL
               else "the audio library crashes on it")
        return f"{where}, and checking {block(chunk[row : row + 1])} alone {_how_it_ended(again)} too: {why}: " \
               "remove or re-encode that file"
    if code == -signal.SIGKILL:
        return (f"{where}; one row at a time they pass, so most likely the out-of-memory killer: give the job more "
                f"memory, or lower --check_workers (each worker holds {CHUNK_ROWS} rows at a time)")
    return (f"{where}; one row at a time they pass, so no one file does it: run the check again, with "
            "--check_workers=1 (no worker processes) if it happens again")


def _first_fatal_row(check, chunk):
    """(the position of the first row of `chunk` whose check alone ends a forked
    process, how it ended) or (None, None)."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    proc = context.Process(target=_one_by_one, args=(check, chunk, theirs, os.getpid()), daemon=True)
    proc.start()
    theirs.close()
    passed = 0
    try:
        while (message := ours.recv()) is not None:
            passed = message
    except (EOFError, OSError):
        proc.join()
        return passed, proc.exitcode
    finally:
        proc.kill()
        proc.join()
        ours.close()
    return None, None


def _one_by_one(check, chunk, conn, parent):
    end_with_parent(parent)
    for k in range(len(chunk)):
        try:
            check(chunk[k : k + 1])
        except Exception:
            pass  # a Python error is the worker's result to report, not a death
        conn.send(k + 1)
    conn.send(None)


def _signal_name(number):
    return signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"


def _how_it_ended(code):
    return f"is killed by {_signal_name(-code)}" if code is not None and code < 0 else f"exits with status {code}"


def csv_block(rows):
    """The manifest lines of a chunk of (path, line, row): `path lines a-b`, or for
    one row `path line a (its wav)`."""
    if len(rows) == 1:
        path, line, row = rows[0]
        return f"{path} line {line} ({row.get('wav')})"
    spans = {}
    for path, line, _ in rows:
        spans.setdefault(path, [line, line])[1] = line
    return "; ".join(f"{path} line {a}" if a == b else f"{path} lines {a}-{b}" for path, (a, b) in spans.items())


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
            digest.update(file_state((row.get("wav") or "").replace("$data_root", str(data_root))))
    return digest.hexdigest()


def file_state(path):
    """What a fingerprint knows of an audio file without reading it: size and mtime."""
    try:
        stat = os.stat(path)
        return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
    except OSError:
        return f"{path}\0missing\n".encode()


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
