"""The run's plan, the same on 1 or 64 GPUs: a global batch in seconds of audio, the
gradient accumulation that keeps it whatever the world size, the order in which
the ranks take the batches, and learning-rate schedules in fractions of the run.

The global sequence of batches is one list, built by SpeechBrain's
DynamicBatchSampler from the seed and the epoch alone. Optimizer step s uses its
batches s*G ... s*G + G - 1 (G = world size x accumulation), whoever computes
them: 1 process accumulating 2 batches and 2 ranks taking one each see the same
audio at every step, so the same YAML trains the same model on any node.
"""

import math
from dataclasses import dataclass

import torch

from preflight import ConfigError

DECAYS = ("exponential", "cosine")


def derive_accumulation(global_seconds, max_batch_length, world_size):
    """(accumulation, per-rank seconds) that give exactly `global_seconds` per step.

    `max_batch_length` (per rank) is the memory ceiling: the accumulation is the
    fewest micro-batches that stay under it, and the per-rank batch is lowered to
    global / (world size x accumulation)."""
    accumulation = max(1, math.ceil(global_seconds / (world_size * max_batch_length) - 1e-9))
    return accumulation, global_seconds / (world_size * accumulation)


@dataclass
class TrainingPlan:
    world_size: int
    accumulation: int
    per_rank_seconds: float
    global_seconds: float
    steps_per_epoch: list  # optimizer steps in each epoch (epoch 1 first)
    mean_step_seconds: float  # real audio per optimizer step (the batches are not full)

    @property
    def total_steps(self):
        return sum(self.steps_per_epoch)

    @property
    def batches_per_step(self):
        return self.world_size * self.accumulation

    def describe(self):
        steps = sorted(set(self.steps_per_epoch))
        per_epoch = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        return (f"global batch: world size {self.world_size} x {self.per_rank_seconds:g} s per rank x "
                f"accumulation {self.accumulation} = {self.global_seconds:g} s of audio per optimizer step "
                f"(batches hold {self.mean_step_seconds:.1f} s of it on average); {per_epoch} optimizer "
                f"steps per epoch x {len(self.steps_per_epoch)} epochs = {self.total_steps} optimizer steps")


def make_plan(batches, global_seconds, max_batch_length, world_size, epochs, tolerance, max_duration):
    """The plan for `batches`, a DynamicBatchSampler built with the per-rank length
    from `derive_accumulation`; raises ConfigError when the run cannot reach its
    global batch within `tolerance` (a fraction)."""
    accumulation, per_rank = derive_accumulation(global_seconds, max_batch_length, world_size)
    group = world_size * accumulation
    if max_duration and per_rank < max_duration:
        raise ConfigError(
            f"global_batch_seconds={global_seconds:g} over {world_size} ranks leaves {per_rank:g} s per rank, "
            f"less than one utterance of max_duration={max_duration:g} s: raise --global_batch_seconds to "
            f"at least {world_size * max_duration:g}, or run on fewer GPUs")
    steps_per_epoch, audio = [], 0.0
    for epoch in range(1, epochs + 1):
        batches.set_epoch(epoch)
        steps_per_epoch.append(len(batches) // group)
        if epoch == 1:
            used = list(batches)[: steps_per_epoch[0] * group]
            audio = sum(sum(batches.get_durations(b)) for b in used)
    if steps_per_epoch[0] == 0:
        raise ConfigError(
            f"the training set makes {len(batches)} batches of up to {per_rank:g} s, fewer than the "
            f"{group} one optimizer step needs: lower --global_batch_seconds (now {global_seconds:g})")
    mean = audio / steps_per_epoch[0]
    if mean < (1 - tolerance) * global_seconds:
        raise ConfigError(
            f"batches of up to {per_rank:g} s per rank hold only {mean:.1f} s of audio per optimizer step "
            f"on average, {100 * (1 - mean / global_seconds):.0f} % short of global_batch_seconds="
            f"{global_seconds:g} (global_batch_tolerance={tolerance}): short utterances do not fill such "
            f"small batches; raise --global_batch_seconds, run on fewer GPUs, or raise --global_batch_tolerance")
    return TrainingPlan(world_size, accumulation, per_rank, global_seconds, steps_per_epoch, mean)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Rank `rank`'s share of the global sequence of batches.

    Local batch i of rank r is global batch i*N + r (N ranks), so local batches
    s*A ... s*A + A - 1 (A = accumulation) of all ranks are global batches
    s*N*A ... (s+1)*N*A - 1. The last global batches that do not fill a whole
    optimizer step are left out (fewer than N*A batches, different ones each
    epoch as the order is reshuffled), so every rank takes the same number."""

    def __init__(self, batches, rank, world_size, accumulation):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.group = world_size * accumulation

    def __len__(self):
        return len(self.batches) // self.group * self.group // self.world_size

    def __iter__(self):
        order = list(self.batches)
        usable = len(order) // self.group * self.group
        return iter(order[self.rank : usable : self.world_size])

    def set_epoch(self, epoch):
        self.batches.set_epoch(epoch)


def schedule_steps(total_steps, start, warmup, hold):
    """(start, end of warm-up, end of hold) in optimizer steps."""
    first = round(start * total_steps)
    warm_end = first + round(warmup * total_steps)
    return first, warm_end, warm_end + round(hold * total_steps)


def learning_rate(step, total_steps, peak, warmup, hold, final_ratio, decay="exponential", start=0.0):
    """Tri-stage schedule in fractions of the run (`total_steps` optimizer steps).

    0 before `start`; linear warm-up for `warmup` of the run; `hold` at `peak`;
    then decay to `peak * final_ratio` at the last step (exponential, as fairseq's
    tri_stage, or cosine). A pure function of the optimizer step, so a run
    resumed on another number of GPUs continues the same curve."""
    first, warm_end, hold_end = schedule_steps(total_steps, start, warmup, hold)
    if step < first:
        return 0.0
    if step < warm_end:
        return peak * (step - first + 1) / (warm_end - first)
    if step < hold_end:
        return peak
    progress = min(1.0, (step - hold_end) / max(1, total_steps - hold_end))
    if decay == "exponential":
        return peak * final_ratio**progress
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def describe_schedule(total_steps, lr, freeze_encoder):
    """One line per optimizer: the schedule in optimizer steps."""
    lines = []
    for name, cfg in lr.items():
        start = freeze_encoder if name == "wavlm" else 0.0
        first, warm_end, hold_end = schedule_steps(total_steps, start, cfg["warmup"], cfg["hold"])
        parts = [f"frozen for steps 0-{first - 1}"] if first > 0 else []
        if warm_end > first:
            parts.append(f"warm-up to {cfg['peak']:g} over steps {first}-{warm_end - 1}")
        if hold_end > warm_end:
            parts.append(f"held at {cfg['peak']:g} until step {hold_end - 1}")
        parts.append(f"{cfg.get('decay', 'exponential')} decay to {cfg['peak'] * cfg['final_ratio']:g} "
                     f"at step {total_steps}")
        lines.append(f"schedule {name} (optimizer steps): {', '.join(parts)}")
    return lines


def check_schedule(hparams):
    """The global batch and schedule keys, before anything is built."""
    for old in ("freeze_encoder_steps",):
        if old in hparams:
            raise ConfigError(f"{old} is gone: schedules are fractions of the run now; set --freeze_encoder "
                              "to a fraction such as 0.125 (README: One recipe from 1 to 64 GPUs)")
    seconds = hparams.get("global_batch_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ConfigError(f"global_batch_seconds={seconds!r} is not a number of seconds > 0: set "
                          "--global_batch_seconds to the audio per optimizer step over all GPUs, such as 1600")
    tolerance = hparams.get("global_batch_tolerance")
    if not _fraction(tolerance, upper_open=True):
        raise ConfigError(f"global_batch_tolerance={tolerance!r} is not a fraction in [0, 1): set "
                          "--global_batch_tolerance=0.25")
    if not _fraction(hparams.get("freeze_encoder"), upper_open=True):
        raise ConfigError(f"freeze_encoder={hparams.get('freeze_encoder')!r} is not a fraction of the run "
                          "in [0, 1): set --freeze_encoder=0.125 (0: never frozen)")
    for name, cfg in hparams["lr"].items():
        if "warmup_steps" in cfg:
            raise ConfigError(f"lr: {name}: warmup_steps is gone: schedules are fractions of the run now; "
                              "use warmup and hold (README: One recipe from 1 to 64 GPUs)")
        for key in ("warmup", "hold", "final_ratio"):
            if not _fraction(cfg.get(key)):
                raise ConfigError(f"lr: {name}: {key}={cfg.get(key)!r} is not a fraction in [0, 1]: "
                                  "fix it in the YAML's lr block")
        start = hparams["freeze_encoder"] if name == "wavlm" else 0.0
        if start + cfg["warmup"] + cfg["hold"] > 1.0 + 1e-9:
            raise ConfigError(f"lr: {name}: start {start:g} + warmup {cfg['warmup']:g} + hold {cfg['hold']:g} "
                              "exceed the whole run (1.0): shorten warmup or hold in the YAML's lr block")
        if cfg.get("decay", "exponential") not in DECAYS:
            raise ConfigError(f"lr: {name}: decay={cfg.get('decay')!r} is not one of {', '.join(DECAYS)}")


def _fraction(value, upper_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
