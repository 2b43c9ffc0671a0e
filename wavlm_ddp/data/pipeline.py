"""The data of a run: the check of every row (reused while nothing changed), the
train / valid / test datasets with their audio and text pipelines, and the global
sequence of training batches. Each split is a CSV manifest (`<split>_csv`) or an
HF dataset (`<split>_data`: parquet or a save_to_disk folder, data/hf.py)."""

import collections
import logging
import re
import time
from functools import partial
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
from speechbrain.utils.distributed import ddp_broadcast, if_main_process

from wavlm_ddp.data import hf as hf_data
from wavlm_ddp.data.audio import load_audio
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.data.manifests import (
    CHECK_VERSION,
    AudioLimits,
    empty_splits,
    fingerprint,
    in_parallel,
    length_filter,
    load_check,
    ordered,
    read_manifest,
    report,
    training_charset,
    validate_manifests,
)
from wavlm_ddp.training.schedule import length_buckets, make_plan, plan_summary, same_plan_on_every_rank, update_budget

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
_opened = {}  # (spec, hf split) -> the HF Dataset, opened once per process


def more_test_sets(hparams):
    """The test sets evaluated after `test`: {name: CSV manifest}, from `more_test_sets`,
    a list of manifests, each named by its file's stem (test-other.csv: test-other). A
    list, not a mapping: a command-line override replaces it whole (--more_test_sets=[])."""
    return {Path(str(path)).stem: str(path) for path in hparams.get("more_test_sets") or []}


def splits(hparams):
    """Every split the run reads: train, valid, test, then the more_test_sets by name
    (each a CSV manifest, `<name>_csv`: add_test_sets)."""
    return SPLITS + tuple(more_test_sets(hparams))


def add_test_sets(hparams):
    """Give each of the more_test_sets the key of a split's manifest (`<name>_csv`),
    so that the data check and the readers treat it as one; one line for a bad entry."""
    entries = hparams.get("more_test_sets") or []
    fix = "set --more_test_sets='[/data/test-other.csv]' (each set named by its file), or []"
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"more_test_sets={entries!r} is not a list of manifests: {fix}")
    names = [Path(str(path)).stem for path in entries]
    for path, name in zip(entries, names):
        if not isinstance(path, (str, Path)) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in SPLITS \
                or names.count(name) > 1 or f"{name}_data" in hparams \
                or hparams.get(f"{name}_csv", str(path)) != str(path):
            raise ConfigError(f"more_test_sets: {path!r} does not name a test set of its own (its file name, "
                              f"{name!r}: letters, digits, '.', '_', '-'; not train, valid or test, not another "
                              f"set's, not another key's prefix): {fix}")
        hparams[f"{name}_csv"] = str(path)


def hf_spec(hparams, split):
    """The HF dataset given for `split` (`<split>_data`), or None: its CSV manifest."""
    return hparams.get(f"{split}_data")


def open_hf(hparams, split):
    spec, name = hf_spec(hparams, split), (hparams.get("hf_splits") or {}).get(split, split)
    key = (str(spec), name)
    if key not in _opened:
        _opened[key] = hf_data.open_split(spec, split, name, dict(hparams["hf_columns"]))
    return _opened[key]


def training_texts(hparams):
    """The training transcripts (tokenizer, LM, character set)."""
    if hf_spec(hparams, "train"):
        column = hparams["hf_columns"]["text"]
        return [text or "" for text in open_hf(hparams, "train").data.column(column).to_pylist()]
    import csv

    with open(hparams["train_csv"], newline="") as f:
        return [row.get("wrd") or "" for row in csv.DictReader(f)]


def charset_of(hparams):
    return set("".join(training_texts(hparams))) if hf_spec(hparams, "train") else \
        training_charset(hparams["train_csv"])


def read_datasets(hparams, bad_rows):
    """Train / valid / test DynamicItemDatasets sorted by duration, without the
    rows that failed validation (`bad_rows`, with skip_invalid) and, for train,
    without utterances longer than max_duration. Returns (datasets, the line that
    says what max_duration left out, or None)."""
    datasets, filtered = {}, None
    bad_ids = {row.utt_id for row in bad_rows}
    for split in splits(hparams):
        if hf_spec(hparams, split):
            data, filtered_here = _hf_dataset(hparams, split, bad_rows)
        else:
            data, filtered_here = _csv_dataset(hparams, split, bad_ids)
        filtered = filtered_here if split == "train" else filtered
        datasets[split] = data
    return datasets, filtered


def _csv_dataset(hparams, split, bad_ids):
    rows = read_manifest(hparams[f"{split}_csv"], hparams["data_folder"], leave_out=bad_ids)
    filtered = None
    if split == "train":
        kept, filtered = length_filter(rows, hparams["max_duration"])
        if rows and not kept:
            raise ConfigError(f"the train split is empty: {filtered}; raise --max_duration")
        rows = kept
    return sb.dataio.dataset.DynamicItemDataset(rows).filtered_sorted(sort_key="duration"), filtered


def _hf_dataset(hparams, split, bad_rows):
    """An HF split as a DynamicItemDataset over row numbers, sorted by duration
    (stable: ties keep the row order, as for a CSV) without reading any audio."""
    dataset, columns = open_hf(hparams, split), dict(hparams["hf_columns"])
    label = f"{hf_spec(hparams, split)} [{split}]"
    durations = hf_data.stated_durations(dataset, columns)
    if durations is None:
        durations = hf_data.load_durations(hparams["manifest_check_file"], split, len(dataset))
        if durations is None:
            raise ConfigError(f"the measured durations of {label} are missing: run the check again "
                              f"(delete {hparams['manifest_check_file']})")
    bad_ids = {b.utt_id for b in bad_rows if b.file == label}
    rows = hf_data.ArrowRows(dataset, columns, split, durations,
                             leave_out=hf_data.rows_of_ids(dataset, columns.get("id"), split, bad_ids))
    keys = np.asarray(rows.keys(), dtype=np.int64)
    filtered = None
    if split == "train" and hparams["max_duration"] and len(keys):
        seconds = durations[keys]
        keep = seconds <= hparams["max_duration"]
        if not keep.all():
            left, total = seconds[~keep].sum(), seconds.sum()
            filtered = (f"max_duration={hparams['max_duration']:g} s: left out {int((~keep).sum())} of {len(keys)} "
                        f"training utterances ({left / 3600:.2f} h of {total / 3600:.2f} h, "
                        f"{100 * left / total:.1f} % of the audio) longer than it")
            if not keep.any():
                raise ConfigError(f"the train split is empty: {filtered}; raise --max_duration")
        keys = keys[keep]
    order = keys[np.argsort(durations[keys], kind="stable")]
    data = sb.dataio.dataset.DynamicItemDataset(rows)
    return sb.dataio.dataset.FilteredSortedDynamicItemDataset(data, [int(i) for i in order]), filtered


def dataset_durations(dataset):
    """The durations of a dataset's items in its order, without reading any audio."""
    if isinstance(dataset.data, hf_data.ArrowRows):
        return [float(d) for d in dataset.data.durations[np.asarray(dataset.data_ids, dtype=np.int64)]]
    return [float(dataset.data[utt_id]["duration"]) for utt_id in dataset.data_ids]


def dataset_ids(dataset):
    """The utterance IDs of a dataset's items in its order, without reading any audio."""
    if isinstance(dataset.data, hf_data.ArrowRows):
        return dataset.data.ids([int(n) for n in dataset.data_ids])
    return [str(utt_id) for utt_id in dataset.data_ids]


def dataio_prepare(hparams, tokenizer, bad_rows, datasets=None):
    """The datasets of `read_datasets` with the audio and text pipelines."""
    datasets = datasets or read_datasets(hparams, bad_rows)[0]

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
    for dataset in datasets.values():
        arrow = isinstance(dataset.data, hf_data.ArrowRows)
        dataset.set_output_keys({"id": "utt_id" if arrow else "id", "sig": "sig", "wrd": "wrd", "tokens": "tokens"})
    return datasets


def validate_data(hparams):
    """Check every row of every split; every rank gets the result.

    The result is reused when `manifest_check_file` holds one for the same data
    (CSV: the manifests and each audio file's size and time; HF: each shard's) and
    settings. Otherwise the rows are checked by `check_workers` processes; under
    torch.distributed each rank checks its share of the rows (every node checks
    its own). Returns (the bad rows, to leave out with skip_invalid; the
    fingerprint to save; whether the saved result was used), or raises ConfigError
    with the report of every bad row."""
    bad = empty = digest = missing = charset = None
    reused, started = False, time.time()
    if if_main_process():
        missing = _missing_source(hparams)
        if not missing:
            charset = charset_of(hparams)
            digest = _fingerprint(hparams, _limits(hparams), charset)
            saved = load_check(hparams["manifest_check_file"], digest)
            reused = saved is not None and all(
                hf_data.load_durations(hparams["manifest_check_file"], split, len(open_hf(hparams, split)))
                is not None for split in _measured_splits(hparams))
            if reused:
                bad, empty = saved
    missing, digest, reused, charset = ddp_broadcast((missing, digest, reused, charset))
    if missing:
        raise ConfigError(missing)
    if not reused:
        bad, empty = _check_all(hparams, charset)
    bad, empty = ddp_broadcast((bad, empty))
    what = "reused the saved check" if reused else f"checked every row ({hparams['check_workers']} worker(s))"
    check_line = f"data check: {what} in {time.time() - started:.1f} s"
    if bad and not hparams["skip_invalid"]:
        raise ConfigError(f"{len(bad)} bad row(s) in the data; fix them, or set --skip_invalid=True "
                          f"to leave them out:\n{report(bad)}")
    if empty:
        raise ConfigError(f"{empty[0]}: fix the manifest or the settings named there")
    if bad:
        reasons = collections.Counter(row.reason.split(":")[0] for row in bad)
        logger.warning(f"skip_invalid: {len({(b.file, b.utt_id) for b in bad})} utterance(s) left out: "
                       f"{dict(reasons)}")
    return bad, digest, reused, check_line


def _limits(hparams):
    return AudioLimits(hparams["sample_rate"], hparams["resample"], hparams["min_samples"],
                       hparams["duration_tolerance"])


def _missing_source(hparams):
    for split in splits(hparams):
        spec = hf_spec(hparams, split)
        if spec:
            try:
                hf_data.data_files(spec)
                open_hf(hparams, split)
            except ConfigError as error:
                return f"{split}_data: {error}"
        elif not Path(hparams[f"{split}_csv"]).is_file():
            if split not in SPLITS:  # one of more_test_sets
                return (f"more_test_sets: {hparams[f'{split}_csv']} does not exist: give the manifest, or set "
                        "--more_test_sets=[] (your own data: list your own test sets there)")
            return f"{split}_csv={hparams[f'{split}_csv']} does not exist: set --{split}_csv to the manifest's path"
    return None


def _measured_splits(hparams):
    """The HF splits without a duration column: their durations come from the check."""
    return [split for split in splits(hparams) if hf_spec(hparams, split) and not hparams["hf_columns"].get("duration")]


def _fingerprint(hparams, limits, charset):
    csvs = {split: hparams[f"{split}_csv"] for split in splits(hparams) if not hf_spec(hparams, split)}
    parts = [fingerprint(csvs, hparams["data_folder"], limits, charset)]
    for split in splits(hparams):
        if hf_spec(hparams, split):
            name = (hparams.get("hf_splits") or {}).get(split, split)
            parts.append(hf_data.split_fingerprint(hf_spec(hparams, split), name, dict(hparams["hf_columns"]),
                                                   open_hf(hparams, split)))
    return f"{CHECK_VERSION}-" + "-".join(part[:16] for part in parts)


def _check_all(hparams, charset):
    """(bad rows, empty-split lines) from checking every row, on `check_workers`
    processes, shared among the ranks under torch.distributed. The main process
    saves the measured durations of HF splits without a duration column."""
    limits, workers = _limits(hparams), hparams["check_workers"]
    rank, world = 0, 1
    if torch.distributed.is_initialized():  # the ranks are the parallel checkers: no forks beside CUDA and NCCL
        rank, world, workers = torch.distributed.get_rank(), torch.distributed.get_world_size(), 1
    csvs = {split: hparams[f"{split}_csv"] for split in splits(hparams) if not hf_spec(hparams, split)}
    bad = []
    if csvs:
        found = validate_manifests(csvs, hparams["data_folder"], limits, charset, workers, share=(rank, world))
        bad += ordered(_gather(found, world), csvs.values())
    empty = empty_splits(csvs, bad) if rank == 0 else []
    for split in splits(hparams):
        if not hf_spec(hparams, split):
            continue
        dataset, columns = open_hf(hparams, split), dict(hparams["hf_columns"])
        label = f"{hf_spec(hparams, split)} [{split}]"
        check = partial(_check_hf_chunk, hparams=hparams, split=split, limits=limits, charset=charset)
        block = partial(_hf_block, label=label)
        parts = sorted(_gather(in_parallel(check, np.arange(len(dataset)), workers, (rank, world), block), world),
                       key=lambda part: part[0])
        found = [row for _, (rows, _) in parts for row in rows]
        if rank == 0:
            found = ordered(found + hf_data.duplicate_ids(dataset, columns.get("id"), label), [label])
        seconds = np.concatenate([s for _, (_, s) in parts]) if parts else np.zeros(0)
        bad += found
        if rank == 0:
            if not len(dataset):
                empty.append(f"the {split} split is empty: {label} has no rows")
            elif len({b.row for b in found}) == len(dataset):
                causes = sorted({b.reason.split(" (")[0].split(":")[0] for b in found})
                empty.append(f"the {split} split is empty after leaving out bad rows: all {len(dataset)} row(s) "
                             f"of {label} are bad ({'; '.join(causes)})")
            if not columns.get("duration"):
                hf_data.save_durations(hparams["manifest_check_file"], split, seconds)
    return bad, empty


def _check_hf_chunk(indices, hparams, split, limits, charset):
    return hf_data.check_rows(open_hf(hparams, split), dict(hparams["hf_columns"]), split,
                              hf_spec(hparams, split), indices, limits, charset)


def _hf_block(indices, label):
    first, last = int(indices[0]), int(indices[-1])
    return f"{label} row {first}" if first == last else f"{label} rows {first}-{last}"


def _gather(items, world):
    """Every rank's list, concatenated in rank order (all ranks call it)."""
    if world == 1:
        return items
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def training_plan(hparams, train_data, world_size, run_opts):
    """The global batch arithmetic and the number of optimizer steps (a pure
    function of the data and the YAML, so every rank computes the same), and
    the global sequence of batches. In debug mode: the steps debug mode runs.

    Under torch.distributed every rank calls it, and the ranks compare their plans
    once (same_plan_on_every_rank): a rank that read other training data (another
    view of the files) would otherwise train on other batches, or wait in a collective
    the others never reach."""
    sampler_opts = dict(hparams["dynamic_batch_sampler"])
    durations = dataset_durations(train_data)
    compare = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def make_batches(per_rank, num_buckets):
        boundaries = length_buckets(durations, num_buckets, per_rank, hparams["batches_per_bucket"])
        return sb.dataio.sampler.DynamicBatchSampler(
            train_data, lengths_list=durations, bucket_boundaries=boundaries,
            **{**sampler_opts, "max_batch_length": per_rank, "num_buckets": None})

    plan = batches = refused = None
    updates = None if run_opts.debug else update_budget(hparams)  # debug mode: its own epochs and batches
    try:
        plan, batches = make_plan(make_batches, sampler_opts["num_buckets"], hparams["global_batch_seconds"],
                                  sampler_opts["max_batch_length"], world_size, hparams["number_of_epochs"],
                                  hparams["global_batch_tolerance"], hparams["max_duration"],
                                  updates)
    except ConfigError as error:
        if not compare:
            raise
        refused = str(error)  # raised once every rank knows the others' plans
    if plan is not None and run_opts.debug:  # SpeechBrain stops after debug_batches batches of debug_epochs epochs
        plan.steps_per_epoch = [min(steps, run_opts.debug_batches) for steps in plan.steps_per_epoch]
        plan.steps_per_epoch = plan.steps_per_epoch[: run_opts.debug_epochs]
    if compare:
        settings = {key: hparams.get(key) for key in ("batches_per_bucket", "global_batch_seconds", "number_of_epochs",
                                                      "global_batch_tolerance", "max_duration")}
        settings["updates"] = updates
        summary = plan_summary(dataset_ids(train_data), durations, {**settings, "sampler": sampler_opts},
                               plan, batches, refused)
        same_plan_on_every_rank(summary, hparams["manifest_check_file"])
    return plan, batches
