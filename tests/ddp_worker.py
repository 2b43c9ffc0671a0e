"""Run small training scenarios on N gloo processes (torch.multiprocessing.spawn)
and hand each rank's results back to the test through a file."""

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import WavLMModel

from wavlm_wrapper import SpeechEncoder

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)
VOCAB = 6
SAMPLES = 6400  # 0.4 s: 19 frames


class CTCModel(torch.nn.Module):
    """WavLM + linear CTC head as one module, as DDP sees it in the recipe."""

    def __init__(self, wavlm):
        super().__init__()
        self.wavlm = wavlm
        self.head = torch.nn.Linear(wavlm.output_size, VOCAB)

    def forward(self, wav, step):
        return self.head(self.wavlm(wav, torch.ones(wav.shape[0]), step=step)).log_softmax(-1)


def global_batch(step, size, seed=0):
    """The same global batch on every rank: equal-length utterances, random labels."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    wav = torch.randn(size, SAMPLES, generator=gen)
    labels = torch.randint(1, VOCAB, (size, 5), generator=gen)
    return wav, labels


def ctc_loss(log_probs, labels):
    frames = torch.full((log_probs.shape[0],), log_probs.shape[1], dtype=torch.long)
    label_lens = torch.full((labels.shape[0],), labels.shape[1], dtype=torch.long)
    return torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), labels, frames, label_lens)


def train(model_dir, steps, batch_per_rank, layerdrop, mode, find_unused, seed=0, checkpointing=False,
          attention="sdpa", compile_backend=None):
    """Train a few SGD steps; return the final parameters and, per step, the drop
    pattern, the layers left without gradient and the layers whose weights moved."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(seed)
    wavlm = SpeechEncoder(model_dir, layerdrop=layerdrop, layerdrop_mode=mode, layerdrop_seed=seed,
                          apply_spec_augment=False, freeze="cnn", activation_checkpointing=checkpointing,
                          attention=attention, compile_layers=compile_backend is not None,
                          compile_backend=compile_backend or "inductor", **NO_DROPOUT)
    model = CTCModel(wavlm)
    net = DDP(model, find_unused_parameters=find_unused) if world > 1 else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    layers = model.wavlm.model.encoder.layers
    history = []
    for step in range(steps):
        wav, labels = global_batch(step, batch_per_rank * world, seed)
        mine = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
        before = [layer.feed_forward.output_dense.weight.detach().clone() for layer in layers]
        opt.zero_grad(set_to_none=True)
        ctc_loss(net(wav[mine], step), labels[mine]).backward()
        no_grad = [all(p.grad is None for p in layer.parameters()) for layer in layers]
        opt.step()
        moved = [not torch.equal(b, layer.feed_forward.output_dense.weight) for b, layer in zip(before, layers)]
        history.append({"drop": list(wavlm.layer_drop.last), "no_grad": no_grad, "moved": moved})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "history": history, "drop_counts": wavlm.layer_drop.counts}


def stock_hf_with_layerdrop(model_dir, layerdrop, spec_augment=True, steps=3):
    """HF's own LayerDrop under DDP without find_unused_parameters, outside the
    recipe's checks. With `spec_augment`, time masks in every step (mask_time_min_masks)
    give masked_spec_embed a gradient, so that the dropped layers are the only
    parameters without one. {"error": DDP's message, or None if it trained;
    "masked_spec_embed": per finished step, whether it got a gradient}."""
    import numpy as np

    model = WavLMModel.from_pretrained(model_dir, layerdrop=layerdrop, apply_spec_augment=spec_augment,
                                       mask_time_prob=0.05, mask_time_min_masks=2, **NO_DROPOUT)
    model.train()
    net = DDP(model, find_unused_parameters=False)
    used = []
    try:
        for step in range(steps):
            torch.manual_seed(100 + step)  # the same layer draws on every rank: nobody blocks
            np.random.seed(100 + step)  # HF draws its time masks with numpy
            wav, _ = global_batch(step, 2)
            model.masked_spec_embed.grad = None
            net(wav).last_hidden_state.pow(2).mean().backward()
            used.append(model.masked_spec_embed.grad is not None and bool(model.masked_spec_embed.grad.any()))
    except RuntimeError as error:
        return {"error": str(error), "masked_spec_embed": used}
    return {"error": None, "masked_spec_embed": used}


def _entry(rank, world, init_file, out_dir, fn_name, kwargs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))  # SpeechBrain reads the rank from these
    torch.set_num_threads(1)
    # A short collective timeout turns a hang (ranks in different collectives) into a failure.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = globals()[fn_name](**kwargs)
    except Exception:  # hand the traceback to the test instead of a bare exit code
        result = {"exception": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def scenarios(plan):
    """Each scenario of `plan` ({name: (function name, kwargs)}) in turn, in this one
    process group (one spawn and one set of imports for the suite's scenarios):
    {name: its result, or {"exception": traceback}}. After each one every rank meets
    at a barrier: a scenario that left the ranks out of step (one rank failed before a
    collective, or hangs) fails the scenarios after it with its name, at once, instead
    of each of them waiting out the collective timeout in a group out of step."""
    results, broken_by = {}, None
    for name, (fn_name, kwargs) in plan.items():
        if broken_by is not None:
            results[name] = {"exception": f"not run: the process group was out of step after {broken_by}"}
            continue
        try:
            results[name] = globals()[fn_name](**kwargs)
        except Exception:
            results[name] = {"exception": traceback.format_exc()}
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except RuntimeError:
            broken_by = name
    return results


def spawn_scenarios(plan, tmp_path, world=2):
    """`scenarios(plan)` on `world` gloo processes: {name: [each rank's result]}."""
    ranks = spawn("scenarios", tmp_path, world=world, plan=plan)
    return {name: [rank[name] for rank in ranks] for name in plan}


def results_of(runs, name):
    """The ranks' results of scenario `name` of spawn_scenarios, failing with a rank's traceback."""
    for rank, result in enumerate(runs[name]):
        assert not (isinstance(result, dict) and "exception" in result), f"{name}, rank {rank}:\n{result['exception']}"
    return runs[name]


def spawn(fn_name, tmp_path, world=2, **kwargs):
    """Run `fn_name(**kwargs)` on `world` gloo processes; return each rank's result."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    init_file = tmp_path / "init"
    # Triton kernels (attention: triton) run in the spawned ranks through Triton's interpreter,
    # on CPU tensors: it must be on before they import triton (this process's triton is untouched).
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mp.spawn(_entry, args=(world, str(init_file), str(tmp_path), fn_name, kwargs), nprocs=world, join=True)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, result in enumerate(results):
        assert not (isinstance(result, dict) and "exception" in result), f"rank {r}:\n{result['exception']}"
    return results


def nonfinite_on_one_rank(patience):
    """Rank 1's loss is NaN at step 1: both ranks must skip that step, and stop
    with the error once NaN lasts longer than `patience`."""
    from wavlm_ddp.faults.guards import NonFiniteGuard

    guard = NonFiniteGuard(patience)
    rank = dist.get_rank()
    decisions = []
    try:
        for step in range(4):
            nan_here = rank == 1 and step >= 1
            decisions.append(guard.step_is_finite(torch.tensor(float("nan") if nan_here else 1.0)))
    except ValueError as error:
        return {"decisions": decisions, "error": str(error)}
    return {"decisions": decisions, "error": None}


def nonfinite_in_ddp_training(model_dir, base, accumulation, nan_at, micro_batches=6):
    """The recipe's Brain (train.ASR: DDP-wrapped encoder and head, fit_batch with its
    NonFiniteGuard) on each rank's own batches; rank 1's loss is NaN at its micro-batch
    `nan_at` (1-based), so the NaN reaches every rank's gradients through DDP's
    all-reduce. Returns the parameters at each optimizer-step boundary (the first:
    before training) and the Brain's counts."""
    import functools

    import speechbrain as sb

    from train import ASR
    from wavlm_ddp.faults.checkpoints import SafeCheckpointer
    from wavlm_ddp.training.schedule import TrainingPlan

    rank = dist.get_rank()
    torch.manual_seed(0)
    wavlm = SpeechEncoder(model_dir, freeze="cnn", **NO_DROPOUT)
    head = sb.nnet.linear.Linear(input_size=wavlm.output_size, n_neurons=VOCAB)
    schedule = {"peak": 0.05, "warmup": 0.0, "hold": 1.0, "final_ratio": 1.0, "decay": "cosine"}  # constant lr
    hparams = {
        "freeze_encoder": 0.0, "train_steps_file": Path(base) / "steps.csv", "blank_index": 0,
        "log_softmax": sb.nnet.activations.Softmax(apply_log=True), "lr": {"wavlm": schedule, "head": schedule},
        "layerdrop_check_interval": 0, "sample_rate": 16000, "fused_optimizer": False, "use_tensorboard": False,
        "wavlm_opt_class": functools.partial(torch.optim.SGD, lr=schedule["peak"]),
        "head_opt_class": functools.partial(torch.optim.SGD, lr=schedule["peak"]),
        "epoch_counter": sb.utils.epoch_loop.EpochCounter(1), "preempt_signals": [],
    }
    asr = ASR(modules={"wavlm": wavlm, "ctc_head": head}, hparams=hparams,
              run_opts={"device": "cpu", "max_grad_norm": 5.0, "nonfinite_patience": 3,
                        "grad_accumulation_factor": accumulation, "find_unused_parameters": False,
                        "distributed_backend": "gloo"},
              checkpointer=SafeCheckpointer(Path(base) / "save"))
    asr.plan = TrainingPlan(world_size=2, accumulation=accumulation, per_rank_seconds=1.0, global_seconds=1.0,
                            steps_per_epoch=[micro_batches // accumulation], mean_step_seconds=1.0)
    asr.on_fit_start()
    asr.on_stage_start(sb.Stage.TRAIN, epoch=1)
    objectives = asr.compute_objectives

    def poisoned(*args):  # rank 1's loss at micro-batch nan_at: NaN inside the graph, before backward
        loss = objectives(*args)
        return loss * float("nan") if rank == 1 and asr.step == nan_at else loss

    asr.compute_objectives = poisoned

    def snapshot():  # named as in the unwrapped modules
        return {f"{key}.{n}": p.detach().clone() for key, module in asr.modules.items()
                for n, p in getattr(module, "module", module).named_parameters()}

    boundaries = [snapshot()]
    for micro_batch in range(1, micro_batches + 1):
        gen = torch.Generator().manual_seed(100 * rank + micro_batch)  # each rank its own data
        batch = sb.dataio.batch.PaddedBatch([{"id": f"r{rank}u{i}", "sig": torch.randn(SAMPLES, generator=gen),
                                              "wrd": "A B", "tokens": torch.randint(1, VOCAB, (4,), generator=gen)}
                                             for i in range(2)])
        asr.step = micro_batch
        asr.fit_batch(batch)
        if micro_batch % accumulation == 0:
            boundaries.append(snapshot())
    return {"boundaries": boundaries, "optimizer_step": asr.optimizer_step, "skipped": asr.nonfinite.skipped_total,
            "ddp": isinstance(asr.modules.wavlm, DDP) and isinstance(asr.modules.ctc_head, DDP)}


def sync_check():
    """Run the synced-drop check with equal patterns, then with rank 1 differing:
    [the first check's error or None, the second's]."""
    from types import SimpleNamespace

    from wavlm_ddp.encoder.layerdrop import LayerDrop

    layer_drop = LayerDrop(SimpleNamespace(layerdrop=0.5), num_layers=4, mode="synced", seed=0)
    errors = []
    for differ in (False, True):
        layer_drop.last = [False, True, False, True]
        if differ and dist.get_rank() == 1:
            layer_drop.last = [False, False, True, True]
        try:
            layer_drop.check_in_sync()
            errors.append(None)
        except RuntimeError as error:
            errors.append(str(error))
    return errors


def checkpoints_seen_differently(base):
    """Each rank checkpoints through its own folder: save five epochs keeping the
    best WER and the latest, then recover the best."""
    from wavlm_ddp.faults.checkpoints import SafeCheckpointer

    value = torch.nn.Parameter(torch.zeros(1))
    holder = torch.nn.Module()
    holder.value = value
    own = Path(base) / f"rank{dist.get_rank()}"
    own.mkdir(exist_ok=True)
    checkpointer = SafeCheckpointer(own, recoverables={"holder": holder})
    main_folder = Path(base) / "rank0"
    for epoch, wer in enumerate([30.0, 20.0, 25.0, 40.0, 35.0]):
        value.data.fill_(wer)
        checkpointer.checkpoints_dir = main_folder if dist.get_rank() == 0 else own
        checkpointer.save_and_keep_only(meta={"WER": wer}, min_keys=["WER"])
    recovered = checkpointer.recover_if_possible(min_key="WER")
    kept = sorted(c.meta["WER"] for c in SafeCheckpointer(main_folder).list_checkpoints())
    return {"recovered": recovered.meta["WER"], "kept": kept,
            "own_folder": [p.name for p in own.iterdir()] if dist.get_rank() == 1 else None}


def damaged_checkpoints(base):
    """In two folders, save three epochs (keeping the best and the latest two), cut the
    newest checkpoint's parameter file in half (in `newest`) or every one (in `all`),
    then recover on every rank: {folder name: what each saw}."""
    from wavlm_ddp.faults.checkpoints import SafeCheckpointer
    from wavlm_ddp.preflight import ConfigError

    results = {}
    for name in ("newest", "all"):
        holder = torch.nn.Module()
        holder.value = torch.nn.Parameter(torch.zeros(1))
        checkpointer = SafeCheckpointer(Path(base) / name, recoverables={"holder": holder}, keep_latest=2)
        for wer in (20.0, 30.0, 25.0):
            holder.value.data.fill_(wer)
            checkpointer.save_and_keep_only(meta={"WER": wer}, min_keys=["WER"])
        kept = sorted(c.meta["WER"] for c in checkpointer.list_checkpoints())
        if dist.get_rank() == 0:
            newest_first = sorted(checkpointer.list_checkpoints(), key=lambda c: c.meta["unixtime"], reverse=True)
            for checkpoint in newest_first if name == "all" else newest_first[:1]:
                data = checkpoint.paramfiles["holder"].read_bytes()
                checkpoint.paramfiles["holder"].write_bytes(data[: len(data) // 2])
        dist.barrier()
        holder.value.data.fill_(0.0)
        try:
            recovered = checkpointer.recover_if_possible()
            results[name] = {"kept": kept, "recovered": recovered.meta["WER"], "value": holder.value.item(),
                             "error": None}
        except ConfigError as error:
            results[name] = {"kept": kept, "error": str(error)}
    return results


def disk_full_on_the_main_process(base):
    """Save one checkpoint, then one whose second parameter file hits a full disk on the
    main process (SpeechBrain writes there, then broadcasts): every rank must get the
    same error, without a collective left waiting; then recover the first one."""
    from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

    from wavlm_ddp.faults.checkpoints import SafeCheckpointer
    from wavlm_ddp.preflight import ConfigError

    @register_checkpoint_hooks
    class Disk:
        full = False

        @mark_as_saver
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"x" * 1000)
                if self.full:
                    raise OSError(28, "No space left on device")

        @mark_as_loader
        def load(self, path, end_of_epoch):
            pass

    holder, disk = torch.nn.Module(), Disk()
    holder.value = torch.nn.Parameter(torch.zeros(1))
    checkpointer = SafeCheckpointer(base, recoverables={"a_holder": holder, "b_disk": disk})
    holder.value.data.fill_(1.0)
    first = checkpointer.save_checkpoint(meta={"WER": 50.0})
    holder.value.data.fill_(2.0)
    disk.full = True
    try:
        checkpointer.save_checkpoint(meta={"WER": 40.0})
        error = None
    except ConfigError as refused:
        error = str(refused)
    holder.value.data.fill_(0.0)
    recovered = checkpointer.recover_if_possible()
    return {"error": error, "folders": sorted(p.name for p in Path(base).glob("CKPT+*")),
            "first": first.path.name if first is not None else None, "recovered": recovered.path.name,
            "value": holder.value.item()}


def shared_folders_seen_differently(base):
    """check_shared_folders with a relative parquet folder and each rank in its own
    working directory: first both in node0's (which holds the shard), then rank 1 in
    node1's (which does not), as a node without the shared file system: [error or None]."""
    from wavlm_ddp.distributed import check_shared_folders
    from wavlm_ddp.preflight import ConfigError

    errors, before = [], os.getcwd()
    for rank1_dir in ("node0", "node1"):
        os.chdir(Path(base) / (rank1_dir if dist.get_rank() == 1 else "node0"))
        try:
            check_shared_folders(Path(base) / "out", Path(base), ["shards"])
            errors.append(None)
        except ConfigError as error:
            errors.append(str(error))
        finally:
            os.chdir(before)
    return errors
