"""WavLM's family and cousins through the same wrapper: wav2vec 2.0 (large- and
base-like), HuBERT, data2vec-audio and a base-like WavLM, each a tiny model saved
with save_pretrained. Outputs and gradients equal HF's model run on each utterance
alone (a group-norm CNN's output does not depend on the padding of its batch), synced
LayerDrop under DDP, and the unused masked_spec_embed."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from ddp_worker import results_of
from wavlm_ddp.encoder.layerdrop import layerdrop_schedule
from wavlm_wrapper import SpeechEncoder

LAYERS = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, conv_dim=[16] * 7,
              num_conv_pos_embedding_groups=2, mask_time_prob=0.05)
FAMILIES = {
    "wav2vec2-large-like": dict(model_type="wav2vec2", feat_extract_norm="layer", do_stable_layer_norm=True,
                                num_conv_pos_embeddings=8, **LAYERS),
    "wav2vec2-base-like": dict(model_type="wav2vec2", feat_extract_norm="group", do_stable_layer_norm=False,
                               num_conv_pos_embeddings=8, **LAYERS),
    "hubert-large-like": dict(model_type="hubert", feat_extract_norm="layer", do_stable_layer_norm=True,
                              num_conv_pos_embeddings=8, **LAYERS),
    "data2vec-audio": dict(model_type="data2vec-audio", num_conv_pos_embeddings=2, conv_pos_kernel_size=5,
                           **LAYERS),
    "wavlm-base-like": dict(model_type="wavlm", feat_extract_norm="group", do_stable_layer_norm=False,
                            num_conv_pos_embeddings=8, num_buckets=16, max_bucket_distance=32, **LAYERS),
}
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)


STEPS = 4


def make_family_models(folder):
    """{family: its tiny model's folder below `folder`}, the same weights on every call."""
    dirs = {}
    for name, fields in FAMILIES.items():
        fields = dict(fields)
        dirs[name] = folder / name
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return make_family_models(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def family_dir(family, family_dirs):
    return family_dirs[family]


def two_rank_plan(base, tiny_wavlm_dir):
    """Every family trained by 2 ranks with synced LayerDrop 0.5 (run in conftest's one
    2-rank spawn for the whole suite, conftest.two_rank_scenarios)."""
    return {name: ("train", dict(model_dir=str(folder), steps=STEPS, batch_per_rank=2, layerdrop=0.5, mode="synced",
                                 find_unused=True))
            for name, folder in make_family_models(base).items()}


@pytest.fixture(scope="module")
def synced_runs(two_rank_scenarios):
    return two_rank_scenarios[__name__][1]


def padded_batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=gen)
    return wav, torch.tensor(lengths, dtype=torch.float32) / max(lengths)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_each_utterance_of_a_padded_batch_gets_what_hf_computes_for_it_alone(family_dir, train):
    """Outputs (and the greedy tokens of a random head) and every gradient."""
    overrides = dict(layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.05, **NO_DROPOUT)
    ours = SpeechEncoder(str(family_dir), freeze="none", normalize_wav=False, **overrides).train(train)
    config = AutoConfig.from_pretrained(family_dir)
    for key, value in overrides.items():  # data2vec-audio's config has no apply_spec_augment field
        setattr(config, key, value)
    stock = AutoModel.from_pretrained(family_dir, config=config).train(train)
    lengths = [16000, 9000, 5200]
    wav, lens = padded_batch(lengths)
    out = ours(wav, lens)
    frames = ours.frame_lengths(lens, wav.shape[1], out.shape[1]).mul(out.shape[1]).round().long().tolist()
    head = torch.nn.Linear(out.shape[2], 6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours_loss, stock_loss = 0.0, 0.0
    for i, (n, t) in enumerate(zip(lengths, frames)):
        alone = stock(wav[i : i + 1, :n]).last_hidden_state[0]
        assert alone.shape[0] == t
        torch.testing.assert_close(out[i, :t], alone, rtol=1e-4, atol=1e-5)
        assert torch.equal(head(out[i, :t]).argmax(-1), head(alone).argmax(-1))  # the same transcript
        ours_loss = ours_loss + (out[i, :t] * weights[i, :t]).sum()
        stock_loss = stock_loss + (alone * weights[i, :t]).sum()
    ours_loss.backward()
    stock_loss.backward()
    mine = dict(ours.model.named_parameters())
    for name, p in stock.named_parameters():
        if p.grad is None:
            assert mine[name].grad is None, name
        else:
            # summed over 3 utterances in another order: float noise up to ~3e-5 in CNN gradients
            torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_two_ranks_with_synced_layerdrop_drop_the_same_layers_and_stay_identical(family, synced_runs):
    ranks = results_of(synced_runs, family)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    expected = [layerdrop_schedule(s, 4, 0.5, seed=0) for s in range(STEPS)]
    assert any(any(d) for d in expected)
    for result in ranks:
        assert [h["drop"] for h in result["history"]] == expected
        assert [h["no_grad"] for h in result["history"]] == expected  # a dropped layer gets no gradient


def test_masked_spec_embed_trains_only_when_specaugment_masks_time(family_dir):
    off = SpeechEncoder(str(family_dir), apply_spec_augment=False, mask_time_prob=0.05)
    on = SpeechEncoder(str(family_dir), apply_spec_augment=True, mask_time_prob=0.05)
    assert not off.model.masked_spec_embed.requires_grad and on.model.masked_spec_embed.requires_grad
    assert off.family == on.family == AutoConfig.from_pretrained(family_dir).model_type


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
RECIPES = {"wav2vec2_large_ctc": "wav2vec2-large-like", "hubert_large_ctc": "hubert-large-like",
           "wavlm_base_plus_ctc": "wavlm-base-like"}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_familys_yaml_trains_with_synced_layerdrop_and_exports_to_its_own_ctc_class(recipe, tmp_path, capsys):
    """The recipe's YAML on a tiny checkpoint of its family, the demo corpus instead of
    LibriSpeech, synced LayerDrop 0.5, one process (each family's DDP behaviour is
    test_two_ranks_with_synced_layerdrop_drop_the_same_layers_and_stay_identical);
    then export_hf.py writes the family's *ForCTC class, whose logits are the run's."""
    from wavlm_ddp.export_hf import export
    from helpers import run_train
    from wavlm_ddp.inference import ExportedModel, TrainedModel

    # wider than the recipes' 64-channel SpecAugment feature masks, which HF refuses on 32 channels
    fields = {**FAMILIES[RECIPES[recipe]], "hidden_size": 96, "intermediate_size": 192}
    source = tmp_path / "tiny"
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).save_pretrained(source)
    out = tmp_path / "run"
    code, stdout, err = run_train(
        capsys, f"hparams/{recipe}.yaml", f"--wavlm_source={source}", f"--data_folder={DEMO}", "--prepare_data=null",
        f"--train_csv={DEMO / 'train.csv'}", f"--valid_csv={DEMO / 'valid.csv'}", f"--test_csv={DEMO / 'test.csv'}",
        "--more_test_sets=[]", "--max_duration=10.0", "--global_batch_seconds=24",
        "--dynamic_batch_sampler={max_batch_length: 24.0, num_buckets: 10}",
        "--train_dataloader_opts={num_workers: 0}", "--valid_dataloader_opts={num_workers: 0}",
        "--precision=fp32", "--layerdrop=0.5", "--debug", "--debug_batches=3", "--debug_epochs=1",
        "--debug_persistently", "--noprogressbar", f"--output_folder={out}")
    log = stdout + err
    assert code == 0, log[-3000:]
    family = AutoConfig.from_pretrained(source).model_type
    assert f"{family} from {source}: 4 layers" in log and "layerdrop=0.5 (synced)" in log
    assert "steps each layer was dropped" in log and "test WER" in log

    exported = export(out, tmp_path / "hf")
    config = __import__("json").loads((exported / "config.json").read_text())
    assert config["architectures"] == [{"wav2vec2": "Wav2Vec2ForCTC", "hubert": "HubertForCTC",
                                        "wavlm": "WavLMForCTC"}[family]]
    trained = TrainedModel(out)
    signal = trained.load(DEMO / "audio" / sorted(p.name for p in (DEMO / "audio").iterdir())[0])
    torch.testing.assert_close(ExportedModel(exported).logits(signal[None], torch.ones(1)),
                               trained.logits(signal[None], torch.ones(1)), atol=2e-3, rtol=1e-3)
