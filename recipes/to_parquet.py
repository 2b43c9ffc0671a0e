#!/usr/bin/env python3
"""Move a corpus off one small file per utterance: CSV manifests (or an extracted
LibriSpeech tree) to parquet shards with the audio bytes inside, which train.py
reads with --train_data=<out>/train (docs/data.md).

    python recipes/to_parquet.py OUT --csv train=recipes/demo_data/train.csv \
        --csv valid=recipes/demo_data/valid.csv --data_folder=recipes/demo_data
    python recipes/to_parquet.py OUT --librispeech /data/LibriSpeech \
        --train_splits train-clean-100 --other_splits dev-clean test-clean

Each split becomes <OUT>/<split>/<split>-NNNNN-of-MMMMM.parquet with the columns
id, audio (HF's audio struct: the file's bytes as they are, and its name),
text and duration. Shards close at --shard_mb megabytes of audio, decided from the
files' sizes before anything is written, so the shards of a rerun are the same:
a shard is written to a temporary name and renamed when complete, and a rerun
(after an interruption) skips the shards already there. Bad rows are not checked
here: train.py's check reads the shards.
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.prepare_librispeech import prepare_librispeech  # noqa: E402

# HF `datasets` reads this schema metadata: the audio column is its Audio feature.
FEATURES = {"id": {"dtype": "string", "_type": "Value"}, "audio": {"_type": "Audio"},
            "text": {"dtype": "string", "_type": "Value"}, "duration": {"dtype": "float64", "_type": "Value"}}
SCHEMA = pa.schema([("id", pa.string()), ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    ("text", pa.string()), ("duration", pa.float64())],
                   metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})


def read_rows(manifest, data_folder):
    """[(ID, audio path, transcript, duration)] of a manifest, $data_root replaced."""
    with open(manifest, newline="", encoding="utf-8") as f:
        return [(row["ID"], row["wav"].replace("$data_root", str(data_folder)), row["wrd"], float(row["duration"]))
                for row in csv.DictReader(f)]


def plan_shards(rows, shard_mb):
    """Row ranges [start, stop) of at most `shard_mb` MB of audio each (at least one row)."""
    limit, shards, start, size = shard_mb * 2**20, [], 0, 0
    for i, (_, path, _, _) in enumerate(rows):
        file_size = os.path.getsize(path)
        if i > start and size + file_size > limit:
            shards.append((start, i))
            start, size = i, 0
        size += file_size
    if start < len(rows):
        shards.append((start, len(rows)))
    return shards


def write_split(rows, folder, split, shard_mb):
    """Write the split's shards into `folder` (skipping the complete ones); returns
    (shards written, shards already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(rows, shard_mb)
    written = kept = 0
    for number, (start, stop) in enumerate(shards):
        final = folder / f"{split}-{number:05d}-of-{len(shards):05d}.parquet"
        if final.exists():
            kept += 1
            continue
        part = rows[start:stop]
        table = pa.table({
            "id": [r[0] for r in part],
            "audio": [{"bytes": Path(r[1]).read_bytes(), "path": Path(r[1]).name} for r in part],
            "text": [r[2] for r in part],
            "duration": [r[3] for r in part],
        }, schema=SCHEMA)
        tmp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, tmp, row_group_size=64)  # small row groups: a reader needs little memory
        os.replace(tmp, final)
        written += 1
    for stale in folder.glob(f".{split}-*.tmp"):  # what an interrupted run left
        stale.unlink()
    return written, kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder that receives <split>/ shard folders")
    parser.add_argument("--csv", action="append", default=[], metavar="SPLIT=PATH",
                        help="a manifest (ID, duration, wav, wrd) and its split name; repeat per split")
    parser.add_argument("--data_folder", default=".", help="what $data_root stands for in the manifests")
    parser.add_argument("--librispeech", type=Path, help="an extracted LibriSpeech/ folder instead of --csv")
    parser.add_argument("--train_splits", nargs="+", default=["train-clean-100"])
    parser.add_argument("--other_splits", nargs="+", default=["dev-clean", "test-clean"])
    parser.add_argument("--shard_mb", type=float, default=500.0, help="megabytes of audio per shard")
    args = parser.parse_args(argv)
    manifests = {}
    for item in args.csv:
        split, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"--csv {item}: give SPLIT=PATH with an existing manifest")
        manifests[split] = Path(path)
    if args.librispeech:
        save = args.out / "manifests"
        prepare_librispeech(str(args.librispeech), str(save), args.train_splits, args.other_splits)
        manifests = {Path(p).stem: p for p in sorted(save.glob("*.csv"))}
        args.data_folder = str(args.librispeech)
    if not manifests:
        parser.error("give --csv SPLIT=PATH (repeatable) or --librispeech")
    for split, manifest in manifests.items():
        try:
            rows = read_rows(manifest, args.data_folder)
            written, kept = write_split(rows, args.out / split, split, args.shard_mb)
        except (OSError, KeyError, ValueError) as error:
            print(f"error: {manifest}: {error}", file=sys.stderr)
            return 2
        print(f"{split}: {len(rows)} rows -> {args.out / split} ({written} shard(s) written, "
              f"{kept} already there)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
