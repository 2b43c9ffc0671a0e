"""LayerDrop under DDP on 2 CPU gloo processes: the original failure, the
supported configurations, and exact equivalence with single-process training.
Every scenario runs in the suite's one 2-rank spawn (conftest.two_rank_scenarios), shared by the tests."""

import pytest
import torch

from ddp_worker import results_of, train
from wavlm_ddp.preflight import REDUCTION_ERROR
from wavlm_ddp.encoder.layerdrop import layerdrop_schedule

STEPS = 4


def two_rank_plan(base, tiny_wavlm_dir):
    """This module's 2-rank scenarios (run in conftest's one 2-rank spawn for the whole
    suite, conftest.two_rank_scenarios; this module's come last there)."""
    model = str(tiny_wavlm_dir)
    trained = dict(model_dir=model, steps=STEPS, batch_per_rank=2)
    return {
        "synced": ("train", dict(trained, layerdrop=0.5, mode="synced", find_unused=True)),
        "independent": ("train", dict(trained, layerdrop=0.5, mode="independent", find_unused=True)),
        "layerdrop0-no-find-unused": ("train", dict(trained, layerdrop=0.0, mode="synced", find_unused=False)),
        "checkpointing": ("train", dict(trained, layerdrop=0.5, mode="synced", find_unused=True, checkpointing=True)),
        # Compiled layers traced by AOTAutograd (aot_eager: inductor's tracing without its code
        # generation), the kernels called as custom operators inside them.
        "triton": ("train", dict(trained, layerdrop=0.5, mode="synced", find_unused=True, attention="triton",
                                 compile_backend="aot_eager")),
        "sync_check": ("sync_check", {}),
        "hf_no_layerdrop": ("stock_hf_with_layerdrop", dict(model_dir=model, layerdrop=0.0)),
        # Last: these end in DDP's reduction error (on every rank alike).
        "hf_layerdrop": ("stock_hf_with_layerdrop", dict(model_dir=model, layerdrop=0.9)),
        "hf_no_layerdrop_no_masks": ("stock_hf_with_layerdrop", dict(model_dir=model, layerdrop=0.0,
                                                                     spec_augment=False)),
    }


@pytest.fixture(scope="module")
def runs(two_rank_scenarios):
    return two_rank_scenarios[__name__][1]


def test_hf_layerdrop_without_find_unused_parameters_dies_with_the_reduction_error(runs):
    """Stock HF with SpecAugment masking time, so that masked_spec_embed is in use: at
    layerdrop 0.9 DDP stops on the dropped layers, and the same model at layerdrop 0
    trains (the next test): LayerDrop is the cause."""
    for result in results_of(runs, "hf_layerdrop"):
        assert result["error"] is not None and REDUCTION_ERROR in result["error"]
        assert result["masked_spec_embed"] == [True]  # the step before the error used it


def test_hf_without_layerdrop_trains_without_find_unused_parameters_while_masked_spec_embed_is_in_use(runs):
    for result in results_of(runs, "hf_no_layerdrop"):
        assert result == {"error": None, "masked_spec_embed": [True, True, True]}


def test_hf_without_layerdrop_still_dies_on_the_unused_masked_spec_embed(runs):
    """The second cause, which the recipe removes by freezing masked_spec_embed when
    time masking is off (test_families.py::test_masked_spec_embed_trains_only_when_specaugment_masks_time)."""
    for result in results_of(runs, "hf_no_layerdrop_no_masks"):
        assert result["error"] is not None and REDUCTION_ERROR in result["error"]
        assert result["masked_spec_embed"] == [False]


@pytest.mark.parametrize("scenario", ["synced", "independent", "layerdrop0-no-find-unused"])
def test_supported_configurations_train_and_keep_ranks_identical(runs, tiny_wavlm_dir, scenario):
    ranks = results_of(runs, scenario)
    initial = train(str(tiny_wavlm_dir), steps=0, batch_per_rank=2, layerdrop=0.0, mode="synced", find_unused=False)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    head = "head.weight"
    assert not torch.equal(ranks[0]["params"][head], initial["params"][head])  # it did train


def test_synced_ranks_drop_the_same_layers_which_get_no_gradient_and_do_not_move(runs):
    ranks = results_of(runs, "synced")
    num_layers = len(ranks[0]["history"][0]["drop"])
    expected = [layerdrop_schedule(s, num_layers, 0.5, seed=0) for s in range(STEPS)]
    assert any(any(d) for d in expected), "the schedule should drop something in these steps"
    for result in ranks:
        for step, record in enumerate(result["history"]):
            assert record["drop"] == expected[step]
            assert record["no_grad"] == expected[step]
            assert record["moved"] == [not d for d in expected[step]]
        assert result["drop_counts"] == [sum(col) for col in zip(*expected)]


def test_independent_ranks_draw_different_layers(runs):
    ranks = results_of(runs, "independent")
    drops = [[h["drop"] for h in r["history"]] for r in ranks]
    assert drops[0] != drops[1]


def test_two_ranks_equal_one_process_on_the_global_batch(runs, tiny_wavlm_dir):
    ranks = results_of(runs, "synced")
    single = train(str(tiny_wavlm_dir), steps=STEPS, batch_per_rank=4, layerdrop=0.5, mode="synced", find_unused=True)
    assert [h["drop"] for h in single["history"]] == [h["drop"] for h in ranks[0]["history"]]
    for name, value in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_cross_rank_check_passes_on_equal_drops_and_stops_on_a_mismatch(runs):
    for same, differ in results_of(runs, "sync_check"):
        assert same is None
        assert "ranks dropped different layers" in differ and "--layerdrop_mode" in differ


def test_activation_checkpointing_trains_two_synced_ranks_exactly_as_without_it(runs, tiny_wavlm_dir):
    """Non-reentrant checkpointing under DDP with find_unused_parameters and synced
    LayerDrop 0.5: the same drops, no gradient for the dropped layers, the same weights."""
    ranks = results_of(runs, "checkpointing")
    plain = train(str(tiny_wavlm_dir), steps=STEPS, batch_per_rank=4, layerdrop=0.5, mode="synced", find_unused=True)
    for result in ranks:
        assert [h["no_grad"] for h in result["history"]] == [h["drop"] for h in plain["history"]]
        for name, value in plain["params"].items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_triton_attention_in_compiled_layers_trains_two_synced_ranks_as_the_sdpa_path(runs):
    """attention: triton (the gated bias inside a Triton kernel, run by Triton's
    interpreter on these CPU ranks) in compiled layers under DDP with synced LayerDrop
    0.5: the same drops, no gradient for the dropped layers, and the weights of the
    eager SDPA path after 4 steps."""
    triton, sdpa = results_of(runs, "triton"), results_of(runs, "synced")
    for mine, theirs in zip(triton, sdpa):
        assert [h["drop"] for h in mine["history"]] == [h["drop"] for h in theirs["history"]]
        assert [h["no_grad"] for h in mine["history"]] == [h["drop"] for h in theirs["history"]]
        for name, value in theirs["params"].items():
            torch.testing.assert_close(mine["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
