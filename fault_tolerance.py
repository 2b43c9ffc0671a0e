"""What keeps a long run alive and its work safe: checkpoints that are never
taken for valid when half-written and that every rank agrees on, a guard that
skips non-finite steps on every rank at once, a check that all nodes share the
run's folders, and a watchdog that turns a hang into a restart.

Rule for every collective here: each rank calls it the same number of times,
decided from data that the main process broadcast, never from a rank's own view
of the disk (two ranks that list a folder differently would otherwise enter
different collectives and wait for each other until the collective timeout).
"""

import atexit
import datetime
import faulthandler
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
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

from preflight import ConfigError

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


def collective_device():
    """Where a small tensor must live for a collective: CUDA for nccl, else CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return "cuda"
    return "cpu"


class NonFiniteGuard:
    """Decide, the same way on every rank, whether a step's loss is usable.

    A rank that skipped backward while another ran it would hang DDP, so the
    finiteness of the loss is all-reduced first: if any rank's loss is NaN or
    inf, every rank skips the step. After `patience` consecutive skipped steps,
    training stops with an error naming the keys to change.
    """

    def __init__(self, patience):
        self.patience = patience
        self.skipped_total = 0
        self.consecutive = 0

    def step_is_finite(self, loss):
        return self.agree(loss)[0]

    def agree(self, loss, stop_requested=False):
        """(whether every rank's loss is finite, whether any rank asked to stop):
        one all-reduce of two numbers (the stop request of preemption.py rides along)."""
        flags = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0, float(stop_requested)],
                             device=collective_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, stop = flags.tolist()
        if bad == 0:
            self.consecutive = 0
            return True, stop > 0
        self.skipped_total += 1
        self.consecutive += 1
        logger.warning(f"Non-finite loss: step skipped ({self.skipped_total} so far)")
        if self.consecutive > self.patience:
            raise ConfigError(
                f"loss was NaN/inf for {self.consecutive} steps in a row (nonfinite_patience="
                f"{self.patience}): lower the learning rate (lr), use --precision=bf16 instead "
                "of fp16, or lower max_grad_norm"
            )
        return False, stop > 0


def init_distributed(backend, timeout_s):
    """Join the torchrun process group; returns False when not launched by torchrun.

    torchrun reuses its store across restarts (--max-restarts), and a new worker
    could read the address that a dead worker of the previous attempt left there,
    then wait forever to connect to it. The keys are therefore prefixed with the
    restart count, so every attempt meets only its own workers.
    """
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        return False
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(torch.distributed.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch.distributed.PrefixStore(f"attempt_{attempt}/", store)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return True


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


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def check_shared_folders(output_folder, data_folder, data_paths=()):
    """Every rank proves that it sees the main process's `output_folder`, `data_folder`
    and HF datasets (`data_paths`: the `<split>_data` values) before anything is
    written: the main process writes a token into the output folder (removed again),
    lists the data folder and the datasets' files; every rank looks for all of them.
    A rank on a node without a shared file system fails here, with one line, instead
    of later on a missing tokenizer, checkpoint or shard (or in a collective that the
    others wait in). What the main process cannot read itself is left to the data
    check, which names it."""
    if not torch.distributed.is_initialized():
        return
    from hf_data import data_files

    token, listing, files, created = None, None, None, False
    if if_main_process():
        out = Path(output_folder)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        token = f".shared-folder-check-{uuid.uuid4().hex}"
        (out / token).write_text(socket.gethostname())
        listing = sorted(os.listdir(data_folder))[:20] if Path(data_folder).is_dir() else []
        files = []
        for spec in data_paths:
            try:
                files += data_files(spec)[:20]
            except ConfigError:
                pass
    token, listing, files = ddp_broadcast((token, listing, files))
    sees_output = (Path(output_folder) / token).exists()
    sees_data = all((Path(data_folder) / name).exists() for name in listing) and all(Path(f).exists() for f in files)
    views = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(views, (socket.gethostname(), sees_output, sees_data))
    if if_main_process():
        (Path(output_folder) / token).unlink()
        if created:
            Path(output_folder).rmdir()
    blind = [f"rank {r} on {host}" for r, (host, out_ok, data_ok) in enumerate(views) if not (out_ok and data_ok)]
    if blind:
        datasets = "".join(f", {path}" for path in data_paths)
        raise ConfigError(
            f"{', '.join(blind)} cannot see the output_folder={output_folder} and data_folder={data_folder}{datasets} "
            f"of rank 0 on {views[0][0]}: multi-node training needs all of them on a file system shared by all "
            "nodes (NFS, Lustre, ...): set --output_folder, --data_folder and any --<split>_data to such paths"
        )


WATCHDOG_EXIT_CODE = 3
_watchdog = None


def progress(what):
    """Tell the watchdog (if one is armed) that this rank made progress."""
    if _watchdog is not None:
        _watchdog.progress(what)


class Watchdog:
    """Ends a rank that made no progress for `timeout_minutes`.

    A hung rank (a peer frozen or gone without closing its sockets, a deadlocked
    collective, a stuck file system) would otherwise wait until the collective
    timeout, hours later. The watchdog thread wakes every few seconds; once the
    last call of `progress` is older than the timeout, it prints one line naming
    the rank and what it did last, the Python stacks of all its threads, and exits
    with status 3, so torchrun ends the group and `--max-restarts` restarts it from
    the last checkpoint. Collective waits release the GIL, so the thread runs.
    """

    def __init__(self, timeout_minutes):
        self.timeout_s = timeout_minutes * 60.0
        self.last, self.what = time.monotonic(), "start of training"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def progress(self, what):
        self.last, self.what = time.monotonic(), what

    def start(self):
        global _watchdog
        _watchdog = self
        self._thread.start()
        return self

    def stop(self):
        global _watchdog
        _watchdog = None
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(10.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                sys.stderr.write(
                    f"watchdog: rank {rank()} on {socket.gethostname()} made no progress for {idle / 60:.1f} min "
                    f"(hang_timeout_minutes={self.timeout_s / 60:g}; last progress: {self.what}); the stacks of "
                    "all its threads follow, then it exits so that torchrun can restart from the last checkpoint\n"
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)
