"""Checkpoints that are never taken for valid when half-written or lost to a crash,
and that every rank agrees on.

Rule for every collective here: each rank calls it the same number of times,
decided from data that the main process broadcast, never from a rank's own view
of the disk (two ranks that list a folder differently would otherwise enter
different collectives and wait for each other until the collective timeout).
"""

import atexit
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml
from speechbrain.core import Brain
from speechbrain.dataio.dataloader import LoopedLoader, SaveableDataLoader
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    DEFAULT_SAVE_HOOKS,
    METAFNAME,
    Checkpointer,
    ckpt_recency,
    get_default_hook,
    torch_save,
    torch_save_once_per_node,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, main_process_only
from speechbrain.utils.epoch_loop import EpochCounter, EpochCounterWithStopper

from wavlm_ddp.distributed import rank
from wavlm_ddp.faults.guards import progress
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.training.brain import RecipeBrain
from wavlm_ddp.training.random_states import RandomStates

logger = logging.getLogger(__name__)
PENDING_META = f"{METAFNAME}.pending"
# The code of SpeechBrain's main_process_only wrapper: how a save hook that writes on the main
# process and then broadcasts is told from one that runs on every rank.
_MAIN_PROCESS_ONLY_CODE = main_process_only(lambda: None).__code__


class SafeCheckpointer(Checkpointer):
    """SpeechBrain's Checkpointer with an atomic, durable commit.

    SpeechBrain writes `CKPT.yaml`, the file that makes a folder a checkpoint,
    *before* the parameter files, so a save interrupted half-way leaves a folder
    that the next run loads as valid. Here the meta file is written under another
    name and renamed to `CKPT.yaml` only once every file is on disk: each file is
    fsynced, then the folder, before the rename, and the folders after it (a
    rename is durable only once its folder is synced, and a file system may keep
    a rename after a crash and lose the data written just before it). Folders
    left without `CKPT.yaml` by an interrupted save are ignored, then removed at
    the next start.
    """

    def __init__(self, checkpoints_dir, recoverables=None, custom_load_hooks=None, custom_save_hooks=None,
                 allow_partial_load=False, keep_latest=1):
        super().__init__(checkpoints_dir, recoverables, custom_load_hooks, custom_save_hooks, allow_partial_load)
        self.keep_latest = keep_latest  # the recency order keeps at least this many (beside the best)

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):
        pending = Path(fpath).with_name(PENDING_META)
        try:
            return super()._save_checkpoint_metafile(pending, meta_to_include, end_of_epoch)
        except OSError as error:  # on the main process, before SpeechBrain broadcasts the folder to every rank
            self._write_error = self._write_error or error
            return dict(meta_to_include)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        """SpeechBrain's save, committed atomically and durably. A write that fails (a
        full disk: ENOSPC, or any OSError), from the folder's creation to the commit,
        removes the partial folder, keeps every earlier checkpoint, and stops every
        rank with one ConfigError naming the folder and the space a checkpoint takes.
        The failure is kept, not raised, until every rank has been through each save
        hook's broadcast (see _guarded)."""
        self._write_error = None
        name = self._create_folder(name)
        own_hooks = self.custom_save_hooks
        hooks = {key: own_hooks.get(key) or get_default_hook(obj, DEFAULT_SAVE_HOOKS)
                 for key, obj in self.recoverables.items()}
        self.custom_save_hooks = {key: self._guarded(hook) for key, hook in hooks.items() if hook is not None}
        try:
            checkpoint = super().save_checkpoint(meta, end_of_epoch, name, verbosity)
        finally:
            self.custom_save_hooks = own_hooks
        # Every rank has written its files; a hook that writes on every rank may have failed on any.
        errors = [error for error in _every_rank(_reason(self._write_error)) if error]
        failure = None
        if if_main_process():  # the main process commits, or decides and cleans up
            committed = None if errors else _commit(checkpoint.path)
            if committed is not None:
                errors = [_reason(committed)]
            if errors:
                failure = self._failed_save(errors[0])
        failure = ddp_broadcast(failure)
        if failure:
            raise ConfigError(failure)
        progress("checkpoint saved")
        return checkpoint

    def _create_folder(self, name):
        """The name under which SpeechBrain saves (it makes the folder again, a no-op):
        the folder is made here by the main process, whose failure every rank then
        raises. SpeechBrain makes it before its first broadcast, where a failure would
        leave the other ranks waiting."""
        created = None
        if if_main_process():
            folder = self._new_checkpoint_dirpath() if name is None else self._custom_checkpoint_dirpath(name)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                created = (folder.name[len(CKPT_PREFIX) + 1:], None)
            except OSError as error:
                created = (None, self._failed_save(_reason(error)))
        name, failure = ddp_broadcast(created)
        if failure:
            raise ConfigError(failure)
        return name

    def _guarded(self, hook):
        """`hook` with an OSError of its write kept in `_write_error` instead of raised,
        and nothing written after one failed. SpeechBrain's default hooks write on the
        main process and then broadcast to every rank: an exception before that
        broadcast would leave the other ranks waiting in it, so the guard goes inside,
        around the write, and the broadcast stays."""
        main_only = getattr(hook, "__code__", None) is _MAIN_PROCESS_ONLY_CODE
        write = hook.__wrapped__ if main_only else hook

        def guarded_write(obj, path):
            if self._write_error is not None:
                return
            try:
                write(obj, path)
            except (OSError, RuntimeError) as error:  # torch.save's C++ writer: "PytorchStreamWriter failed"
                self._write_error = error

        return main_process_only(guarded_write) if main_only else guarded_write

    def _failed_save(self, reason):
        """Remove what the failed save wrote; the line that says why (`reason`) and what
        to do. Its own reads of the disk may fail too (the folder may not exist): then
        the sizes are left out of the line, which every rank must still receive."""
        try:
            folders = list(self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*"))
            partial = [p for p in folders if not (p / METAFNAME).exists()]
            written = sum(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file())
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
            complete = sorted((p for p in folders if (p / METAFNAME).exists()), key=lambda p: p.stat().st_mtime)
            need = sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file()) if complete else written
            sizes = (f" A checkpoint takes about {need / 2**20:.1f} MB here and "
                     f"{shutil.disk_usage(self.checkpoints_dir).free / 2**20:.1f} MB are free:")
            kept = f"the partial save was removed and the {len(complete)} earlier checkpoint(s) are intact."
        except OSError:
            sizes, kept = "", "the earlier checkpoints are untouched:"
        return (f"could not save a checkpoint in {self.checkpoints_dir} ({reason}): {kept}{sizes} free space (or set "
                "another --output_folder), then rerun the same command to resume from the last checkpoint")

    def find_checkpoint(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        """The checkpoint to recover, chosen by the main process alone; every rank
        then reads that same checkpoint (SpeechBrain lets each rank choose from its
        own listing). Every rank must call it (recovery does)."""
        chosen = error = None
        if if_main_process():
            try:
                chosen, error = self._first_loadable(
                    self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate))
            except OSError as failed:  # before the broadcast, where the other ranks wait
                error = (f"could not read the checkpoints in {self.checkpoints_dir} ({_reason(failed)}): make the "
                         "folder readable (or set another --output_folder)")
        chosen, error = ddp_broadcast((chosen, error))
        if error:
            raise ConfigError(error)
        if chosen is None:
            return None
        if not (Path(chosen) / METAFNAME).exists():
            raise ConfigError(
                f"rank {rank()} cannot see the checkpoint {chosen} that the main process chose: "
                "output_folder must be on a file system shared by all nodes"
            )
        return self._construct_checkpoint_objects([Path(chosen)])[0]

    def _first_loadable(self, ranked):
        """(path of the first checkpoint in `ranked` whose files all read back, error or
        None); each one skipped is reported by path. A file that a recoverable needs
        and the folder lacks counts as damaged (SpeechBrain would stop at its load)."""
        damaged = []
        for checkpoint in ranked:
            broken = [path.name for key, path in sorted(checkpoint.paramfiles.items())
                      if not _readable(path, self._reader(key))]
            broken += [f"{key}.ckpt (missing)" for key in sorted(self._required() - checkpoint.paramfiles.keys())]
            if not broken:
                return str(checkpoint.path), None
            damaged.append(str(checkpoint.path))
            logger.warning(f"Checkpoint {checkpoint.path} is damaged ({', '.join(broken)} do(es) not load): "
                           "skipped for the next one")
        if damaged:
            return None, (f"no checkpoint in {self.checkpoints_dir} loads ({len(damaged)} damaged): pass "
                          f"--overwrite=True to start afresh, or delete {self.checkpoints_dir}")
        return None, None

    def _required(self):
        """The recoverables whose file SpeechBrain's load requires (not the optional
        ones nor the dataloaders, which it skips when missing)."""
        if self.allow_partial_load:
            return set()
        return {key for key in self.recoverables
                if not self.optional_recoverables.get(key) and "dataloader" not in key}

    def list_checkpoints(self):
        """SpeechBrain's list, without the folders whose CKPT.yaml does not read as the
        meta that a save writes (each reported: SpeechBrain would stop at it with a
        traceback when it ranks the checkpoints)."""
        checkpoints = []
        for folder in self._list_checkpoint_dirs():
            try:
                (checkpoint,) = self._construct_checkpoint_objects([folder])
                if not isinstance(checkpoint.meta, dict) or not {"unixtime", "end-of-epoch"} <= checkpoint.meta.keys():
                    raise ValueError("no unixtime and end-of-epoch")
            except (ValueError, UnicodeDecodeError, yaml.YAMLError) as error:
                logger.warning(f"Checkpoint {folder} is damaged ({METAFNAME} does not load: {error}): skipped")
                continue
            checkpoints.append(checkpoint)
        return checkpoints

    def _reader(self, key):
        """How the file of recoverable `key` is read back to tell it whole: as its save
        hook wrote it (a torch.save archive, or the text of one of SpeechBrain's own
        recoverables), else by the file's first bytes (a file of no recoverable here)."""
        obj = self.recoverables.get(key)
        if obj is None or key in self.custom_save_hooks:
            return None
        if get_default_hook(obj, DEFAULT_SAVE_HOOKS) in (torch_save, torch_save_once_per_node):
            return _torch_archive
        return next((_READERS[cls] for cls in type(obj).__mro__ if cls in _READERS), None)

    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None,
                           importance_keys=(ckpt_recency,), ckpt_predicate=None, verbosity=logging.INFO):
        """Keep the `num_to_keep` most important checkpoints of each order and delete
        the others, as SpeechBrain does, but decided and done by the main process
        alone between two barriers that every rank enters, whatever it sees on disk
        (SpeechBrain runs one collective per deletion, counted from each rank's own
        listing: a rank that saw fewer checkpoints hung the run)."""
        if num_to_keep < 0:
            raise ValueError("num_to_keep must be >= 0")
        ddp_barrier()
        if if_main_process():
            orders = [{"min_key": key} for key in min_keys or []]
            orders += [{"max_key": key} for key in max_keys or []]
            orders += [{"importance_key": key} for key in importance_keys]
            candidates, keep = set(), set()
            for order in orders:
                ranked = self.find_checkpoints(ckpt_predicate=ckpt_predicate, **order)
                recency = order.get("importance_key") is ckpt_recency
                candidates.update(ranked)
                keep.update(ranked[:max(num_to_keep, self.keep_latest) if recency else num_to_keep])
            for checkpoint in sorted(candidates - keep, key=lambda c: str(c.path)):
                shutil.rmtree(checkpoint.path)
                logger.log(verbosity, f"Deleted checkpoint in {checkpoint.path}")
        ddp_barrier()

    def use_shared_temporary_folder(self, parent):
        """Debug mode: one temporary checkpoint folder under `parent` for every rank
        (SpeechBrain gives each rank its own, so ranks saw different checkpoints);
        removed when the main process exits."""
        folder = None
        if if_main_process():
            folder = tempfile.mkdtemp(dir=parent, prefix="debug-checkpoints-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.checkpoints_dir = Path(ddp_broadcast(folder))
        logger.info(f"Debug mode: every rank checkpoints into {self.checkpoints_dir}")

    def remove_interrupted_saves(self):
        """Delete checkpoint folders that an interrupted save left without CKPT.yaml."""
        removed = []
        if if_main_process() and self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*"):
                if path.is_dir() and not (path / METAFNAME).exists():
                    shutil.rmtree(path)
                    removed.append(path)
                    logger.warning(f"Removed {path}: its save was interrupted (no {METAFNAME})")
        ddp_barrier()
        return removed


def _commit(folder):
    """Make the checkpoint in `folder` durable, then commit it: fsync every file and
    the folder, rename the pending meta file to CKPT.yaml, fsync the folder (the
    rename) and its parent (the folder's own entry). The OSError of a step that
    failed, else None; a failure after the rename takes the rename back, so that a
    failed save never leaves a committed folder that may not be on the disk."""
    renamed = False
    try:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            _fsync(path)
        _fsync(folder)
        os.replace(folder / PENDING_META, folder / METAFNAME)
        renamed = True
        _fsync(folder)
        _fsync(folder.parent)
    except OSError as error:
        if renamed:
            try:
                os.replace(folder / METAFNAME, folder / PENDING_META)
            except OSError:
                pass  # the folder stays committed, its files fsynced: loadable
        return error
    return None


def _reason(error):
    """An OSError (or None) as the short text of a message: its strerror."""
    if error is None:
        return None
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


def _every_rank(value):
    """Each rank's `value`, on every rank (a collective; `[value]` outside DDP)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _fsync(path):
    """Flush `path` (a file or a folder) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_archive(path):
    """Read a torch.save file far enough to tell it whole: the zip directory (written
    last, so a file emptied or cut short has none) and the pickle of the structure,
    whose CRC is checked; the tensors are not read."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise zipfile.BadZipFile(f"{path} holds {len(pickles)} data.pkl")
        archive.read(pickles[0])


def _yaml_with(*keys, numbers=False):
    """A reader of a YAML mapping, as yaml.dump writes it (ending in a newline), that
    must hold `keys` (those its load hook reads), each a number where `numbers`: a
    file cut short loses its last line or ends within it."""
    def read(path):
        text = path.read_text(encoding="utf-8")
        saved = yaml.safe_load(text)
        if not text.endswith("\n") or not isinstance(saved, dict) or not set(keys) <= saved.keys():
            raise ValueError(f"{path} is not a whole mapping of {', '.join(keys)}")
        if numbers and not all(type(saved[key]) in (int, float) for key in keys):
            raise ValueError(f"{path} holds a value that is no number")
    return read


def _integers(count, none_allowed=False):
    """A reader of `count` integers, one a line (or the word None, where allowed)."""
    def read(path):
        words = path.read_text(encoding="utf-8").split()
        if none_allowed and words == ["None"]:
            return
        if len(words) != count:
            raise ValueError(f"{path} holds {len(words)} word(s), not {count} integer(s)")
        for word in words:
            int(word)
    return read


# The recoverables whose save hooks are not torch_save, each file read as its load hook
# reads it; looked up along the object's classes, as SpeechBrain finds the hooks (the
# subclass first).
_READERS = {
    EpochCounterWithStopper: _yaml_with("current_epoch", "best_epoch", "best_score", "should_stop"),
    EpochCounter: _integers(1),  # counter.ckpt: the epoch
    SaveableDataLoader: _integers(1, none_allowed=True),  # the batches yielded, None before the first
    LoopedLoader: _integers(3),
    RecipeBrain: _yaml_with("step", "avg_train_loss", "optimizer_step", "world_size", "accumulation",
                            "per_rank_seconds", numbers=True),  # SpeechBrain's keys, then the plan (appended)
    Brain: _yaml_with("step", "avg_train_loss", numbers=True),
    RandomStates: _torch_archive,  # torch.save, by its own hook
}


def _readable(path, reader):
    """Whether the checkpoint file `path` reads back with `reader` (see
    SafeCheckpointer._reader). Without one, the file must not be empty, and one
    that starts as a zip archive must open as one."""
    try:
        if reader is not None:
            reader(path)
            return True
        with open(path, "rb") as f:
            start = f.read(2)
        if start == b"PK":
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        return bool(start)
    except (OSError, EOFError, ValueError, yaml.YAMLError, zipfile.BadZipFile):  # ValueError: also bad UTF-8
        return False
