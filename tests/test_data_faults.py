"""The data as a cluster's file systems and processes deliver it: a shard rewritten
with its size and modification time kept (`cp -p`, `rsync -t`, `tar x`), audio that
rows name by path changed under them, a shard whose rows were reordered, ranks that
read other training data than rank 0, and a check worker that dies. Decided with
train.py's --check_only in this process where a run is needed."""

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ddp_worker
from ddp_worker import results_of
from helpers import demo_slice, hf_copies, run_train
from wavlm_ddp.data import manifests, pipeline
from wavlm_ddp.preflight import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
ROWS = {"train": 40, "valid": 6, "test": 6}
REUSED = "their audio was not read again"


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory):
    """A slice of the demo corpus as parquet shards, one folder per split."""
    folder = tmp_path_factory.mktemp("hf")
    parquet, _ = hf_copies(folder, demo_slice(folder, ROWS), DEMO)
    return parquet


@pytest.fixture
def check(tmp_path, capsys, monkeypatch):
    def run(*args):
        monkeypatch.setattr(pipeline, "_opened", {})  # each run is a process of its own
        return run_train(capsys, *args, f"--wavlm_source={tmp_path / 'wavlm-small'}", "--check_only",
                         "--world_size=2", "--noprogressbar")
    return run


def data_args(data):
    return [f"--{split}_data={data / split}" for split in ROWS]


def error_line(code, err):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def rewrite_keeping_size_and_mtime(path, change):
    """Write change(bytes) over `path` (as long as before) and set its access and
    modification times back, as `cp -p`, `rsync -t` or `tar x` leave a copy."""
    before = path.stat()
    data = path.read_bytes()
    changed = change(data)
    assert len(changed) == len(data) and changed != data
    path.write_bytes(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def break_one_clip(shard):
    """Overwrite an Ogg page signature inside `shard` where it changes one clip alone
    (parquet keeps no checksum; snappy keeps most audio bytes as they are, and others
    as copies of earlier bytes, which a change there would reach too): (row, ID)."""
    rows = pq.read_table(shard).to_pylist()
    data = shard.read_bytes()
    start = 0
    while (at := data.find(b"OggS", start)) >= 0:
        rewrite_keeping_size_and_mtime(shard, lambda d: d[:at] + b"Junk" + d[at + 4:])
        broken = [i for i, row in enumerate(pq.read_table(shard).to_pylist())
                  if row["audio"]["bytes"] != rows[i]["audio"]["bytes"]]
        if len(broken) == 1:
            return broken[0], rows[broken[0]]["id"]
        rewrite_keeping_size_and_mtime(shard, lambda d: data)
        start = at + 1
    raise AssertionError(f"no signature of one clip alone in {shard}")


def test_a_shard_rewritten_with_its_size_and_mtime_kept_is_checked_again_and_its_bad_row_found(hf_corpus, check,
                                                                                             tmp_path):
    data = tmp_path / "data"
    shutil.copytree(hf_corpus, data)
    out = tmp_path / "out"
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0 and REUSED not in stdout, err[-3000:]
    shards = sorted((data / "train").glob("*.parquet"))
    shards[-1].write_bytes(shards[-1].read_bytes())  # the same bytes, a new modification time: nothing to check
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0 and REUSED in stdout, err[-3000:]

    row, utt_id = break_one_clip(shards[-1])
    first = sum(pq.read_metadata(shard).num_rows for shard in shards[:-1])  # numbered over the split's shards
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    # The clip lost an Ogg page: unreadable, or shorter than its duration column says.
    assert error_line(code, err).startswith(f"{data / 'train'} [train]:{first + row} ({utt_id}): "), err[-3000:]
    assert "error: 1 bad row(s) in the data" in err and REUSED not in stdout


def test_audio_that_rows_name_by_path_is_checked_again_when_a_file_changes(hf_corpus, check, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(hf_corpus, data)
    shard = sorted((data / "train").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = table.to_pylist()
    for row in rows:  # the audio beside the shard, named by path instead of held as bytes
        clip = clips / f"{row['id']}.ogg"
        clip.write_bytes(row["audio"]["bytes"])
        row["audio"] = {"bytes": None, "path": str(clip)}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard, row_group_size=64)
    out = tmp_path / "out"
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0 and REUSED not in stdout, err[-3000:]
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert code == 0 and REUSED in stdout, err[-3000:]

    (clips / f"{rows[3]['id']}.ogg").write_bytes(b"not audio at all")  # the shard itself unchanged
    code, stdout, err = check(*data_args(data), f"--output_folder={out}")
    assert error_line(code, err).startswith(f"{data / 'train'} [train]:3 ({rows[3]['id']}): unreadable or corrupt "
                                            "audio"), err[-3000:]


def hf_hparams(data, check_file):
    """The keys read_datasets reads for a run whose splits are all parquet."""
    return {**{f"{split}_data": str(data / split) for split in ROWS}, "hf_splits": None,
            "hf_columns": {"id": "id", "audio": "audio", "text": "text", "duration": "duration"},
            "max_duration": 10.0, "manifest_check_file": str(check_file)}


def test_bad_rows_are_left_out_by_id_so_a_reordered_shard_loses_the_same_utterances(hf_corpus, check, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(hf_corpus, data)
    shards = sorted((data / "train").glob("*.parquet"))
    table = pq.read_table(shards[0])
    rows = table.to_pylist()
    rows[1]["text"] = rows[4]["text"] = " "  # two empty transcripts among good rows
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shards[0], row_group_size=64)
    out = tmp_path / "out"
    args = [*data_args(data), f"--output_folder={out}", "--skip_invalid=True",
            "--global_batch_tolerance=0.5"]  # 38 utterances fill the demo's batches less
    code, stdout, err = check(*args)
    assert code == 0 and "skip_invalid: 2 utterance(s) left out" in stdout, err[-3000:]
    check_file = out / "save" / "manifest_check.json"
    saved = [manifests.BadRow(**row) for row in json.loads(check_file.read_text())["bad"]]
    assert [(b.row, b.utt_id) for b in saved] == [(1, rows[1]["id"]), (4, rows[4]["id"])]

    def kept(bad_rows):
        pipeline._opened.clear()
        datasets, _ = pipeline.read_datasets(hf_hparams(data, check_file), bad_rows)
        return set(pipeline.dataset_ids(datasets["train"]))

    every = {row["id"] for shard in shards for row in pq.read_table(shard).to_pylist()}
    assert every - kept(saved) == {rows[1]["id"], rows[4]["id"]}
    before = shards[0].stat()
    pq.write_table(pa.Table.from_pylist(rows[::-1], schema=table.schema), shards[0], row_group_size=64)
    os.utime(shards[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert every - kept(saved) == {rows[1]["id"], rows[4]["id"]}  # the saved check, by ID: the same rows

    code, stdout, err = check(*args)
    assert code == 0 and REUSED not in stdout, err[-3000:]  # the content changed: checked again
    again = [manifests.BadRow(**row) for row in json.loads(check_file.read_text())["bad"]]
    last = len(rows) - 1
    assert [(b.row, b.utt_id) for b in again] == [(last - 4, rows[4]["id"]), (last - 1, rows[1]["id"])]


# ---- Ranks that read other training data than rank 0 ----

# The demo YAML's batching keys.
PLAN_HPARAMS = {"dynamic_batch_sampler": {"max_batch_length": 12.0, "num_buckets": 10, "shuffle": True,
                                          "batch_ordering": "random", "seed": 1986},
                "batches_per_bucket": 10, "global_batch_seconds": 24.0, "number_of_epochs": 2,
                "global_batch_tolerance": 0.25, "max_duration": 10.0, "manifest_check_file": "save/check.json"}


def same_view(rows, rank):
    return rows


def one_utterance_longer_on_rank_1(rows, rank):
    if rank == 1:
        first = next(iter(rows))
        rows = {**rows, first: {**rows[first], "duration": rows[first]["duration"] + 0.5}}
    return rows


def three_utterances_on_rank_1(rows, rank):
    return dict(list(rows.items())[:3]) if rank == 1 else rows


def plans_compared(view):
    """training_plan on 2 ranks over the demo training manifest as `view(rows, rank)`
    shows it to each rank: {"error": the ConfigError's text or None, "steps"}."""
    import speechbrain as sb
    import torch.distributed as dist

    rows = view(manifests.read_manifest(DEMO / "train.csv", DEMO), dist.get_rank())
    data = sb.dataio.dataset.DynamicItemDataset(rows).filtered_sorted(sort_key="duration")
    try:
        plan, _ = pipeline.training_plan(PLAN_HPARAMS, data, 2, SimpleNamespace(debug=False))
    except ConfigError as error:
        return {"error": str(error), "steps": None}
    return {"error": None, "steps": plan.steps_per_epoch}


# spawn_scenarios finds a scenario by its name in ddp_worker. The spawned ranks import
# this module when they unpickle the `view` functions, which registers it there too.
ddp_worker.plans_compared = plans_compared


def two_rank_plan(base, tiny_wavlm_dir):
    """The 2-rank scenarios of this module (run in conftest's one 2-rank spawn for the
    whole suite, conftest.two_rank_scenarios)."""
    return {name: ("plans_compared", dict(view=view)) for name, view in [
        ("same", same_view), ("longer", one_utterance_longer_on_rank_1), ("fewer", three_utterances_on_rank_1)]}


@pytest.fixture(scope="module")
def plan_runs(two_rank_scenarios):
    return two_rank_scenarios[__name__][1]


def test_ranks_that_read_the_same_data_plan_the_same_batches(plan_runs):
    ranks = results_of(plan_runs, "same")
    assert ranks[0] == ranks[1] and ranks[0]["error"] is None and ranks[0]["steps"][0] > 0


@pytest.mark.parametrize("scenario,why", [
    ("longer", "rank 1: other durations: "),
    ("fewer", "rank 1: 3 training utterances, rank 0 has 800"),  # rank 1 alone cannot fill a step
])
def test_a_rank_that_reads_other_training_data_stops_every_rank_with_one_line_naming_it(plan_runs, scenario, why):
    ranks = results_of(plan_runs, scenario)
    assert ranks[0] == ranks[1]  # the same error on every rank, none left waiting
    error = ranks[0]["error"]
    assert error.startswith(f"the ranks planned different training batches: rank 1 differs from rank 0 ({why}")
    assert "\n" not in error
    assert "rank 0:" not in error and "delete save/check.json" in error


# ---- A check worker that dies ----

def killed_at(monkeypatch, clip, once_flag=None):
    """Make the check of `clip` kill its process with SIGKILL: always (a file the audio
    library cannot survive), or only the first time, as the out-of-memory killer
    takes a worker once (`once_flag`: a file that says it happened)."""
    real = manifests.audio_problems

    def audio_problems(source, limits, stated):
        if str(source).endswith(clip) and not (once_flag and once_flag.exists()):
            if once_flag:
                once_flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(source, limits, stated)
    monkeypatch.setattr(manifests, "audio_problems", audio_problems)


@pytest.mark.parametrize("always", [True, False], ids=["every-time", "once"])
def test_a_check_worker_killed_mid_check_is_one_line_naming_its_rows(tmp_path, check, monkeypatch, always):
    monkeypatch.setattr(manifests, "CHUNK_ROWS", 100)  # 8 chunks of the 800 training rows, on 2 workers
    train = DEMO / "train.csv"
    line = 250
    wav = train.read_text().splitlines()[line - 1].split(",")[2]
    clip = Path(wav).name
    killed_at(monkeypatch, clip, None if always else tmp_path / "killed")
    out = tmp_path / "out"
    code, _, err = check(f"--output_folder={out}", "--check_workers=2")
    error = error_line(code, err)
    where = f"error: a check worker was killed by SIGKILL while checking {train.relative_to(ROOT)} lines 202-301"
    if always:
        assert error == (f"{where}, and checking {train.relative_to(ROOT)} line {line} ({wav}) alone is killed by "
                         "SIGKILL too: reading it takes more memory than the job has, or kills the audio library: "
                         "remove or re-encode that file")
    else:
        assert error.startswith(f"{where}; one row at a time they pass, so most likely the out-of-memory killer: "
                                "give the job more memory, or lower --check_workers")
    assert multiprocessing.active_children() == []  # no worker left behind
    assert not out.exists()


def test_check_workers_find_the_bad_rows_one_process_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(manifests, "CHUNK_ROWS", 100)  # 9 chunks on 3 workers
    lines = (DEMO / "train.csv").read_text().splitlines()
    for at, ghost in ((150, "ghost-a"), (420, "ghost-b"), (790, "ghost-c")):
        lines.insert(at, f"{ghost},1.5,$data_root/audio/{ghost}.ogg,x,SIX RED CAT")
    train = tmp_path / "train.csv"
    train.write_text("\n".join(lines) + "\n")
    limits = manifests.AudioLimits(16000, True, 400, 0.1)
    charset = manifests.training_charset(train)
    one = manifests.validate_manifests({"train": train}, DEMO, limits, charset, workers=1)
    assert [b.utt_id for b in one] == ["ghost-a", "ghost-b", "ghost-c"]
    assert manifests.validate_manifests({"train": train}, DEMO, limits, charset, workers=3) == one
    assert multiprocessing.active_children() == []


SLOW_CHECK = """
import os, sys, time
from wavlm_ddp.data import manifests

def slow(chunk):
    time.sleep(120)  # a check that outlives the test unless its worker is ended
    return []

print(os.getpid(), flush=True)
manifests._forked_map(slow, [[1], [2]], 2, lambda chunk: "a block")
"""


def test_check_workers_end_with_a_rank_that_is_killed(tmp_path):
    """The data check's workers are forked by the rank (or launch_ddp.sh's check process)
    that checks; SIGKILL to it (the OOM killer, torchrun ending a group) ends them too:
    none reads audio on for a rank that is gone."""
    import subprocess
    import sys
    import time

    from helpers import process_tree

    parent = subprocess.Popen([sys.executable, "-c", SLOW_CHECK], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    deadline = time.time() + 60
    while len(process_tree(pid)) < 3 and time.time() < deadline:  # the parent and its 2 workers
        time.sleep(0.05)
    workers = [p for p in process_tree(pid) if p != pid]
    assert len(workers) == 2
    os.kill(pid, signal.SIGKILL)
    parent.wait()

    def alive(p):
        try:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30  # the kernel's parent-death signal: at once; generous for a loaded machine
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert [p for p in workers if alive(p)] == []
