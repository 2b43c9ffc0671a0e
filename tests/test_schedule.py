"""The run's plan on its own: accumulation from the world size, the batches each
rank takes, schedules in fractions of the run, their checks, and the reuse of the
manifests' check."""

import os
from pathlib import Path

import pytest
import speechbrain as sb

from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.data.manifests import AudioLimits, BadRow, fingerprint, load_check, read_manifest, save_check
from wavlm_ddp.training.schedule import (
    GlobalBatchSampler,
    check_schedule,
    derive_accumulation,
    describe_schedule,
    learning_rate,
    length_buckets,
    make_plan,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"


@pytest.mark.parametrize(
    "world_size,accumulation,per_rank",
    [(1, 8, 200.0), (2, 4, 200.0), (8, 1, 200.0), (3, 3, 1600 / 9), (64, 1, 25.0)],
)
def test_accumulation_makes_up_what_the_world_size_lacks_and_never_exceeds_the_memory_knob(
        world_size, accumulation, per_rank):
    assert derive_accumulation(1600, 200, world_size) == (accumulation, pytest.approx(per_rank))
    assert world_size * accumulation * per_rank == pytest.approx(1600)


class ListBatches:
    """A stand-in for DynamicBatchSampler: batch i holds utterance i."""

    def __init__(self, count):
        self.count, self.epoch = count, None

    def __iter__(self):
        return iter([[i] for i in range(self.count)])

    def __len__(self):
        return self.count

    def set_epoch(self, epoch):
        self.epoch = epoch


def utterances_per_step(world_size, accumulation, count=23):
    """{optimizer step: the utterances all ranks use in it}."""
    steps = {}
    for rank in range(world_size):
        local = list(GlobalBatchSampler(ListBatches(count), rank, world_size, accumulation))
        for i, batch in enumerate(local):
            steps.setdefault(i // accumulation, set()).update(batch)
    return steps


def test_every_optimizer_step_sees_the_same_audio_on_any_world_size_with_the_same_global_batch():
    reference = utterances_per_step(1, 4)
    assert utterances_per_step(2, 2) == reference == utterances_per_step(4, 1)
    assert len(reference) == 5 and reference[0] == {0, 1, 2, 3}  # 23 batches: 5 steps, 3 left out


def test_every_rank_takes_the_same_number_of_batches_and_the_epoch_reaches_the_sampler():
    batches = ListBatches(23)
    samplers = [GlobalBatchSampler(batches, rank, 3, 2) for rank in range(3)]
    assert [len(s) for s in samplers] == [len(list(s)) for s in samplers] == [6, 6, 6]
    samplers[0].set_epoch(4)
    assert batches.epoch == 4


def test_the_demo_plan_has_the_same_steps_and_batches_on_one_process_and_on_two_ranks():
    data = sb.dataio.dataset.DynamicItemDataset(read_manifest(DEMO / "train.csv", DEMO)).filtered_sorted(
        sort_key="duration")

    def plan(world_size):
        return make_plan(demo_batches(data, seed=7), 10, 24.0, 12.0, world_size, 3, 0.25, 10.0)

    (one, batches_one), (two, batches_two) = plan(1), plan(2)
    assert (one.accumulation, two.accumulation) == (2, 1)
    assert one.steps_per_epoch == two.steps_per_epoch and one.total_steps > 0
    assert one.mean_step_seconds == two.mean_step_seconds > 0.75 * 24
    batches_one.set_epoch(2)
    batches_two.set_epoch(2)
    assert list(batches_one) == list(batches_two)
    assert "world size 2 x 12 s per rank x accumulation 1 = 24 s" in two.describe()


def demo_batches(data, seed=0, batches_per_bucket=10):
    """The recipe's sampler factory (train.training_plan) over `data`."""
    durations = [float(data.data[i]["duration"]) for i in data.data_ids]

    def make(per_rank, num_buckets):
        boundaries = length_buckets(durations, num_buckets, per_rank, batches_per_bucket)
        return sb.dataio.sampler.DynamicBatchSampler(data, per_rank, bucket_boundaries=boundaries, seed=seed,
                                                     length_func=lambda x: x["duration"])
    return make


def test_a_global_batch_the_ranks_cannot_fill_stops_with_the_fix():
    data = sb.dataio.dataset.DynamicItemDataset(read_manifest(DEMO / "train.csv", DEMO))
    make = demo_batches(data)
    with pytest.raises(ConfigError, match=r"leaves 1 s per rank, less than one utterance of max_duration=3 s: "
                                          r"raise --global_batch_seconds to at least 24"):
        make_plan(make, 10, 8.0, 12.0, 8, 1, 0.25, 3.0)
    with pytest.raises(ConfigError, match=r"batches of up to 2000 s, fewer than the 64 one optimizer step needs: "
                                          r"lower --global_batch_seconds"):
        make_plan(make, 10, 128000.0, 2000.0, 64, 1, 0.25, None)


def fill_error(*args):
    with pytest.raises(ConfigError) as error:
        make_plan(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


def passes(*args):
    make_plan(*args)
    return True


def test_a_batch_fill_error_names_only_fixes_that_fill_the_batches():
    """Each suggested fix, applied to the same data, passes the check."""
    data = sb.dataio.dataset.DynamicItemDataset(read_manifest(DEMO / "train.csv", DEMO))
    # Many buckets over few batches (batches_per_bucket 1 lets all 10 through): fewer buckets is the fix.
    few = demo_batches(data, batches_per_bucket=1)
    message = fill_error(few, 40, 120.0, 60.0, 2, 1, 0.2, 10.0)
    assert "each of the length buckets ends in a partial batch (num_buckets=40)" in message
    buckets = int(message.split("num_buckets: ")[1].split("}")[0])
    assert passes(few, buckets, 120.0, 60.0, 2, 1, 0.2, 10.0)
    assert "raise --global_batch_seconds" not in message  # 60 s per rank is max_batch_length already
    assert "run on" not in message  # one GPU would accumulate the same 60 s batches
    # Small per-rank batches of 3 s utterances: a larger per-rank batch is the fix.
    make = demo_batches(data)
    message = fill_error(make, 10, 24.0, 12.0, 6, 1, 0.2, 3.0)  # 4 s batches of 1.4-2.7 s utterances
    assert "utterances do not fill such small batches" in message and "num_buckets" not in message
    assert "raise --global_batch_seconds to 72" in message and passes(make, 10, 72.0, 12.0, 6, 1, 0.2, 3.0)
    gpus = int(message.split("run on ")[1].split(" GPU")[0])
    assert gpus < 6 and passes(make, 10, 24.0, 12.0, gpus, 1, 0.2, 3.0)
    tolerance = float(message.split("--global_batch_tolerance to ")[1])
    assert passes(make, 10, 24.0, 12.0, 6, 1, tolerance, 3.0)


def test_length_buckets_lie_at_the_durations_quantiles_and_leave_enough_batches_each():
    durations = [1.0] * 50 + [2.0] * 50 + [4.0] * 100
    assert length_buckets(durations, 4, per_rank=10.0, batches_per_bucket=1) == [1.0, 2.0, 4.0]
    # 550 s of audio in 100 s batches: 5 batches, so one bucket keeps at least 5 of them.
    assert length_buckets(durations, 60, per_rank=100.0, batches_per_bucket=5) == [4.0]


def test_the_tri_stage_schedule_in_fractions_of_the_run():
    lr = dict(peak=1.0, warmup=0.1, hold=0.4, final_ratio=0.05)
    curve = [learning_rate(step, 100, **lr, start=0.2) for step in range(101)]
    assert curve[:20] == [0.0] * 20  # frozen
    assert curve[20:30] == pytest.approx([(i + 1) / 10 for i in range(10)])  # warm-up from the start
    assert curve[30:70] == [1.0] * 40  # hold
    assert all(a > b for a, b in zip(curve[70:], curve[71:]))  # decay
    assert curve[100] == pytest.approx(0.05) and curve[85] == pytest.approx(0.05**0.5)  # exponential
    cosine = learning_rate(85, 100, **lr, start=0.2, decay="cosine")
    assert cosine == pytest.approx(0.05 + 0.95 * 0.5)


def test_the_schedule_is_printed_in_optimizer_steps():
    lr = {"wavlm": dict(peak=5e-5, warmup=0.1, hold=0.4, final_ratio=0.05),
          "head": dict(peak=9e-4, warmup=0.1, hold=0.4, final_ratio=0.05)}
    wavlm, head = describe_schedule(1000, lr, freeze_encoder=0.125)
    assert wavlm == ("schedule wavlm (optimizer steps): frozen for steps 0-124, warm-up to 5e-05 over steps "
                     "125-224, held at 5e-05 until step 624, exponential decay to 2.5e-06 at step 1000")
    assert head.startswith("schedule head (optimizer steps): warm-up to 0.0009 over steps 0-99, held")


GOOD = {"global_batch_seconds": 1600.0, "global_batch_tolerance": 0.25, "freeze_encoder": 0.125,
        "lr": {"wavlm": {"peak": 5e-5, "warmup": 0.1, "hold": 0.4, "final_ratio": 0.05},
               "head": {"peak": 9e-4, "warmup": 0.1, "hold": 0.4, "final_ratio": 0.05}}}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"freeze_encoder_steps": 2000}, "freeze_encoder_steps is gone: schedules are fractions of the run now"),
        ({"global_batch_seconds": 0}, "global_batch_seconds=0 is not a number of seconds > 0"),
        ({"global_batch_tolerance": 1.0}, "global_batch_tolerance=1.0 is not a fraction in [0, 1)"),
        ({"freeze_encoder": 2000}, "freeze_encoder=2000 is not a fraction of the run in [0, 1)"),
        ({"lr": {"head": {"peak": 1, "warmup_steps": 500}}}, "lr: head: warmup_steps is gone"),
        ({"lr": {"wavlm": {"peak": 1, "warmup": 0.5, "hold": 0.5, "final_ratio": 0.1}}},
         "lr: wavlm: start 0.125 + warmup 0.5 + hold 0.5 exceed the whole run"),
        ({"lr": {"head": {"peak": 1, "warmup": 0.1, "hold": 0.1, "final_ratio": 0.1, "decay": "step"}}},
         "lr: head: decay='step' is not one of exponential, cosine"),
    ],
)
def test_schedule_settings_that_cannot_work_stop_with_one_line(change, message):
    check_schedule(GOOD)
    with pytest.raises(ConfigError) as error:
        check_schedule({**GOOD, **change})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_manifest_check_is_reused_until_a_manifest_or_an_audio_file_changes(tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes((DEMO / "audio" / os.listdir(DEMO / "audio")[0]).read_bytes())
    manifest = tmp_path / "train.csv"
    manifest.write_text("ID,duration,wav,spk_id,wrd\nu1,1.0,$data_root/a.wav,s,HELLO\n")
    limits = AudioLimits(16000, True, 400, 0.1)
    digest = fingerprint({"train": manifest}, tmp_path, limits, set("HELO"))
    bad = [BadRow(str(manifest), 2, "u1", "duration column says 1, the audio lasts 2 s")]
    cache = tmp_path / "save" / "check.json"
    save_check(cache, digest, bad, [])
    assert load_check(cache, digest) == (bad, [])
    assert fingerprint({"train": manifest}, tmp_path, limits, set("HELO")) == digest

    os.utime(audio, ns=(1, 1))  # the same bytes, touched: checked again
    assert fingerprint({"train": manifest}, tmp_path, limits, set("HELO")) != digest
    os.utime(audio, ns=(2, 2))
    touched = fingerprint({"train": manifest}, tmp_path, limits, set("HELO"))
    manifest.write_text(manifest.read_text().replace("HELLO", "HELO"))
    assert fingerprint({"train": manifest}, tmp_path, limits, set("HELO")) != touched
    other_tolerance = AudioLimits(16000, True, 400, 0.5)
    assert fingerprint({"train": manifest}, tmp_path, other_tolerance, set("HELO")) != touched
    assert load_check(cache, touched) is None
    cache.write_text(cache.read_text()[:20])  # torn
    assert load_check(cache, digest) is None


def test_a_mid_epoch_checkpoint_of_another_world_size_resumes_after_the_same_optimizer_steps():
    from wavlm_ddp.training.schedule import TrainingPlan, resumed_batch

    plan = lambda world, acc, seconds=12.0: TrainingPlan(world_size=world, accumulation=acc, per_rank_seconds=seconds,
                                                         global_seconds=24.0, steps_per_epoch=[10],
                                                         mean_step_seconds=20.0)
    saved = {"world_size": 2, "accumulation": 1, "per_rank_seconds": 12.0}
    assert resumed_batch(6, saved, plan(2, 1)) == (6, None)  # the same batching: unchanged
    assert resumed_batch(0, saved, plan(1, 2)) == (0, None)  # the start of an epoch
    assert resumed_batch(6, {}, plan(1, 2)) == (6, None)  # a checkpoint of older code: nothing to translate
    batch, message = resumed_batch(6, saved, plan(1, 2))  # 6 steps of 2 ranks = 12 micro-batches of 1 process
    assert batch == 12 and "6 optimizer steps into the epoch" in message and "packed differently" not in message
    batch, message = resumed_batch(12, {"world_size": 1, "accumulation": 2, "per_rank_seconds": 12.0}, plan(4, 1, 6.0))
    assert batch == 6 and "per-rank batch changed (12 s -> 6 s)" in message
