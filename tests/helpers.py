"""Helpers shared by the tests: the tiny model and a free TCP port."""

import socket

import torch
from transformers import WavLMConfig, WavLMModel

# wavlm-large's layout (layer-norm CNN, stable layer norm) at a toy size.
TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[16] * 7,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    num_buckets=16,
    max_bucket_distance=32,
    mask_time_prob=0.05,  # as wavlm-large: creates masked_spec_embed
)


def save_tiny_wavlm(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    WavLMModel(WavLMConfig(**{**TINY_CONFIG, **overrides})).save_pretrained(folder)
    return folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(capsys, *args):
    """train.py's command in this process (its own entry, `train.run`, from the project
    root): (exit status, stdout, stderr). Logging goes to the captured stdout, as in
    the command. Saves a process start (about 10 s of imports) per run."""
    code = _train_in_root(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_train_captured(*args):
    """run_train where pytest's capsys is not at hand (a module-scoped fixture): the
    output collected here instead, (exit status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = _train_in_root(args)
    return code, out.getvalue(), err.getvalue()


def _train_in_root(args):
    """train.run(args) from the project root, leaving this process as it found it: the
    working folder, the root logger (SpeechBrain points it at the run's log file),
    sys.excepthook and the environment variables SpeechBrain sets."""
    import logging
    import os
    import sys
    from pathlib import Path

    import train

    root = Path(__file__).resolve().parents[1]
    before, environ, hook = Path.cwd(), dict(os.environ), sys.excepthook
    logger = logging.getLogger()
    handlers, level = logger.handlers, logger.level
    os.chdir(root)
    try:
        logger.handlers = [logging.StreamHandler(sys.stdout)]
        return train.run(list(args))
    finally:
        os.chdir(before)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, sys.excepthook = handlers, hook
        logger.setLevel(level)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({key: value for key, value in environ.items() if os.environ.get(key) != value})


def hf_copies(folder, manifests, data_folder):
    """The manifests {split: csv} as parquet shards (recipes/to_parquet.py) and as a
    save_to_disk DatasetDict (splits train / validation / test, no duration column):
    (parquet folder with one subfolder per split, save_to_disk folder)."""
    import datasets

    from recipes.to_parquet import main as to_parquet

    parquet = folder / "parquet"
    args = [f"--csv={split}={path}" for split, path in manifests.items()]
    assert to_parquet([str(parquet), *args, f"--data_folder={data_folder}", "--shard_mb=0.5"]) == 0
    names = {"train": "train", "valid": "validation", "test": "test"}
    splits = {names[split]: datasets.Dataset.from_parquet(sorted(str(p) for p in (parquet / split).glob("*.parquet")))
              .remove_columns(["duration"]) for split in manifests}
    disk = folder / "save_to_disk"
    datasets.DatasetDict(splits).save_to_disk(str(disk))
    return parquet, disk


def worker_pid(marker, rank):
    """The pid of the torchrun worker of `rank` whose command line holds `marker`."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(marker.encode() in part for part in cmdline) and f"RANK={rank}".encode() in environ \
                and b"train.py" in b" ".join(cmdline):
            return int(proc.name)
    return None


def demo_slice(folder, rows):
    """The first rows[split] utterances of each demo manifest, written into `folder`:
    {split: manifest path}."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo_data"
    manifests = {}
    for split, count in rows.items():
        lines = (demo / f"{split}.csv").read_text().splitlines()
        manifests[split] = folder / f"{split}.csv"
        manifests[split].write_text("\n".join(lines[: count + 1]) + "\n")
    return manifests


def wait_for(condition, process, log_path, timeout=600, poll=0.1):
    """Wait until `condition()` holds while `process` runs; fail with its log when it
    ended first or after `timeout` seconds (generous: a loaded CI machine starts slowly)."""
    import time

    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(poll)


def process_tree(root):
    """The pids of `root` and of every process below it (by parent pid: also those
    that started sessions of their own, as torchrun's workers do)."""
    from pathlib import Path

    children = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(proc.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def signal_every_process(root, sig):
    """Send `sig` to every process of a launch at once, as SLURM signals every process
    of a job step (the launcher, torchrun, the workers, their DataLoader workers).
    Returns the pids signalled."""
    import os

    tree = process_tree(root)
    for pid in tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return tree
