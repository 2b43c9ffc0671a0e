"""Checkpoints made durable before their commit and verified by content, and a full disk
outside the checkpoint writes (train_steps.csv each step, the epoch report, the checkpoint
folder's creation): one line on every rank, no rank left waiting, the checkpoints intact.

The 2-rank scenarios run in the suite's one spawn (conftest.two_rank_scenarios). Their functions live here and
register themselves in ddp_worker: the spawned ranks import this module when they unpickle
the functions passed to the scenarios."""

import builtins
import errno
import io
import json
import logging
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from speechbrain.dataio.dataloader import SaveableDataLoader
from speechbrain.utils.checkpoints import METAFNAME
from speechbrain.utils.epoch_loop import EpochCounter
from speechbrain.utils.train_logger import FileTrainLogger

import ddp_worker
from ddp_worker import results_of
from wavlm_ddp.faults.checkpoints import PENDING_META, SafeCheckpointer
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.training.brain import RecipeBrain
from wavlm_ddp.training.reporting import append_step_row, report_epoch
from wavlm_ddp.training.schedule import TrainingPlan

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
RERUN = "(or set another --output_folder), then rerun the same command to resume from the last checkpoint"


# ---- A disk that fills up ----

class FillingFile:
    """A file on a disk with `disk.free` bytes left: a write stores what fits, then fails
    with ENOSPC, as a full file system answers. No fileno: writers that would write to
    the descriptor themselves (PIL) write through `write`."""

    def __init__(self, file, disk, path):
        self._file, self._disk, self._path = file, disk, path

    def write(self, data):
        fits = min(len(data), self._disk.free)
        self._file.write(data[:fits])
        self._disk.free -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, NO_SPACE, self._path)
        return fits

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


@contextmanager
def disk_full_at(prefix, free=0):
    """Files whose name starts with `prefix`, opened for writing in this process (by
    open, io.open or pathlib), lie on a disk with `free` bytes left; other files write."""
    real = builtins.open
    disk = SimpleNamespace(free=free)

    def opened(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        named = isinstance(file, (str, bytes, os.PathLike))  # not a descriptor; TensorBoard passes bytes
        if named and os.path.basename(os.fsdecode(file)).startswith(prefix) and set(mode) & set("wax+"):
            return FillingFile(handle, disk, os.fsdecode(file))
        return handle

    builtins.open = io.open = opened
    try:
        yield disk
    finally:
        builtins.open = io.open = real


def on_rank_0(context):
    """`context` on rank 0 (the main process, which writes), nothing on the others."""
    import torch.distributed as dist

    return context if dist.get_rank() == 0 else nullcontext()


# ---- Checkpoints of every kind of file the recipe saves ----

def recipe_checkpointer(folder):
    """A SafeCheckpointer over one of each kind of recoverable the recipe saves (small
    ones): a module and its optimizer (torch.save), the epoch counter, the Brain's YAML
    with the plan, the random states, the training loader's position. Returns
    (checkpointer, {name: object})."""
    checkpointer = SafeCheckpointer(folder)
    model = torch.nn.Linear(2, 2)
    brain = RecipeBrain(modules={"model": model}, run_opts={"device": "cpu"}, checkpointer=checkpointer)
    brain.plan = TrainingPlan(world_size=1, accumulation=1, per_rank_seconds=1.0, global_seconds=1.0,
                              steps_per_epoch=[4], mean_step_seconds=1.0)
    objects = {"model": model, "model_opt": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
               "counter": EpochCounter(3), "dataloader-TRAIN": SaveableDataLoader(list(range(8)), batch_size=2)}
    checkpointer.add_recoverables(objects)
    return checkpointer, {**objects, "brain": brain}


def save_two(folder):
    """Two intra-epoch checkpoints in `folder`, the model's weights all 1 in the first and
    2 in the second: (first, second)."""
    checkpointer, objects = recipe_checkpointer(folder)
    batches = iter(objects["dataloader-TRAIN"])
    saved = []
    for value in (1.0, 2.0):
        objects["model"](torch.ones(1, 2)).sum().backward()
        objects["model_opt"].step()
        objects["model"].weight.data.fill_(value)
        objects["counter"].current = int(value)
        next(batches)
        objects["brain"].step = objects["brain"].optimizer_step = int(value)
        objects["brain"].random_states.capture()
        saved.append(checkpointer.save_checkpoint(end_of_epoch=False).path)
    return saved


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A folder with the two checkpoints of save_two, to copy: (folder, first, second)."""
    folder = tmp_path_factory.mktemp("two_checkpoints") / "save"
    first, second = save_two(folder)
    return folder, first.name, second.name


def recover(folder):
    """Recover `folder` into fresh objects: (the checkpoint's folder name, its model weight)."""
    checkpointer, objects = recipe_checkpointer(folder)
    checkpoint = checkpointer.recover_if_possible()
    return checkpoint.path.name, objects["model"].weight.unique().tolist()


def emptied(path):
    """`path` as a crash leaves a file whose data never reached the disk: 0 bytes."""
    os.truncate(path, 0)


def cut_to_3_bytes(path):
    os.truncate(path, 3)


def cut_in_half(path):
    os.truncate(path, path.stat().st_size // 2)


def deleted(path):
    path.unlink()


def test_an_intact_checkpoint_of_every_kind_of_file_is_the_one_recovered(two_checkpoints, tmp_path, caplog):
    folder, _, second = two_checkpoints
    shutil.copytree(folder, tmp_path / "save")
    assert {p.name for p in (tmp_path / "save" / second).iterdir()} == {
        METAFNAME, "model.ckpt", "model_opt.ckpt", "counter.ckpt", "brain.ckpt", "random_states.ckpt",
        "dataloader-TRAIN.ckpt"}
    with caplog.at_level(logging.WARNING):
        assert recover(tmp_path / "save") == (second, [2.0])
    assert "damaged" not in caplog.text


def test_the_checkpoint_of_a_training_run_reads_back_whole_file_by_file(caplog):
    """tests/data/run_2026-11-30: a checkpoint that train.py saved (without random_states.ckpt,
    which is optional), checked with recoverables of the kinds the recipe registers."""
    save = Path(__file__).parent / "data" / "run_2026-11-30" / "save"
    checkpointer, objects = recipe_checkpointer(save)
    del checkpointer.recoverables["model"], checkpointer.recoverables["model_opt"]
    checkpointer.add_recoverables({"wavlm": torch.nn.Linear(1, 1), "ctc_head": torch.nn.Linear(1, 1),
                                   "wavlm_opt": objects["model_opt"], "head_opt": objects["model_opt"]})
    with caplog.at_level(logging.WARNING):
        checkpoint = checkpointer.find_checkpoint()
    assert checkpoint.path == next(save.glob("CKPT+*")) and "damaged" not in caplog.text
    assert sorted(checkpoint.paramfiles) == sorted(set(checkpointer.recoverables) - {"random_states"})


def recovered_after_damage(two_checkpoints, tmp_path, caplog, file, damage):
    """A copy of the two checkpoints with `file` of the newest damaged, recovered: the one
    before loads. Returns (the copy's save folder, the newest checkpoint's name)."""
    folder, first, second = two_checkpoints
    save = tmp_path / "save"
    shutil.copytree(folder, save)
    damage(save / second / file)
    with caplog.at_level(logging.WARNING):
        assert recover(save) == (first, [1.0])
    return save, second


@pytest.mark.parametrize("file,damage", [
    ("model.ckpt", emptied),
    ("model.ckpt", cut_to_3_bytes),
    ("model_opt.ckpt", cut_in_half),
    ("counter.ckpt", emptied),
    ("brain.ckpt", emptied),
    ("brain.ckpt", cut_in_half),
    ("dataloader-TRAIN.ckpt", emptied),
    ("random_states.ckpt", cut_to_3_bytes),
    ("model.ckpt", deleted),
])
def test_a_damaged_file_of_the_newest_checkpoint_makes_the_one_before_load(two_checkpoints, tmp_path, caplog,
                                                                            file, damage):
    save, second = recovered_after_damage(two_checkpoints, tmp_path, caplog, file, damage)
    named = f"{file} (missing)" if damage is deleted else file
    assert f"Checkpoint {save / second} is damaged ({named} do(es) not load): skipped for the next one" in caplog.text


def test_a_newest_checkpoint_whose_meta_file_is_emptied_is_skipped_for_the_one_before(two_checkpoints, tmp_path,
                                                                                      caplog):
    save, second = recovered_after_damage(two_checkpoints, tmp_path, caplog, METAFNAME, emptied)
    assert f"Checkpoint {save / second} is damaged ({METAFNAME} does not load" in caplog.text


# ---- The commit: every file and the folders reach the disk around the rename ----

@pytest.fixture
def disk_calls(monkeypatch):
    """os.open / os.fsync / os.replace / os.rename as the commit calls them: a list of
    ("fsync", path) and ("rename", source, target), in order."""
    calls, opened = [], {}
    real_open, real_fsync, real_replace, real_rename = os.open, os.fsync, os.replace, os.rename

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def fsync(fd):
        calls.append(("fsync", opened[fd]))
        real_fsync(fd)

    def renamer(real):
        def rename(source, target, *args, **kwargs):
            calls.append(("rename", Path(source), Path(target)))
            real(source, target, *args, **kwargs)
        return rename

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return calls


def test_the_commit_fsyncs_every_file_and_the_folder_before_the_rename_and_the_folders_after(tmp_path, disk_calls):
    checkpointer, objects = recipe_checkpointer(tmp_path / "save")
    objects["brain"].random_states.capture()
    folder = checkpointer.save_checkpoint(end_of_epoch=False).path
    files = sorted(p for p in folder.iterdir() if p.name != METAFNAME)
    assert len(files) == 6  # every recoverable's file
    pending = folder / PENDING_META
    assert disk_calls == [
        *sorted([("fsync", p) for p in files] + [("fsync", pending)]),  # every file, the meta file among them
        ("fsync", folder),
        ("rename", pending, folder / METAFNAME),  # the commit
        ("fsync", folder),
        ("fsync", tmp_path / "save"),
    ]


def test_a_commit_whose_fsync_fails_leaves_no_committed_folder_and_the_last_checkpoint_loads(tmp_path, monkeypatch):
    checkpointer, objects = recipe_checkpointer(tmp_path / "save")
    objects["model"].weight.data.fill_(1.0)
    first = checkpointer.save_checkpoint(end_of_epoch=False).path
    objects["model"].weight.data.fill_(2.0)
    real_fsync, save_fd = os.fsync, os.open(tmp_path / "save", os.O_RDONLY)

    def fsync(fd):  # the last step, after the rename: the parent folder's entry
        if os.path.samestat(os.fstat(fd), os.fstat(save_fd)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ConfigError) as refused:
        checkpointer.save_checkpoint(end_of_epoch=False)
    monkeypatch.undo()
    os.close(save_fd)
    assert str(refused.value).startswith(f"could not save a checkpoint in {tmp_path / 'save'} "
                                         f"({os.strerror(errno.EIO)}): the partial save was removed and the 1 earlier")
    assert sorted((tmp_path / "save").iterdir()) == [first]
    assert recover(tmp_path / "save") == (first.name, [1.0])


# ---- A full disk outside the checkpoint writes, on one process ----

def fake_brain(output, tensorboard=False):
    """What report_epoch reads of the Brain, writing into `output` as train.py's does."""
    hparams = SimpleNamespace(output_folder=str(output), train_logger=FileTrainLogger(output / "train_log.txt"),
                              use_tensorboard=tensorboard, tensorboard_folder=output / "tensorboard")
    brain = SimpleNamespace(hparams=hparams, optimizer_step=0,
                            train_stats={"loss": 3.1, "audio_s_per_s": 50.0, "peak_mem_GiB": 0.5})
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        brain.tensorboard = SummaryWriter(hparams.tensorboard_folder)
    return brain


def report(brain, epoch):
    brain.optimizer_step = 5 * epoch
    report_epoch(brain, epoch, {"loss": 3.0 - epoch / 10, "CER": 90.0, "WER": 100.0}, {"lr_head": 0.1})


# The report's files in the order it writes them, and the epochs history.json holds once the
# disk is full at each (epoch 2's record is written before the plot and TensorBoard).
@pytest.mark.parametrize("prefix,named,epochs", [
    ("train_log.txt", "train_log.txt", [1]),
    ("history.json", "history.json", [1]),  # written as history.json.tmp, then renamed
    ("training_curves", "training_curves.png", [1, 2]),  # written as training_curves.tmp.png
    # TensorBoard's event file, written by its own thread, which keeps the error for the next flush
    # and also raises it (a thread exception that pytest reports as a warning).
    pytest.param("events.out.tfevents", "tensorboard", [1, 2],
                 marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")),
])
def test_a_full_disk_during_the_epoch_report_is_one_line_naming_the_file_and_the_fix(tmp_path, prefix, named,
                                                                                     epochs):
    brain = fake_brain(tmp_path, tensorboard=prefix == "events.out.tfevents")
    report(brain, 1)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with disk_full_at(prefix, free=10), pytest.raises(ConfigError) as refused:
        report(brain, 2)
    assert str(refused.value) == (f"could not write {tmp_path / named} ({NO_SPACE}); the checkpoints saved so far "
                                  f"are intact: free space {RERUN}")
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())] == epochs
    if prefix != "events.out.tfevents":  # appended and cut back, or written aside and renamed: as it was
        assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.glob(f"{prefix}*")} == {
            name: data for name, data in before.items() if name.name.startswith(prefix)}


# ---- The same faults on 2 ranks ----

def holder_checkpointer(folder):
    """A SafeCheckpointer over a module holding one value and an epoch counter."""
    holder = torch.nn.Module()
    holder.value = torch.nn.Parameter(torch.zeros(1))
    return SafeCheckpointer(folder, recoverables={"holder": holder, "counter": EpochCounter(3)}), holder


def damaged_on_two_ranks(base, damages):
    """For each (file, damage) of `damages`, in a folder of its own: two checkpoints (value
    1 at epoch 1, then 2 at epoch 2), the main process damages the newest one's `file`,
    then every rank recovers: [{"saved": the folders, oldest first, "recovered": the
    folder recovered, "value", "epoch", "error"}]."""
    import torch.distributed as dist

    results = []
    for i, (file, damage) in enumerate(damages):
        checkpointer, holder = holder_checkpointer(Path(base) / f"case{i}")
        counter = checkpointer.recoverables["counter"]
        for value in (1.0, 2.0):
            holder.value.data.fill_(value)
            counter.current = int(value)
            checkpointer.save_checkpoint()
        saved = [c.path for c in sorted(checkpointer.list_checkpoints(), key=lambda c: c.meta["unixtime"])]
        if dist.get_rank() == 0:
            damage(saved[-1] / file)
        dist.barrier()
        holder.value.data.fill_(0.0)
        counter.current = 0
        try:
            recovered = checkpointer.recover_if_possible().path.name
            error = None
        except ConfigError as refused:
            recovered, error = None, str(refused)
        results.append({"saved": [p.name for p in saved], "recovered": recovered, "value": holder.value.item(),
                        "epoch": counter.current, "error": error})
    return results


def steps_on_a_full_disk(base, disk):
    """append_step_row on every rank for steps 1-3; the main process's disk has room for
    5 more bytes from step 3 on (part of the row, then ENOSPC). Then a step row once space
    is free again: {"errors": [per step], "csv": the file after the failure, "after": after
    the next row}."""
    import torch.distributed as dist

    path = Path(base) / "train_steps.csv"
    model = torch.nn.Linear(2, 2)
    optimizers = {"head": torch.optim.SGD(model.parameters(), lr=0.5)}
    errors = []
    for step in (1, 2, 3):
        full = on_rank_0(disk(path.name, free=5)) if step == 3 else nullcontext()
        try:
            with full:
                append_step_row(path, step, 1, optimizers, False, torch.tensor(3.0 - step / 10))
            errors.append(None)
        except ConfigError as error:
            errors.append(str(error))
    csv = path.read_text() if dist.get_rank() == 0 else None
    append_step_row(path, 3, 1, optimizers, False, torch.tensor(2.7))  # the rerun's row, after the fix
    return {"errors": errors, "csv": csv, "after": path.read_text() if dist.get_rank() == 0 else None}


def epoch_report_on_a_full_disk(base, disk):
    """Epoch 1: its report, then a checkpoint; epoch 2: its report finds the main
    process's disk full at history.json. Then every rank recovers: {"error", "history":
    the epochs in history.json, "recovered": the value recovered}."""
    base = Path(base)
    brain = fake_brain(base)
    checkpointer, holder = holder_checkpointer(base / "save")
    report(brain, 1)
    holder.value.data.fill_(1.0)
    checkpointer.save_checkpoint(meta={"WER": 100.0})
    holder.value.data.fill_(2.0)
    try:
        with on_rank_0(disk("history.json", free=0)):
            report(brain, 2)
        error = None
    except ConfigError as refused:
        error = str(refused)
    holder.value.data.fill_(0.0)
    checkpointer.recover_if_possible()
    return {"error": error, "history": [r["epoch"] for r in json.loads((base / "history.json").read_text())],
            "recovered": holder.value.item()}


def checkpoint_folder_on_a_full_disk(base, disk):
    """One checkpoint saved; the next one's folder cannot be made on the main process
    (ENOSPC from mkdir). Then every rank recovers: {"error", "folders", "recovered"}."""
    import torch.distributed as dist

    checkpointer, holder = holder_checkpointer(Path(base))
    holder.value.data.fill_(1.0)
    checkpointer.save_checkpoint(meta={"WER": 50.0})
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith("CKPT+"):
            raise OSError(errno.ENOSPC, NO_SPACE, str(self))
        return real_mkdir(self, *args, **kwargs)

    holder.value.data.fill_(2.0)
    if dist.get_rank() == 0:
        Path.mkdir = mkdir
    try:
        checkpointer.save_checkpoint(meta={"WER": 40.0})
        error = None
    except ConfigError as refused:
        error = str(refused)
    finally:
        Path.mkdir = real_mkdir
    holder.value.data.fill_(0.0)
    checkpointer.recover_if_possible()
    return {"error": error, "folders": len(list(Path(base).glob("CKPT+*"))), "recovered": holder.value.item()}


for _scenario in (damaged_on_two_ranks, steps_on_a_full_disk, epoch_report_on_a_full_disk,
                  checkpoint_folder_on_a_full_disk):
    setattr(ddp_worker, _scenario.__name__, _scenario)

DAMAGES = [("holder.ckpt", emptied), ("holder.ckpt", cut_to_3_bytes), ("counter.ckpt", emptied)]


def two_rank_plan(base, tiny_wavlm_dir):
    """Every 2-rank scenario of this module (run in conftest's one 2-rank spawn for the
    whole suite, conftest.two_rank_scenarios), with their folders under `base`."""
    for name in ("damaged", "steps", "report", "folder"):
        (base / name).mkdir()
    return {
        "damaged": ("damaged_on_two_ranks", dict(base=str(base / "damaged"), damages=DAMAGES)),
        "steps": ("steps_on_a_full_disk", dict(base=str(base / "steps"), disk=disk_full_at)),
        "report": ("epoch_report_on_a_full_disk", dict(base=str(base / "report"), disk=disk_full_at)),
        "folder": ("checkpoint_folder_on_a_full_disk", dict(base=str(base / "folder"), disk=disk_full_at)),
    }


@pytest.fixture(scope="module")
def two_ranks(two_rank_scenarios):
    """(this module's base folder, {name: each rank's result}) of two_rank_plan."""
    return two_rank_scenarios[__name__]


@pytest.mark.parametrize("case", range(len(DAMAGES)), ids=[f"{file}-{damage.__name__}" for file, damage in DAMAGES])
def test_an_emptied_or_cut_newest_checkpoint_makes_every_rank_recover_the_one_before(two_ranks, case):
    ranks = [rank[case] for rank in results_of(two_ranks[1], "damaged")]
    assert ranks[0] == ranks[1]  # the same choice on every rank
    first, _ = ranks[0]["saved"]
    assert ranks[0] == {"saved": ranks[0]["saved"], "recovered": first, "value": 1.0, "epoch": 1, "error": None}


def test_a_full_disk_at_train_steps_csv_stops_every_rank_with_one_line_and_keeps_whole_rows(two_ranks):
    base, runs = two_ranks
    ranks = results_of(runs, "steps")
    path = base / "steps" / "train_steps.csv"
    line = f"could not write {path} ({NO_SPACE}); the checkpoints saved so far are intact: free space {RERUN}"
    for result in ranks:
        assert result["errors"] == [None, None, line]  # every rank, at the same step
    header = "step,epoch,lr_head,encoder_frozen,loss_rank0,batch_ids_crc_sum\n"
    rows = ["1,1,5.000000e-01,0,2.9000,0\n", "2,1,5.000000e-01,0,2.8000,0\n"]
    assert ranks[0]["csv"] == header + "".join(rows)  # the part of row 3 that fitted is cut off again
    assert ranks[0]["after"] == header + "".join(rows) + "3,1,5.000000e-01,0,2.7000,0\n"


def test_a_full_disk_during_the_epoch_report_stops_every_rank_with_one_line_and_the_checkpoint_recovers(two_ranks):
    base, runs = two_ranks
    ranks = results_of(runs, "report")
    line = (f"could not write {base / 'report' / 'history.json'} ({NO_SPACE}); the checkpoints saved so far are "
            f"intact: free space {RERUN}")
    for result in ranks:
        assert result == {"error": line, "history": [1], "recovered": 1.0}


def test_a_full_disk_when_the_checkpoint_folder_is_made_stops_every_rank_with_one_line(two_ranks):
    base, runs = two_ranks
    ranks = results_of(runs, "folder")
    for result in ranks:
        assert result["error"].startswith(f"could not save a checkpoint in {base / 'folder'} ({NO_SPACE}): the "
                                          "partial save was removed and the 1 earlier checkpoint(s) are intact.")
        assert result["error"].endswith(f"free space {RERUN}") and "\n" not in result["error"]
        assert result["folders"] == 1 and result["recovered"] == 1.0
