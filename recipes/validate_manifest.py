"""Check every row of the CSV manifests before training, so that a broken file
stops the run before step 1 (or is skipped, when asked) instead of at hour 6.

Reads only audio headers and the last frames of each file (a truncated file
fails there), so it is cheap enough for LibriSpeech 960 h.
"""

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

logger = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("ID", "duration", "wav", "wrd")
TAIL_FRAMES = 1024


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
    max_duration: float | None  # seconds; None: no limit


def validate_manifests(csv_paths, data_root, limits, charset, max_duration_splits=("train",)):
    """Check the manifests {split: path}; return the list of BadRow.

    charset: the characters the tokenizer can encode (the training transcripts'
    characters, as the tokenizer is trained on them). `limits.max_duration`
    applies to the splits in `max_duration_splits` only.
    """
    bad, seen = [], {}
    for split, path in csv_paths.items():
        max_duration = limits.max_duration if split in max_duration_splits else None
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                bad.append(BadRow(str(path), 1, "-", f"missing column(s) {', '.join(missing)}: "
                                  f"the header must have {', '.join(REQUIRED_COLUMNS)}"))
                continue
            for line, row in enumerate(reader, start=2):
                reasons = _row_problems(row, data_root, limits, max_duration, charset)
                if row["ID"] in seen:
                    reasons.append(f"duplicate ID, first at {seen[row['ID']]}")
                seen.setdefault(row["ID"], f"{path}:{line}")
                bad.extend(BadRow(str(path), line, row["ID"], r) for r in reasons)
    return bad


def training_charset(train_csv):
    with open(train_csv, newline="") as f:
        return set("".join(row.get("wrd") or "" for row in csv.DictReader(f)))


def _row_problems(row, data_root, limits, max_duration, charset):
    problems = []
    text = (row.get("wrd") or "").strip()
    if not text:
        problems.append("empty transcript")
    unknown = sorted(set(text) - charset - {" "})
    if unknown:
        problems.append(f"characters the tokenizer cannot encode: {''.join(unknown)!r}")
    path = Path(row["wav"].replace("$data_root", str(data_root)))
    try:
        info = sf.info(str(path))
        if info.frames > TAIL_FRAMES:  # a truncated or corrupt body fails here
            sf.read(str(path), start=info.frames - TAIL_FRAMES, frames=TAIL_FRAMES)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        reason = "missing file" if not path.exists() else f"unreadable or corrupt audio ({error})"
        return problems + [f"{reason}: {path}"]
    if info.samplerate != limits.sample_rate and not limits.resample:
        problems.append(f"sample rate {info.samplerate} Hz, the model needs {limits.sample_rate} Hz "
                        "(set resample: True to resample on load)")
    seconds = info.frames / info.samplerate
    if seconds * limits.sample_rate < limits.min_samples:
        problems.append(f"too short for the CNN: {seconds:.3f} s < {limits.min_samples} samples")
    if max_duration is not None and seconds > max_duration:
        problems.append(f"longer than max_duration ({seconds:.1f} s > {max_duration} s)")
    return problems


def report(bad_rows, limit=50):
    """A readable report: one line per bad row (the first `limit`), then a count."""
    lines = [str(b) for b in bad_rows[:limit]]
    if len(bad_rows) > limit:
        lines.append(f"... and {len(bad_rows) - limit} more")
    return "\n".join(lines)
