"""Checkpoints that are never taken for valid when half-written and that every
rank agrees on.

Rule for every collective here: each rank calls it the same number of times,
decided from data that the main process broadcast, never from a rank's own view
of the disk (two ranks that list a folder differently would otherwise enter
different collectives and wait for each other until the collective timeout).
"""

import atexit
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    DEFAULT_SAVE_HOOKS,
    METAFNAME,
    Checkpointer,
    ckpt_recency,
    get_default_hook,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process, main_process_only

from wavlm_ddp.distributed import rank
from wavlm_ddp.faults.guards import progress
from wavlm_ddp.preflight import ConfigError

logger = logging.getLogger(__name__)
PENDING_META = f"{METAFNAME}.pending"
# The code of SpeechBrain's main_process_only wrapper: how a save hook that writes on the main
# process and then broadcasts is told from one that runs on every rank.
_MAIN_PROCESS_ONLY_CODE = main_process_only(lambda: None).__code__


class SafeCheckpointer(Checkpointer):
    """SpeechBrain's Checkpointer with an atomic commit.

    SpeechBrain writes `CKPT.yaml`, the file that makes a folder a checkpoint,
    *before* the parameter files, so a save interrupted half-way leaves a folder
    that the next run loads as valid. Here the meta file is written under another
    name and renamed to `CKPT.yaml` only once every file is on disk; folders left
    without it by an interrupted save are ignored, then removed at the next start.
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

    def save_checkpoint(self, *args, **kwargs):
        """SpeechBrain's save, committed atomically. A write that fails (a full disk:
        ENOSPC, or any OSError) removes its partial folder, keeps every earlier
        checkpoint, and stops every rank with one ConfigError naming the folder and
        the space a checkpoint takes. The failure is kept, not raised, until every
        rank has been through each save hook's broadcast (see _guarded)."""
        self._write_error = None
        own_hooks = self.custom_save_hooks
        hooks = {name: own_hooks.get(name) or get_default_hook(obj, DEFAULT_SAVE_HOOKS)
                 for name, obj in self.recoverables.items()}
        self.custom_save_hooks = {name: self._guarded(hook) for name, hook in hooks.items() if hook is not None}
        try:
            checkpoint = super().save_checkpoint(*args, **kwargs)
        finally:
            self.custom_save_hooks = own_hooks
        failed = self._write_error is not None and if_main_process()  # the main process decides and cleans up
        failure = ddp_broadcast(self._failed_save(self._write_error) if failed else None)
        if failure:
            raise ConfigError(failure)
        ddp_barrier()  # every rank has written its files
        if if_main_process():
            (checkpoint.path / PENDING_META).rename(checkpoint.path / METAFNAME)
        ddp_barrier()
        progress("checkpoint saved")
        return checkpoint

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
            except OSError as error:
                self._write_error = error

        return main_process_only(guarded_write) if main_only else guarded_write

    def _failed_save(self, error):
        """Remove what the failed save wrote; the line that says why and what to do."""
        partial = [p for p in self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*") if not (p / METAFNAME).exists()]
        written = sum(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file())
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        complete = sorted((p for p in self.checkpoints_dir.glob(f"{CKPT_PREFIX}+*") if (p / METAFNAME).exists()),
                          key=lambda p: p.stat().st_mtime)
        need = sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file()) if complete else written
        free = shutil.disk_usage(self.checkpoints_dir).free
        reason = error.strerror or str(error)
        return (f"could not save a checkpoint in {self.checkpoints_dir} ({reason}): the partial save was removed "
                f"and the {len(complete)} earlier checkpoint(s) are intact. A checkpoint takes about "
                f"{need / 2**20:.1f} MB here and {free / 2**20:.1f} MB are free: free space (or set another "
                "--output_folder), then rerun the same command to resume from the last checkpoint")

    def find_checkpoint(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        """The checkpoint to recover, chosen by the main process alone; every rank
        then reads that same checkpoint (SpeechBrain lets each rank choose from its
        own listing). Every rank must call it (recovery does)."""
        chosen = error = None
        if if_main_process():
            chosen, error = self._first_loadable(
                self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate))
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
        """(path of the first checkpoint in `ranked` whose files load, error or None);
        each one skipped is reported by path."""
        damaged = []
        for checkpoint in ranked:
            broken = [path.name for path in checkpoint.paramfiles.values() if not _loadable(path)]
            if not broken:
                return str(checkpoint.path), None
            damaged.append(str(checkpoint.path))
            logger.warning(f"Checkpoint {checkpoint.path} is damaged ({', '.join(broken)} do(es) not load): "
                           "skipped for the next one")
        if damaged:
            return None, (f"no checkpoint in {self.checkpoints_dir} loads ({len(damaged)} damaged): pass "
                          f"--overwrite=True to start afresh, or delete {self.checkpoints_dir}")
        return None, None

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


def _loadable(path):
    """Whether a checkpoint file can be read back: a file that torch.save wrote (a
    zip archive) must open as one, which a file cut short does not (its directory
    is at the end). Reads the archive's directory only, not the tensors."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return True  # a plain-text recoverable (the epoch counter, the sampler)
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
        return True
    except (OSError, zipfile.BadZipFile):
        return False
