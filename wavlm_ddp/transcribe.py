#!/usr/bin/env python3
"""Transcribe audio files with a finished run or an HF export, on CPU or GPU.

    python -m wavlm_ddp.transcribe results/demo/1986 a.wav b.flac           # prints "file<TAB>transcript"
    python -m wavlm_ddp.transcribe results/demo/1986 --csv test.csv --out hyps.csv
    python -m wavlm_ddp.transcribe exported/ a.wav                          # a folder written by export_hf.py
    python -m wavlm_ddp.transcribe results/demo/1986 recordings/ --list more.txt   # a folder's audio; a list file

A file that cannot be read (missing, not audio, truncated) gets one line on stderr
naming it and why; every other file is transcribed, and the exit status is 1 when
some failed (2: the command itself is wrong).

A run folder is code: its `hyperparams.yaml` rebuilds the model (hyperpyyaml can
call any Python function named there), and the checkpoint with the best valid WER
is loaded. Use it for your own runs only. An exported folder (safetensors, JSON and
the SentencePiece model) runs no YAML and unpickles nothing: share models that way.
Files are batched by length (at
most `--batch_seconds` of audio per batch). A file longer than `--chunk_seconds`
is read in windows: each keeps `--chunk_seconds` of frames and sees
`--context_seconds` more audio on both sides, the kept frames are joined and the
file is decoded once, so no word is cut at a window edge (`--chunk_seconds=0`
refuses such files instead). `--beam` decodes with the run's `test_search`
(beam search + n-gram LM, with tune_decoding.py's weights when it ran).
"""

import argparse
import csv
import sys
from pathlib import Path

import torch

from wavlm_ddp.data.audio import audio_files
from wavlm_ddp.inference import open_model


def expand_inputs(arguments, list_files):
    """(key, path) per input: a file as given, a folder's audio files, the paths of
    a list file (one per line; blank lines and # comments skipped)."""
    items = []
    for argument in arguments:
        if Path(argument).is_dir():
            items += [(path, path) for path in audio_files(argument)]
        else:
            items.append((argument, argument))
    for list_file in list_files:
        lines = Path(list_file).read_text().splitlines()
        items += [(line.strip(), line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    return items


def read_csv_paths(csv_path, data_root):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [(row["ID"], row["wav"].replace("$data_root", str(data_root))) for row in rows]


def read_hf_audio(spec, split, id_column, audio_column):
    """{ID: audio value} of an HF dataset (data/hf.py; needs the datasets extra)."""
    from wavlm_ddp.data import hf as hf_data

    dataset = hf_data.open_split(spec, split, split, {"id": id_column or None, "audio": audio_column})
    return dict(zip(hf_data.row_ids(dataset, id_column, split, range(len(dataset))), dataset[audio_column]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder", help="the output_folder of a training run, or a folder written "
                        "by export_hf.py (runs no YAML)")
    parser.add_argument("audio", nargs="*", help="audio files (any rate, any channels) or folders of them")
    parser.add_argument("--list", action="append", default=[], help="a text file of audio paths, one per line")
    parser.add_argument("--csv", help="a manifest (ID, wav, ...) instead of files")
    parser.add_argument("--data_root", default=".", help="replaces $data_root in --csv")
    parser.add_argument("--data", help="an HF dataset (parquet file(s) or a save_to_disk folder) instead of files")
    parser.add_argument("--split", default="test", help="with --data: the split of a save_to_disk DatasetDict")
    parser.add_argument("--id_column", default="id", help="with --data: the ID column ('' for row numbers)")
    parser.add_argument("--audio_column", default="audio", help="with --data: the audio column")
    parser.add_argument("--out", help="write ID/file,transcript rows here (default: stdout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_seconds", type=float, default=60.0, help="audio per batch (padded)")
    parser.add_argument("--chunk_seconds", type=float, default=30.0,
                        help="read longer files in windows of this much kept audio (0: refuse them)")
    parser.add_argument("--context_seconds", type=float, default=5.0,
                        help="audio read on both sides of each window and dropped after the forward pass")
    parser.add_argument("--beam", action="store_true", help="decode with the run's test_search (beam + LM)")
    parser.add_argument("--lm_weight", type=float, help="with --beam: another LM weight")
    parser.add_argument("--word_score", type=float, help="with --beam: another word score")
    args = parser.parse_args(argv)
    sources = None
    if args.data:
        sources = read_hf_audio(args.data, args.split, args.id_column, args.audio_column)
        items = [(key, key) for key in sources]
    elif args.csv:
        items = read_csv_paths(args.csv, args.data_root)
    else:
        missing_lists = [path for path in args.list if not Path(path).is_file()]
        if missing_lists:
            parser.error(f"--list {missing_lists[0]} does not exist")
        items = expand_inputs(args.audio, args.list)
    if not items:
        parser.error("give audio files, folders with audio files, --list, --csv or --data")
    model = open_model(args.output_folder, args.device)
    if args.beam:
        model.use_search(args.lm_weight, args.word_score)
    texts, failed = model.transcribe_files([path for _, path in items], args.batch_seconds, args.chunk_seconds,
                                           args.context_seconds, sources)
    for key, path in items:
        if path in failed:
            print(f"error: {key}: {failed[path]}", file=sys.stderr)
    rows = [(key, texts[path]) for key, path in items if path in texts]
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "transcript"])
            writer.writerows(rows)
    else:
        for key, text in rows:
            print(f"{key}\t{text}")
    if failed:
        print(f"{len(failed)} of {len(items)} file(s) could not be transcribed (listed above)", file=sys.stderr)
    return rows, failed


def cli(argv=None):
    """The command's exit status: 0, 1 when some file failed, 2 when the command is wrong."""
    try:
        _, failures = main(argv)
    except (FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli())
