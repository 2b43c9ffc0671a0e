"""The process group and what every rank must share: joining torchrun's group
(restart-safe), the device of small collectives, and the check that all nodes
see the run's folders."""

import datetime
import os
import socket
import uuid
from pathlib import Path

import torch
from speechbrain.utils.distributed import ddp_broadcast, if_main_process, main_process_only

from wavlm_ddp.preflight import ConfigError


def on_main_process(task):
    """Run `task()` on the main process only; a ConfigError there (a check that refused,
    a write that failed) is raised on every rank as the same one-line ConfigError. Every
    rank must call it: the outcome goes to every rank in one broadcast (SpeechBrain's
    main_process_only, which also keeps the loggers that `task` calls from broadcasting
    on the main process alone). Any other exception of `task` still reaches that
    broadcast: the main process raises it with its traceback, the other ranks a
    RuntimeError that names it."""
    raised = None

    def attempt():
        nonlocal raised
        try:
            task()
        except ConfigError as refused:
            return "refused", str(refused)
        except BaseException as error:  # noqa: BLE001 - raised below, after the broadcast (KeyboardInterrupt too)
            raised = error
            return "raised", f"{type(error).__name__}: {error}"
        return None

    outcome = main_process_only(attempt)()
    if outcome is None:
        return
    kind, text = outcome
    if kind == "refused":
        raise ConfigError(text)
    if raised is not None:
        raise raised
    raise RuntimeError(f"the main process failed ({getattr(task, '__name__', 'a task')}): {text}")


def collective_device():
    """Where a small tensor must live for a collective: CUDA for nccl, else CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return "cuda"
    return "cpu"


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
    from wavlm_ddp.data.hf import data_files

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
