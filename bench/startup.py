#!/usr/bin/env python3
"""Start-up cost against corpus size: from the launch to the first optimizer step.

Makes a synthetic corpus of N training rows from the demo clips (CSV rows whose
files are hard links to the 800 demo clips, as one file per utterance; the same rows
as parquet shards with the audio inside, recipes/to_parquet.py), then for each
(format, check workers) starts `launch_ddp.sh` (2 gloo processes) on a fresh output
folder, waits for the first row of train_steps.csv, and stops the run; then starts
it again on the same folder (the check is reused). Also reads the check's own time
from the log ("data check: ... in X s"). No download.

    python bench/startup.py --rows 10000 100000 --out bench/results/cpu_2026-12-01/startup.json
"""

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
sys.path.insert(0, str(ROOT))

from recipes.to_parquet import main as to_parquet  # noqa: E402


def make_corpus(folder, rows):
    """train.csv with `rows` rows (hard links to the demo clips), the demo's valid and
    test manifests, and the same three as parquet: (csv args, parquet args)."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    with open(DEMO / "train.csv", newline="") as f:
        demo = list(csv.DictReader(f))
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(demo[0]))
        writer.writeheader()
        for i in range(rows):
            row = dict(demo[i % len(demo)])
            source = DEMO / row["wav"].replace("$data_root/", "")
            target = audio / f"utt-{i:07d}{source.suffix}"
            os.link(source, target)
            writer.writerow({**row, "ID": f"utt-{i:07d}", "wav": f"$data_root/audio/{target.name}"})
    for split in ("valid", "test"):
        shutil.copy(DEMO / f"{split}.csv", folder / f"{split}.csv")
        for row in csv.DictReader(open(DEMO / f"{split}.csv", newline="")):
            name = row["wav"].replace("$data_root/audio/", "")
            os.link(DEMO / "audio" / name, audio / name)
    started = time.time()
    to_parquet([str(folder / "parquet"), *(f"--csv={s}={folder / f'{s}.csv'}" for s in ("train", "valid", "test")),
                f"--data_folder={folder}"])
    convert_s = time.time() - started
    csv_args = [f"--data_folder={folder}"] + [f"--{s}_csv={folder / f'{s}.csv'}" for s in ("train", "valid", "test")]
    parquet_args = [f"--data_folder={folder}"] + [f"--{s}_data={folder / 'parquet' / s}"
                                                  for s in ("train", "valid", "test")]
    return csv_args, parquet_args, convert_s


def until_first_step(args, out, log_path, timeout):
    """Seconds from starting launch_ddp.sh to the first train_steps.csv row; the run
    is stopped then. Returns (seconds, the log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Each configuration builds its own Arrow cache of the parquet shards (its first launch pays it).
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1", "PYTHON": os.environ.get("PYTHON", sys.executable),
           "HF_DATASETS_CACHE": str(out.parent / f"hf-cache-{out.name}")}
    (out / "train_steps.csv").unlink(missing_ok=True)  # a rerun waits for its own first step
    command = [str(ROOT / "launch_ddp.sh"), *args, f"--output_folder={out}", "--noprogressbar",
               f"--wavlm_source={out.parent / 'wavlm-small'}"]
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        steps = out / "train_steps.csv"
        while not (steps.exists() and len(steps.read_text().splitlines()) > 1):
            if process.poll() is not None or time.time() - started > timeout:
                stop(process, out)
                raise SystemExit(f"no first step: {log_path}\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        seconds = time.time() - started
        stop(process, out)
    return seconds, log_path.read_text()


def stop(process, out):
    """Kill launch_ddp.sh, torchrun and the workers (which run in sessions of their own)."""
    for pid in [process.pid] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
        try:
            if pid == process.pid or str(out).encode() in (Path("/proc") / str(pid) / "cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    process.wait()
    time.sleep(1)  # the workers' ports and the folder's lock holder are gone


def check_seconds(log):
    found = re.findall(r"data check: (reused the saved check|checked every row \(\d+ worker\(s\)\)) in ([\d.]+) s",
                       log)
    return float(found[0][1]) if found else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["csv", "parquet"])
    parser.add_argument("--out", type=Path, default=Path("results/bench/startup.json"))
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    results = []
    for rows in args.rows:
        folder = Path(tempfile.mkdtemp(prefix=f"startup-{rows}-"))
        csv_args, parquet_args, convert_s = make_corpus(folder, rows)
        print(f"{rows} rows: corpus made, parquet conversion {convert_s:.1f} s", flush=True)
        for fmt in args.formats:
            data = csv_args if fmt == "csv" else parquet_args
            for workers in args.workers:
                out = folder / f"run-{fmt}-{workers}"
                common = [*data, f"--check_workers={workers}"]
                first, log = until_first_step(common, out, folder / f"{out.name}.log", args.timeout)
                again, log2 = until_first_step(common, out, folder / f"{out.name}-again.log", args.timeout)
                row = {"rows": rows, "format": fmt, "check_workers": workers,
                       "first_launch_to_step_s": round(first, 1), "first_check_s": check_seconds(log),
                       "reused_launch_to_step_s": round(again, 1), "reused_check_s": check_seconds(log2),
                       "parquet_conversion_s": round(convert_s, 1) if fmt == "parquet" else None}
                results.append(row)
                print(json.dumps(row), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
