"""Each family YAML against docs/published_setup.md's table of the published fine-tuning
values (recipe, key, ours, published, source, why ours differs), and the update budget."""

import functools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hyperpyyaml import load_hyperpyyaml

from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.training.schedule import make_plan, update_budget

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "published_setup.md"
FAMILIES = ["wavlm_large_ctc", "wav2vec2_large_ctc", "hubert_large_ctc", "wavlm_base_plus_ctc"]


def table_rows():
    """The table's rows as dicts, one per (recipe, key): the recipes column lists several,
    or "all four"."""
    rows = []
    header = None
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        row = dict(zip(header, cells))
        recipes = FAMILIES if row["recipes"] == "all four" else [r.strip() for r in row["recipes"].split(",")]
        for recipe in recipes:
            rows.append({**row, "recipe": recipe, "key": row["key"].strip("`")})
    return rows


@functools.cache
def hparams_of(recipe):
    return load_hyperpyyaml((ROOT / "hparams" / f"{recipe}.yaml").read_text(), overrides={"data_folder": "unused"})


def value_at(hparams, key):
    """The value at a dotted key; a `!name:` entry (a partial) is entered by its keywords."""
    value = hparams
    for part in key.split("."):
        value = value.keywords[part] if isinstance(value, functools.partial) else value[part]
    return value


def same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12)
    return a == b


ROWS = table_rows()


def test_the_table_covers_every_family_and_the_settings_the_issue_names():
    keys = {recipe: {row["key"] for row in ROWS if row["recipe"] == recipe} for recipe in FAMILIES}
    for recipe, named in keys.items():
        for needed in ("wavlm.mask_time_prob", "wavlm.mask_feature_prob", "layerdrop", "wavlm.activation_dropout",
                       "wavlm.hidden_dropout", "attention_dropout", "lr.wavlm.peak", "lr.wavlm.warmup",
                       "lr.wavlm.hold", "lr.wavlm.final_ratio", "freeze_encoder", "global_batch_seconds",
                       "update_budgets.published", "wavlm_opt_class.betas"):
            assert needed in named, (recipe, needed)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['recipe']}:{r['key']}" for r in ROWS])
def test_every_family_yaml_holds_the_published_value_of_each_row_or_says_why_not(row):
    ours = yaml.safe_load(row["ours"])
    assert same(value_at(hparams_of(row["recipe"]), row["key"]), ours), row
    try:
        published = yaml.safe_load(row["published"])
    except yaml.YAMLError:
        published = row["published"]
    if row["why ours differs"]:
        assert not same(ours, published), f"{row['key']}: the same value with a reason to differ"
    else:
        assert same(ours, published), f"{row['key']}: ours {ours!r}, published {published!r} ({row['source']})"


def test_the_base_10h_ending_is_its_decay_stopped_at_max_update():
    """base_10h: warm-up 8,000, decay planned over 72,000 updates to 0.05 x peak, stopped at
    25,000: at the end the rate is 0.05 ** (17,000 / 72,000) of the peak, as an exponential
    decay to that ratio over the run's last 0.68 gives."""
    from wavlm_ddp.training.schedule import learning_rate

    hparams = hparams_of("hubert_large_ctc")
    cfg = {k: v for k, v in hparams["lr"]["wavlm"].items() if k != "counted_from"}
    for step in (8000, 12000, 20000, 24999):
        fairseq = cfg["peak"] * 0.05 ** ((step - 8000) / 72000)
        assert learning_rate(step, 25000, **cfg) == pytest.approx(fairseq, rel=3e-3), step


class Batches:
    """A stand-in DynamicBatchSampler: `per_epoch[epoch - 1]` batches of 10 s."""

    def __init__(self, per_epoch):
        self.per_epoch, self.epoch = per_epoch, 1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.per_epoch[(self.epoch - 1) % len(self.per_epoch)]

    def __iter__(self):
        return iter([[0]] * len(self))


def test_the_update_budget_runs_the_fewest_whole_epochs_that_reach_it(monkeypatch):
    from wavlm_ddp.training import schedule

    monkeypatch.setattr(schedule, "step_audio", lambda batches, group: 20.0)
    plan = lambda updates, epochs=3: make_plan(lambda per_rank, buckets: Batches([10, 12]), 4, 20.0, 10.0, 2, epochs,
                                               0.25, None, updates)[0]
    assert plan(None).steps_per_epoch == [5, 6, 5]  # number_of_epochs decides
    assert plan(16).steps_per_epoch == [5, 6, 5]  # 16 steps: 3 epochs
    assert plan(17).steps_per_epoch == [5, 6, 5, 6]  # one step more: a 4th epoch
    assert plan(1).steps_per_epoch == [5]
    line = plan(17).describe_budget(17, 1600.0, "bench")
    assert line.startswith("run: 22 optimizer steps (update budget 17: the fewest whole epochs that reach it) x "
                           "20.0 s = 0 h of audio seen; at 1,600 audio-s/s per GPU (bench) about 0.0 GPU-hours")


@pytest.mark.parametrize("recipe,budget,updates", [("wavlm_large_ctc", "published", 80000),
                                                   ("wavlm_large_ctc", "quick", 10000),
                                                   ("wavlm_large_ctc", "epochs", None),
                                                   ("hubert_large_ctc", "published", 25000)])
def test_each_named_budget_is_a_number_of_updates_or_leaves_the_epochs_to_decide(recipe, budget, updates):
    assert update_budget({**hparams_of(recipe), "update_budget": budget}) == updates


def test_an_unknown_budget_stops_naming_the_ones_there_are():
    with pytest.raises(ConfigError, match=r"update_budget='long' is not one of the YAML's update_budgets "
                                          r"\(published, quick, epochs\): set --update_budget=published"):
        update_budget({**hparams_of("wavlm_large_ctc"), "update_budget": "long"})


def test_a_budget_set_for_a_far_larger_corpus_stops_before_planning_thousands_of_epochs(monkeypatch):
    from wavlm_ddp.training import schedule

    monkeypatch.setattr(schedule, "step_audio", lambda batches, group: 20.0)
    with pytest.raises(ConfigError, match=r"an update budget of 1000000 optimizer steps takes more than 5000 epochs "
                                          r"of 5 steps on this training set: .* set --update_budget=quick"):
        make_plan(lambda per_rank, buckets: Batches([10, 12]), 4, 20.0, 10.0, 2, 3, 0.25, None, 1_000_000)
