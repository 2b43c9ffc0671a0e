"""The data of a run: the manifests' check (reused while nothing changed), the
train / valid / test datasets with their audio and text pipelines, and the global
sequence of training batches."""

import collections
import logging
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.utils.distributed import ddp_broadcast, if_main_process

from audio import load_audio
from preflight import ConfigError
from recipes.validate_manifest import (
    AudioLimits,
    empty_splits,
    fingerprint,
    length_filter,
    load_check,
    read_manifest,
    report,
    training_charset,
    validate_manifests,
)
from schedule import length_buckets, make_plan

logger = logging.getLogger(__name__)


def read_datasets(hparams, bad_ids):
    """Train / valid / test DynamicItemDatasets sorted by duration, without the
    rows that failed validation (`bad_ids`, with skip_invalid) and, for train,
    without utterances longer than max_duration. Returns (datasets, the line that
    says what max_duration left out, or None)."""
    datasets, filtered = {}, None
    for split in ("train", "valid", "test"):
        rows = read_manifest(hparams[f"{split}_csv"], hparams["data_folder"], leave_out=bad_ids)
        if split == "train":
            kept, filtered = length_filter(rows, hparams["max_duration"])
            if rows and not kept:
                raise ConfigError(f"the train split is empty: {filtered}; raise --max_duration")
            rows = kept
        data = sb.dataio.dataset.DynamicItemDataset(rows)
        datasets[split] = data.filtered_sorted(sort_key="duration")
    return datasets, filtered


def dataio_prepare(hparams, tokenizer, bad_ids, datasets=None):
    """The datasets of `read_datasets` with the audio and text pipelines."""
    datasets = datasets or read_datasets(hparams, bad_ids)[0]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return load_audio(wav, hparams["sample_rate"])

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), text_pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "wrd", "tokens"])
    return datasets


def validate_data(hparams):
    """Validate the manifests on the main process; every rank gets the result.

    The result is reused when `manifest_check_file` holds one for the same
    manifests, audio files (sizes, times) and settings. Returns (IDs to leave
    out with skip_invalid, the fingerprint to save, whether the saved result was
    used), or raises ConfigError with the report of every bad row."""
    bad = empty = digest = missing = None
    reused = False
    csvs = {split: hparams[f"{split}_csv"] for split in ("train", "valid", "test")}
    if if_main_process():
        missing = next((f"{split}_csv={path} does not exist: set --{split}_csv to the manifest's path"
                        for split, path in csvs.items() if not Path(path).is_file()), None)
        if not missing:
            limits = AudioLimits(hparams["sample_rate"], hparams["resample"], hparams["min_samples"],
                                 hparams["duration_tolerance"])
            charset = training_charset(hparams["train_csv"])
            digest = fingerprint(csvs, hparams["data_folder"], limits, charset)
            saved = load_check(hparams["manifest_check_file"], digest)
            reused = saved is not None
            if reused:
                bad, empty = saved
            else:
                bad = validate_manifests(csvs, hparams["data_folder"], limits, charset)
                empty = empty_splits(csvs, bad)
    bad, empty, digest, missing, reused = ddp_broadcast((bad, empty, digest, missing, reused))
    if missing:
        raise ConfigError(missing)
    if bad and not hparams["skip_invalid"]:
        raise ConfigError(f"{len(bad)} bad row(s) in the manifests; fix them, or set --skip_invalid=True "
                          f"to leave them out:\n{report(bad)}")
    if empty:
        raise ConfigError(f"{empty[0]}: fix the manifest or the settings named there")
    if bad:
        reasons = collections.Counter(row.reason.split(":")[0] for row in bad)
        logger.warning(f"skip_invalid: {len({b.utt_id for b in bad})} utterance(s) left out: {dict(reasons)}")
    return bad, digest, reused


def training_plan(hparams, train_data, world_size, run_opts):
    """The global batch arithmetic and the number of optimizer steps (a pure
    function of the data and the YAML, so every rank computes the same), and
    the global sequence of batches. In debug mode: the steps debug mode runs."""
    sampler_opts = dict(hparams["dynamic_batch_sampler"])
    durations = [float(train_data.data[utt_id]["duration"]) for utt_id in train_data.data_ids]

    def make_batches(per_rank, num_buckets):
        boundaries = length_buckets(durations, num_buckets, per_rank, hparams["batches_per_bucket"])
        return sb.dataio.sampler.DynamicBatchSampler(
            train_data, length_func=lambda x: float(x["duration"]), bucket_boundaries=boundaries,
            **{**sampler_opts, "max_batch_length": per_rank, "num_buckets": None})

    plan, batches = make_plan(make_batches, sampler_opts["num_buckets"], hparams["global_batch_seconds"],
                              sampler_opts["max_batch_length"], world_size, hparams["number_of_epochs"],
                              hparams["global_batch_tolerance"], hparams["max_duration"])
    if run_opts.debug:  # SpeechBrain stops after debug_batches batches of debug_epochs epochs
        plan.steps_per_epoch = [min(steps, run_opts.debug_batches) for steps in plan.steps_per_epoch]
        plan.steps_per_epoch = plan.steps_per_epoch[: run_opts.debug_epochs]
    return plan, batches
