"""Where the recipe changes SpeechBrain's Brain beyond its documented hooks.

Each method here overrides an internal of speechbrain.core.Brain as it is in the
pinned version (speechbrain==1.1.2, pyproject.toml); a SpeechBrain upgrade must
re-read these against its Brain. The recipe's own training logic is train.ASR.
"""

import speechbrain as sb
import torch
import yaml

from wavlm_ddp.faults.preemption import Preempted, ignore_in_loader_workers
from wavlm_ddp.training.random_states import RandomStates
from wavlm_ddp.training.schedule import GlobalBatchSampler, resumed_batch


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of N takes items r, r+N, r+2N, ... of the (length-sorted) dataset:
    every utterance is evaluated exactly once (DistributedSampler would pad with
    repeats and bias the WER), and each shard spans all lengths."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@sb.utils.checkpoints.register_checkpoint_hooks
class RecipeBrain(sb.Brain):
    """sb.Brain with: the batching a checkpoint was saved with (so that a run resumes
    mid-epoch on another world size), checkpoints only at optimizer-step boundaries,
    each rank's random states in every checkpoint (random_states.py; the recipe calls
    `random_states.capture()` before each save of its own), the recipe's global batch
    sampler, a step that skips non-finite losses on every rank at once (and agrees on
    a preemption), a preemption checkpoint at the next step boundary, and sharded
    evaluation. Needs `plan` (schedule.TrainingPlan) and
    `nonfinite` (faults.guards.NonFiniteGuard) set before fit()."""

    plan = None
    saved_plan = None
    preemption = None  # preemption.PreemptionWatch, when preempt_signals is set
    stop_agreed = False  # some rank was asked to stop: save at the next step boundary, then stop
    accumulated_finite = True  # every micro-batch of the optimizer step so far had a finite loss on every rank
    accumulated_fingerprint = 0  # the optimizer step's utterance IDs so far, on every rank (NonFiniteGuard.agree)
    step_fingerprint = 0  # those of the last optimizer step: the same global batch gives the same number

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.random_states = RandomStates()
        if self.checkpointer is not None:  # optional: checkpoints saved without it still load
            self.checkpointer.add_recoverable("random_states", self.random_states, optional_load=True)

    # Brain.on_fit_start: the random states of the recovered checkpoint (if any) are set
    # right after it is loaded; nothing draws from them before the next training step.
    def on_fit_start(self):
        super().on_fit_start()
        self.random_states.restore()

    # Brain._save / _recover: SpeechBrain's own YAML (step, optimizer_step, ...) plus the plan.
    @sb.utils.checkpoints.mark_as_saver
    def _save(self, path):
        super()._save(path)
        with open(path, "a", encoding="utf-8") as w:
            w.write(f"world_size: {self.plan.world_size}\naccumulation: {self.plan.accumulation}\n"
                    f"per_rank_seconds: {self.plan.per_rank_seconds}\n")

    @sb.utils.checkpoints.mark_as_loader
    def _recover(self, path, end_of_epoch):
        super()._recover(path, end_of_epoch)
        with open(path, encoding="utf-8") as f:
            self.saved_plan = yaml.safe_load(f)

    def adapt_resumed_position(self):
        """A checkpoint saved mid-epoch with another world size or accumulation:
        translate its position (Brain.step, and the loader's recovery skip) into
        this run's micro-batches (schedule.resumed_batch)."""
        self.step, message = resumed_batch(self.step, self.saved_plan or {}, self.plan)
        if message is None:
            return
        if self.train_loader._speechbrain_recovery_skip_to is not None:
            self.train_loader._speechbrain_recovery_skip_to = self.step
        sb.core.logger.warning(message)

    # Brain._should_save_intra_epoch_ckpt: only between optimizer steps (accumulated
    # gradients are not saved). Every rank is at the same batch count, so all skip
    # SpeechBrain's broadcast alike.
    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        if self.step % self.grad_accumulation_factor:
            return False
        if self.stop_agreed:  # every rank agreed in the same all-reduce: no broadcast needed
            return True
        return super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)

    # Brain._save_intra_epoch_ckpt: after the preemption checkpoint, stop (train.main
    # exits with preemption.exit_code_after_preemption).
    def _save_intra_epoch_ckpt(self):
        self.random_states.capture()
        super()._save_intra_epoch_ckpt()
        if self.stop_agreed:
            raise Preempted(f"{self.preemption.received or 'a signal on another rank'}: checkpoint saved after "
                            f"optimizer step {self.optimizer_step} (batch {self.step} of epoch "
                            f"{self.hparams.epoch_counter.current})")

    # Brain._train_loader_specifics: GlobalBatchSampler already gives this rank its
    # share, so no DistributedSamplerWrapper.
    def _train_loader_specifics(self, dataset, loader_kwargs):
        if isinstance(loader_kwargs.get("batch_sampler"), GlobalBatchSampler):
            self.train_sampler = loader_kwargs["batch_sampler"]
            return loader_kwargs
        return super()._train_loader_specifics(dataset, loader_kwargs)

    # Brain.fit_batch, with non-finite losses skipped on every rank at once: backward
    # always runs (DDP needs it after a forward); when any rank's loss is NaN/inf the
    # gradients are dropped instead of applied.
    def fit_batch(self, batch):
        should_step = self.step % self.grad_accumulation_factor == 0
        self.on_fit_batch_start(batch, should_step)
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            self.scaler.scale(loss / self.grad_accumulation_factor).backward()
        finite, stop = self.nonfinite.agree(loss.detach(), self.preemption is not None and self.preemption.requested,
                                            ids=batch.id)
        self.accumulated_fingerprint += self.nonfinite.fingerprint
        self.accumulated_finite &= finite
        self.stop_agreed |= stop
        if should_step:
            self.accumulated_step_applied = self.accumulated_finite
            self.step_fingerprint, self.accumulated_fingerprint = self.accumulated_fingerprint, 0
            if self.accumulated_finite:
                self.optimizers_step()
            else:
                self.zero_grad(set_to_none=True)
            self.accumulated_finite = True
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach().cpu() if torch.isfinite(loss) else torch.tensor(0.0)

    # Brain.make_dataloader: under DDP each rank evaluates its own shard of valid / test.
    # Loader processes leave stop signals to their rank (preemption.ignore_in_loader_workers).
    # Each loader draws its workers' seeds from a generator of its own: torch draws them
    # from the global generator whenever a loader starts an iteration (each epoch, each
    # validation), which would move the random states between two training steps.
    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        loader_kwargs.setdefault("generator", torch.Generator())
        if loader_kwargs.get("num_workers", 0) > 0 and "worker_init_fn" not in loader_kwargs:
            loader_kwargs["worker_init_fn"] = ignore_in_loader_workers(self.hparams.preempt_signals)
        if stage != sb.Stage.TRAIN and torch.distributed.is_initialized():
            loader_kwargs = {**loader_kwargs, "shuffle": False, "sampler": ShardSampler(
                len(dataset), torch.distributed.get_rank(), torch.distributed.get_world_size())}
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
