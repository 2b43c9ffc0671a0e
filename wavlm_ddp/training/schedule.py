"""The run's plan, the same on 1 or 64 GPUs: a global batch in seconds of audio, the
gradient accumulation that keeps it whatever the world size, the order in which
the ranks take the batches, and learning-rate schedules in fractions of the run.

The global sequence of batches is one list, built by SpeechBrain's
DynamicBatchSampler from the seed and the epoch alone. Optimizer step s uses its
batches s*G ... s*G + G - 1 (G = world size x accumulation), whoever computes
them: 1 process accumulating 2 batches and 2 ranks taking one each see the same
audio at every step, so the same YAML trains the same model on any node.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from wavlm_ddp.preflight import ConfigError

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

    def describe(self):
        steps = sorted(set(self.steps_per_epoch))
        per_epoch = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        return (f"global batch: world size {self.world_size} x {self.per_rank_seconds:g} s per rank x "
                f"accumulation {self.accumulation} = {self.global_seconds:g} s of audio per optimizer step "
                f"(batches hold {self.mean_step_seconds:.1f} s of it on average); {per_epoch} optimizer "
                f"steps per epoch x {len(self.steps_per_epoch)} epochs = {self.total_steps} optimizer steps")

    def describe_budget(self, updates=None, speed=None, speed_source=""):
        """What the run costs: its optimizer steps (against the update budget when one is
        set), the audio it sees, and at `speed` (audio seconds per second per GPU,
        measured) the GPU-hours, and the hours on this run's GPUs."""
        audio_hours = self.total_steps * self.mean_step_seconds / 3600
        asked = f" (update budget {updates}: the fewest whole epochs that reach it)" if updates else ""
        line = (f"run: {self.total_steps} optimizer steps{asked} x {self.mean_step_seconds:.1f} s = "
                f"{audio_hours:,.0f} h of audio seen")
        if speed:
            gpu_hours = audio_hours / speed  # audio-hours per hour of one GPU
            line += (f"; at {speed:,.0f} audio-s/s per GPU ({speed_source}) about {gpu_hours:,.1f} GPU-hours, "
                     f"{gpu_hours / self.world_size:,.1f} h on {self.world_size} GPU(s)")
        return line


def length_buckets(durations, num_buckets, per_rank, batches_per_bucket):
    """Bucket boundaries (seconds) for the duration-batched sampler: quantiles of
    the training durations, so that the buckets lie where the utterances are
    (SpeechBrain's default spreads them over [0, max_batch_length], which for 200 s
    batches of utterances under 20 s puts most of them where no utterance falls).
    At most `num_buckets`, and few enough that each holds `batches_per_bucket`
    batches per epoch: each bucket ends in a partial batch, which on a small
    training set would take a large share of the audio."""
    fits = int(sum(durations) / per_rank / batches_per_bucket)
    buckets = max(1, min(num_buckets, fits))
    quantiles = np.quantile(durations, np.arange(1, buckets + 1) / buckets, method="inverted_cdf")
    return sorted({float(q) for q in quantiles})  # each boundary a real duration


# An update budget that takes more epochs than this on the training set was set for
# another corpus (80,000 updates of 1,600 s are 356 epochs of train-clean-100).
MAX_BUDGET_EPOCHS = 5000


def make_plan(make_batches, num_buckets, global_seconds, max_batch_length, world_size, epochs, tolerance,
              max_duration, updates=None):
    """The plan and the batches, from `make_batches(per_rank_seconds, num_buckets)`
    (a DynamicBatchSampler factory), over `epochs`, or with `updates` (an update
    budget in optimizer steps) over the fewest whole epochs that reach it; raises
    ConfigError when the run cannot reach its global batch within `tolerance` (a
    fraction), naming fixes that would reach it."""
    accumulation, per_rank = derive_accumulation(global_seconds, max_batch_length, world_size)
    group = world_size * accumulation
    if max_duration and per_rank < max_duration:
        raise ConfigError(
            f"global_batch_seconds={global_seconds:g} over {world_size} ranks leaves {per_rank:g} s per rank, "
            f"less than one utterance of max_duration={max_duration:g} s: raise --global_batch_seconds to "
            f"at least {world_size * max_duration:g}, or run on fewer GPUs")
    batches = make_batches(per_rank, num_buckets)
    steps_per_epoch = []
    while len(steps_per_epoch) < epochs if updates is None else sum(steps_per_epoch) < updates:
        batches.set_epoch(len(steps_per_epoch) + 1)
        steps_per_epoch.append(len(batches) // group)
        if steps_per_epoch[-1] == 0:
            break
        if updates is not None and len(steps_per_epoch) > MAX_BUDGET_EPOCHS:
            raise ConfigError(
                f"an update budget of {updates} optimizer steps takes more than {MAX_BUDGET_EPOCHS} epochs of "
                f"{steps_per_epoch[0]} steps on this training set: it is the budget of a far larger corpus; set "
                "--update_budget=quick, or --update_budget=epochs with --number_of_epochs")
    if 0 in steps_per_epoch:
        raise ConfigError(
            f"the training set makes {len(batches)} batches of up to {per_rank:g} s, fewer than the "
            f"{group} one optimizer step needs: lower --global_batch_seconds (now {global_seconds:g})")
    mean = step_audio(batches, group)
    if mean < (1 - tolerance) * global_seconds:
        raise ConfigError(
            f"batches of up to {per_rank:g} s per rank hold only {mean:.1f} s of audio per optimizer step "
            f"on average, {100 * (1 - mean / global_seconds):.0f} % short of global_batch_seconds="
            f"{global_seconds:g} (global_batch_tolerance={tolerance}): "
            + fill_fixes(make_batches, num_buckets, global_seconds, max_batch_length, world_size, tolerance, mean))
    return TrainingPlan(world_size, accumulation, per_rank, global_seconds, steps_per_epoch, mean), batches


def plan_summary(ids, durations, settings, plan=None, batches=None, refused=None):
    """A rank's plan as a few numbers and digests, to compare across ranks (never the
    batches themselves): how many training utterances and seconds of audio (a sum
    that does not depend on the order), their IDs and durations in dataset order,
    the settings that batch them, the batches of epoch 1 (positions in that order;
    later epochs follow from these and the seed) and the plan's numbers, or the
    error that refused the plan."""
    summary = {"utterances": len(ids), "seconds": math.fsum(durations),
               "ids": _digest("\0".join(ids).encode()),
               "durations": _digest(np.asarray(durations, dtype=np.float64).tobytes()),
               "settings": _digest(json.dumps(settings, sort_keys=True, default=str).encode()),
               "batches": None, "numbers": None, "refused": refused}
    if plan is not None:
        batches.set_epoch(1)
        order = list(batches)
        sizes = np.fromiter((len(batch) for batch in order), dtype=np.int64, count=len(order))
        flat = np.fromiter((int(i) for batch in order for i in batch), dtype=np.int64, count=int(sizes.sum()))
        summary["batches"] = _digest(sizes.tobytes() + flat.tobytes())
        summary["numbers"] = _digest(json.dumps(dataclasses.asdict(plan), sort_keys=True).encode())
    return summary


def same_plan_on_every_rank(summary, check_file):
    """Gather every rank's `plan_summary` once (every rank calls this, before step 1)
    and raise the same ConfigError on every rank when any rank's differs from rank
    0's, naming those ranks and what differs; then the error that refused the plan,
    when it did, on every rank alike."""
    world = torch.distributed.get_world_size()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, summary)
    first = gathered[0]
    differ = [(rank, _difference(other, first)) for rank, other in enumerate(gathered) if other != first]
    if differ:
        ranks = ", ".join(str(rank) for rank, _ in differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8
                                                                    else "")
        whom = f"rank {ranks} differs" if len(differ) == 1 else f"ranks {ranks} differ"
        shown = "; ".join(f"rank {rank}: {why}" for rank, why in differ[:8])
        raise ConfigError(
            f"the ranks planned different training batches: {whom} from rank 0 ({shown}): they read other training "
            "data than rank 0, as a network file system's cache can show one node an older manifest or shard: give "
            "every rank the same data_folder, manifests and datasets on one consistent shared file system, then run "
            f"the check again (delete {check_file})")
    if summary["refused"]:
        raise ConfigError(summary["refused"])


def _difference(other, first):
    """What differs between a rank's plan summary and rank 0's, in a few words."""
    if other["utterances"] != first["utterances"]:
        return f"{other['utterances']} training utterances, rank 0 has {first['utterances']}"
    if other["seconds"] != first["seconds"]:
        return f"other durations: {other['seconds']:.3f} s of audio in all, rank 0 has {first['seconds']:.3f} s"
    if other["ids"] != first["ids"] or other["durations"] != first["durations"]:
        return "as much audio, but other utterance IDs, or other durations or order of them"
    if other["settings"] != first["settings"]:
        return "other batch settings (global_batch_seconds, dynamic_batch_sampler, ...)"
    if other["refused"] != first["refused"]:
        return f"its plan was refused: {other['refused']}" if other["refused"] else "rank 0's plan was refused"
    return "other batches from the same utterances, durations and settings (another software version?)"


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def step_audio(batches, group):
    """Mean seconds of audio per optimizer step of `group` batches, in epoch 1."""
    batches.set_epoch(1)
    steps = len(batches) // group
    if steps == 0:
        return 0.0
    used = list(batches)[: steps * group]
    return sum(sum(batches.get_durations(b)) for b in used) / steps


def fill_fixes(make_batches, num_buckets, global_seconds, max_batch_length, world_size, tolerance, mean):
    """Why the batches fall short, and each change that would fill them (each
    tried on the same data): fewer length buckets (each bucket's last batch is
    partial, which weighs on a small corpus), a larger per-rank batch (fewer GPUs,
    or a larger global batch while the per-rank batch is under max_batch_length:
    utterances fill large batches better), or a lower standard."""
    def fills(global_s, ranks, buckets):
        accumulation, per_rank = derive_accumulation(global_s, max_batch_length, ranks)
        return step_audio(make_batches(per_rank, buckets), ranks * accumulation) >= (1 - tolerance) * global_s

    fixes, cause = [], "utterances do not fill such small batches (each batch is sized for its bucket's longest)"
    buckets = num_buckets // 2
    while buckets >= 1:
        if fills(global_seconds, world_size, buckets):
            cause = (f"each of the length buckets ends in a partial batch (num_buckets={num_buckets}), "
                     "which weighs on a training set this small")
            fixes.append(f"set --dynamic_batch_sampler='{{num_buckets: {buckets}}}'")
            break
        buckets //= 2
    per_rank = derive_accumulation(global_seconds, max_batch_length, world_size)[1]
    if per_rank < max_batch_length:  # the per-rank batch can grow: more audio per batch fills it better
        larger = world_size * max_batch_length
        if fills(larger, world_size, num_buckets):
            fixes.append(f"raise --global_batch_seconds to {larger:g} (a different recipe: larger steps)")
        fewer = next((n for n in range(world_size - 1, 0, -1) if fills(global_seconds, n, num_buckets)), None)
        if fewer:
            fixes.append(f"run on {fewer} GPU(s)")
    needed = math.ceil(100 * (1 - mean / global_seconds) + 1) / 100
    fixes.append(f"raise --global_batch_tolerance to {needed:g}")
    return f"{cause}; " + ", or ".join(fixes)


def resumed_batch(batch, saved, plan):
    """Where a run resumes in its epoch from a checkpoint taken after `batch` local
    batches by a run of another world size or accumulation.

    Checkpoints are only taken at optimizer-step boundaries, so `batch` local batches
    of A accumulated micro-batches are batch / A optimizer steps into the epoch on
    any world size: the same global batches when the per-rank batch length is
    unchanged (exact), otherwise the same number of steps of differently packed
    batches. `saved` holds the checkpoint's world_size, accumulation and
    per_rank_seconds. Returns (this run's batch, a warning or None)."""
    old = (saved.get("world_size"), saved.get("accumulation"))
    if batch == 0 or None in old or old == (plan.world_size, plan.accumulation):
        return batch, None
    steps_done = batch // old[1]
    message = (f"resuming mid-epoch with world size {plan.world_size} x accumulation {plan.accumulation} "
               f"from a checkpoint of world size {old[0]} x accumulation {old[1]}: {steps_done} optimizer "
               "steps into the epoch")
    saved_seconds = saved.get("per_rank_seconds", plan.per_rank_seconds)
    if abs(saved_seconds - plan.per_rank_seconds) > 1e-6:
        message += (f"; the per-rank batch changed ({saved_seconds:g} s -> {plan.per_rank_seconds:g} s), so the "
                    "rest of this epoch is packed differently and may repeat or miss some utterances of it")
    return steps_done * plan.accumulation, message


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


COUNTED_FROM = ("unfreeze", "run")


def schedule_start(name, cfg, freeze_encoder):
    """Where optimizer `name`'s schedule starts (a fraction of the run): the encoder's
    where it unfreezes (`counted_from: unfreeze`, the default), or at step 0 with the
    head's (`counted_from: run`, fairseq's one tri-stage for every parameter: a frozen
    encoder joins its schedule where it stands)."""
    if name == "wavlm" and cfg.get("counted_from", "unfreeze") == "unfreeze":
        return freeze_encoder
    return 0.0


def curve(cfg):
    """The keys of an lr block that shape its curve (learning_rate's arguments)."""
    return {key: value for key, value in cfg.items() if key != "counted_from"}


def describe_schedule(total_steps, lr, freeze_encoder):
    """One line per optimizer: the schedule in optimizer steps."""
    lines = []
    for name, cfg in lr.items():
        start = schedule_start(name, cfg, freeze_encoder)
        first, warm_end, hold_end = schedule_steps(total_steps, start, cfg["warmup"], cfg["hold"])
        frozen = round(freeze_encoder * total_steps) if name == "wavlm" else 0
        parts = [f"frozen for steps 0-{max(first, frozen) - 1}"] if max(first, frozen) > 0 else []
        if frozen > first:  # counted_from: run: the schedule runs on while the encoder is frozen
            parts[0] += " (its schedule runs from step 0)"
        if warm_end > first:
            parts.append(f"warm-up to {cfg['peak']:g} over steps {first}-{warm_end - 1}")
        if hold_end > warm_end:
            parts.append(f"held at {cfg['peak']:g} until step {hold_end - 1}")
        parts.append(f"{cfg.get('decay', 'exponential')} decay to {cfg['peak'] * cfg['final_ratio']:g} "
                     f"at step {total_steps}")
        lines.append(f"schedule {name} (optimizer steps): {', '.join(parts)}")
    return lines


def update_budget(hparams):
    """The run's length in optimizer updates, `update_budgets[update_budget]` (the YAML
    names its budgets: the published run's and a quick one), or None: number_of_epochs
    decides (no update_budget key, or a budget of null)."""
    name = hparams.get("update_budget")
    if name is None:
        return None
    budgets = hparams.get("update_budgets") or {}
    if name not in budgets:
        raise ConfigError(f"update_budget={name!r} is not one of the YAML's update_budgets "
                          f"({', '.join(map(str, budgets)) or 'none'}): set --update_budget={next(iter(budgets), 'null')}")
    value = budgets[name]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"update_budgets: {name}: {value!r} is not a number of optimizer updates >= 1 (null: "
                          "number_of_epochs decides): fix it in the YAML")
    return value


def check_schedule(hparams):
    """The global batch and schedule keys, before anything is built."""
    update_budget(hparams)
    for old in ("freeze_encoder_steps",):
        if old in hparams:
            raise ConfigError(f"{old} is gone: schedules are fractions of the run now; set --freeze_encoder "
                              "to a fraction such as 0.125 (docs/global_batch.md)")
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
                              "use warmup and hold (docs/global_batch.md)")
        for key in ("warmup", "hold", "final_ratio"):
            if not _fraction(cfg.get(key)):
                raise ConfigError(f"lr: {name}: {key}={cfg.get(key)!r} is not a fraction in [0, 1]: "
                                  "fix it in the YAML's lr block")
        if cfg.get("counted_from", "unfreeze") not in COUNTED_FROM:
            raise ConfigError(f"lr: {name}: counted_from={cfg.get('counted_from')!r} is not one of "
                              f"{', '.join(COUNTED_FROM)}: fix it in the YAML's lr block")
        start = schedule_start(name, cfg, hparams["freeze_encoder"])
        if start + cfg["warmup"] + cfg["hold"] > 1.0 + 1e-9:
            raise ConfigError(f"lr: {name}: start {start:g} + warmup {cfg['warmup']:g} + hold {cfg['hold']:g} "
                              "exceed the whole run (1.0): shorten warmup or hold in the YAML's lr block")
        if cfg.get("decay", "exponential") not in DECAYS:
            raise ConfigError(f"lr: {name}: decay={cfg.get('decay')!r} is not one of {', '.join(DECAYS)}")


def _fraction(value, upper_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
