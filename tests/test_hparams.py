"""Every recipe in hparams/ has the same keys, so a key added to one recipe and
forgotten in the others is caught (the demo alone has no LibriSpeech preparation)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "hparams").glob("*.yaml"))
# The demo ships its manifests: no LibriSpeech preparation, no hub cache.
DEMO_ONLY_ABSENT = {"prepare_data", "train_splits", "valid_split", "test_split", "wavlm_cache"}
# Blocks whose keys every recipe must share too (model settings the demo adds: init_config).
BLOCKS = ("wavlm", "dynamic_batch_sampler", "test_search", "decoding_grid", "lr")


class TaggedLoader(yaml.SafeLoader):
    """Reads hyperpyyaml's tags (!new:, !name:, !ref, ...) as plain values: keys only."""


def _untagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


TaggedLoader.add_multi_constructor("!", _untagged)


def keys(path):
    return yaml.load(path.read_text(), Loader=TaggedLoader)


def test_there_are_the_five_recipes():
    assert [p.name for p in RECIPES] == ["demo.yaml", "hubert_large_ctc.yaml", "wav2vec2_large_ctc.yaml",
                                         "wavlm_base_plus_ctc.yaml", "wavlm_large_ctc.yaml"]


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.name != "wavlm_large_ctc.yaml"], ids=lambda p: p.name)
def test_every_recipe_has_the_keys_of_the_large_recipe(recipe):
    reference, other = keys(ROOT / "hparams" / "wavlm_large_ctc.yaml"), keys(recipe)
    expected = set(reference) - (DEMO_ONLY_ABSENT if recipe.name == "demo.yaml" else set())
    assert set(other) == expected, {"missing": sorted(expected - set(other)),
                                    "extra": sorted(set(other) - expected)}
    for block in BLOCKS:
        extra_allowed = {"init_config", "init_seed"} if block == "wavlm" and recipe.name == "demo.yaml" else set()
        missing_allowed = {"save_path"} if block == "wavlm" and recipe.name == "demo.yaml" else set()
        assert set(other[block]) - extra_allowed == set(reference[block]) - missing_allowed, block
