"""The WavLM wrapper: loading, YAML overrides, freezing, and parity with stock HF."""

import math
import shutil

import pytest
import torch
from transformers import WavLMModel

from helpers import save_tiny_wavlm
from wavlm_ddp.encoder.loading import make_local_checkpoint
from wavlm_wrapper import SpeechEncoder

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0)


# Compiled against eager in float32: inductor sums in another order (scalar C++ loops in
# the tests, conftest.py), a few 1e-5 apart on activations of order 1.
COMPILED = dict(rtol=1e-4, atol=5e-5)

def batch(lengths, seed=0):
    """Random padded waveforms and SpeechBrain relative lengths."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    wav = torch.randn(len(lengths), longest, generator=gen)
    for i, n in enumerate(lengths):
        wav[i, n:] = 0.0
    return wav, torch.tensor([n / longest for n in lengths])


def assert_same_gradients(model, reference, rtol, atol):
    """Every parameter of `model` has the gradient of `reference`'s (None where it has None)."""
    for (name, p_model), p_reference in zip(model.named_parameters(), reference.parameters()):
        if p_reference.grad is None:
            assert p_model.grad is None, name
        else:
            torch.testing.assert_close(p_model.grad, p_reference.grad, rtol=rtol, atol=atol, msg=name)


def test_overrides_from_yaml_are_in_effect_on_the_live_config(tiny_wavlm_dir):
    model = SpeechEncoder(
        str(tiny_wavlm_dir), layerdrop=0.3, apply_spec_augment=True, mask_time_prob=0.2,
        mask_feature_prob=0.1, hidden_dropout=0.05, attention_dropout=0.07, activation_dropout=0.02,
    )
    config = model.model.config
    assert model.layerdrop == config.layerdrop == 0.3
    assert (config.mask_time_prob, config.mask_feature_prob, config.apply_spec_augment) == (0.2, 0.1, True)
    assert (config.hidden_dropout, config.attention_dropout, config.activation_dropout) == (0.05, 0.07, 0.02)
    # the dropouts are built into the modules, not only written in the config
    layer = model.model.encoder.layers[1]
    assert layer.dropout.p == 0.05 and layer.attention.dropout == 0.07
    assert layer.feed_forward.intermediate_dropout.p == 0.02


def test_loading_a_local_folder_gives_the_saved_weights(tiny_wavlm_dir):
    saved = WavLMModel.from_pretrained(tiny_wavlm_dir).state_dict()
    loaded = SpeechEncoder(str(tiny_wavlm_dir), apply_spec_augment=True, mask_time_prob=0.05).model.state_dict()
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name


def test_a_hub_id_loads_offline_from_a_filled_cache(tiny_wavlm_dir, tmp_path, monkeypatch):
    # The layout huggingface_hub writes into cache_dir (save_path) when it downloads.
    repo = tmp_path / "cache" / "models--someone--tiny-wavlm"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(tiny_wavlm_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = SpeechEncoder("someone/tiny-wavlm", save_path=str(tmp_path / "cache"))
    reference = WavLMModel.from_pretrained(tiny_wavlm_dir)
    assert torch.equal(model.model.encoder.layers[0].attention.q_proj.weight,
                       reference.encoder.layers[0].attention.q_proj.weight)


def test_make_local_checkpoint_creates_once_and_keeps_an_existing_one(tmp_path, tiny_config):
    folder = make_local_checkpoint(tmp_path / "small", tiny_config, seed=3)
    first = (folder / "model.safetensors").read_bytes()
    make_local_checkpoint(folder, {**tiny_config, "hidden_size": 64}, seed=4)
    assert (folder / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["small"]  # no temporary folder left


def test_creating_the_local_checkpoint_leaves_torchs_random_state_as_the_run_seeded_it(tmp_path, tiny_config):
    """A run that creates the demo model then draws the same dropout and SpecAugment
    masks as one that finds it; the model itself comes from its own seed."""
    torch.manual_seed(1986)
    seeded = torch.get_rng_state()
    first = make_local_checkpoint(tmp_path / "a", tiny_config, seed=3)
    assert torch.equal(torch.get_rng_state(), seeded)
    torch.manual_seed(7)
    second = make_local_checkpoint(tmp_path / "b", tiny_config, seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


@pytest.mark.parametrize("freeze", ["cnn", "all"])
def test_a_frozen_cnn_runs_no_backward(tiny_wavlm_dir, freeze):
    model = SpeechEncoder(str(tiny_wavlm_dir), freeze=freeze).train()
    cnn_outputs = []
    model.model.feature_extractor.register_forward_hook(lambda m, i, out: cnn_outputs.append(out))
    wav, lens = batch([8000, 6000])
    out = model(wav, lens)
    assert cnn_outputs[0].grad_fn is None and not cnn_outputs[0].requires_grad
    assert all(not p.requires_grad for p in model.model.feature_extractor.parameters())
    if freeze == "all":
        assert not out.requires_grad
        assert not any(p.requires_grad for p in model.parameters())
    else:
        out.pow(2).mean().backward()
        assert model.model.encoder.layers[1].attention.q_proj.weight.grad is not None


def test_nothing_frozen_trains_the_cnn(tiny_wavlm_dir):
    model = SpeechEncoder(str(tiny_wavlm_dir), freeze="none").train()
    wav, lens = batch([8000, 6000])
    model(wav, lens).pow(2).mean().backward()
    assert model.model.feature_extractor.conv_layers[0].conv.weight.grad.abs().sum() > 0


def test_every_trainable_parameter_gets_a_gradient_with_layerdrop_0(tiny_wavlm_dir):
    """masked_spec_embed is unused without SpecAugment: it must not be trainable."""
    model = SpeechEncoder(
        str(tiny_wavlm_dir), layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.05, freeze="none"
    ).train()
    assert not model.model.masked_spec_embed.requires_grad
    wav, lens = batch([8000, 6000])
    model(wav, lens).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_layerdrop_outside_0_1_is_refused_naming_the_key(tiny_wavlm_dir, bad):
    with pytest.raises(ValueError, match=r"layerdrop=.*outside \[0, 1\).*--layerdrop"):
        SpeechEncoder(str(tiny_wavlm_dir), layerdrop=bad)


@pytest.mark.parametrize("key,value", [("layerdrop_mode", "random"), ("freeze", "cnn_only"), ("attention", "flash")])
def test_unknown_choices_are_refused_naming_the_key(tiny_wavlm_dir, key, value):
    with pytest.raises(ValueError, match=f"{key}='{value}'.*--{key}"):
        SpeechEncoder(str(tiny_wavlm_dir), **{key: value})


@pytest.mark.parametrize("bad", [0, -64, 6.4, "64", True])
def test_pad_frames_to_must_be_a_positive_integer_naming_the_key(tiny_wavlm_dir, bad):
    with pytest.raises(ValueError, match=r"pad_frames_to=.*not a positive integer.*--pad_frames_to"):
        SpeechEncoder(str(tiny_wavlm_dir), pad_frames_to=bad)


def _stock_forward(stock, wav, lens):
    """Stock HF WavLM as SpeechBrain's HF wrapper calls it (sample-level mask)."""
    mask = (torch.arange(wav.shape[1])[None, :] < torch.round(lens * wav.shape[1])[:, None]).long()
    return stock(wav, attention_mask=mask).last_hidden_state, mask


@pytest.mark.parametrize("lengths", [[8000], [8000, 8000], [9600, 7000, 4000], [16000, 3300]])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("pad_frames_to", [1, 64])
def test_sdpa_path_matches_stock_hf_outputs_and_gradients(tiny_wavlm_dir, lengths, train, pad_frames_to):
    overrides = dict(layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.05, **NO_DROPOUT)
    fast = SpeechEncoder(str(tiny_wavlm_dir), attention="sdpa", freeze="none", normalize_wav=False,
                 pad_frames_to=pad_frames_to, **overrides)
    stock = WavLMModel.from_pretrained(tiny_wavlm_dir, **overrides)
    fast.train(train)
    stock.train(train)
    wav, lens = batch(lengths, seed=len(lengths))
    out = fast(wav, lens)
    ref, mask = _stock_forward(stock, wav, lens)
    frames = stock._get_feature_vector_attention_mask(ref.shape[1], mask)
    torch.testing.assert_close(out[frames], ref[frames], rtol=1e-4, atol=1e-5)

    weights = torch.randn(out.shape)  # a loss that weighs every real frame differently
    (out * weights)[frames].sum().backward()
    (ref * weights)[frames].sum().backward()
    fast_params = dict(fast.model.named_parameters())
    for name, p_stock in stock.named_parameters():
        p_fast = fast_params[name]
        if p_stock.grad is None:
            assert p_fast.grad is None, name
            continue
        torch.testing.assert_close(p_fast.grad, p_stock.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_inductor_compiled_layers_train_like_eager_without_recompiling_per_pattern(tiny_wavlm_dir):
    """The real inductor backend (C++ on CPU, Triton on CUDA): a few SGD steps with
    LayerDrop changing the pattern and batches changing their length and size."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    overrides = dict(layerdrop=0.5, apply_spec_augment=False, freeze="none", **NO_DROPOUT)
    compiled = SpeechEncoder(str(tiny_wavlm_dir), compile_layers=True, compile_backend="inductor", pad_frames_to=64,
                     **overrides).train()
    eager = SpeechEncoder(str(tiny_wavlm_dir), **overrides).train()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (compiled, eager)]
    patterns = set()
    # 8000 samples are 24 frames and 9600 are 29: both padded to 64 frames.
    batches = [[8000, 6000], [9600, 9600, 4000], [6400, 6400, 6400], [9000, 3000]]
    for step, lengths in enumerate(batches):
        wav, lens = batch(lengths, seed=step)
        out_compiled, out_eager = compiled(wav, lens, step=step), eager(wav, lens, step=step)
        torch.testing.assert_close(out_compiled, out_eager, **COMPILED)
        weights = torch.randn(out_eager.shape)
        (out_compiled * weights).sum().backward()
        (out_eager * weights).sum().backward()
        assert_same_gradients(compiled, eager, rtol=1e-3, atol=1e-4)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        patterns.add(tuple(compiled.layer_drop.last))
    assert len(patterns) >= 3  # several drop patterns were trained
    # Every layer runs one graph whatever is dropped, whatever the batch size (2 or 3) and
    # whatever the length padded to the same multiple. (Each other padded length adds one,
    # and so would a batch of a single utterance: PyTorch specialises sizes of 1.)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for p_compiled, p_eager in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, **COMPILED)


def test_the_sdpa_path_replaces_hfs_eager_attention_in_every_layer(tiny_wavlm_dir, monkeypatch):
    from transformers.models.wavlm import modeling_wavlm

    from wavlm_ddp.encoder import attention

    calls = {"sdpa": 0, "eager": 0}
    sdpa = attention.F.scaled_dot_product_attention
    eager = modeling_wavlm.WavLMAttention.torch_multi_head_self_attention

    def count_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def count_eager(*args, **kwargs):
        calls["eager"] += 1
        return eager(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", count_sdpa)
    monkeypatch.setattr(modeling_wavlm.WavLMAttention, "torch_multi_head_self_attention", count_eager)
    fast = SpeechEncoder(str(tiny_wavlm_dir), attention="sdpa").eval()
    fast(*batch([8000, 6000]))
    assert calls == {"sdpa": fast.num_layers, "eager": 0}
    SpeechEncoder(str(tiny_wavlm_dir), attention="eager").eval()(*batch([8000, 6000]))
    assert calls == {"sdpa": fast.num_layers, "eager": fast.num_layers}


def test_activation_checkpointing_gives_the_plain_outputs_and_every_gradient(tiny_wavlm_dir):
    """Dropout on: the recomputation replays the same random masks (the RNG state is kept)."""
    overrides = dict(layerdrop=0.5, apply_spec_augment=False, freeze="none", hidden_dropout=0.1,
                     attention_dropout=0.1, activation_dropout=0.1)
    plain = SpeechEncoder(str(tiny_wavlm_dir), **overrides).train()
    checkpointed = SpeechEncoder(str(tiny_wavlm_dir), activation_checkpointing=True, **overrides).train()
    wav, lens = batch([9600, 7000, 4000])
    for step in range(3):
        torch.manual_seed(step)
        out_plain = plain(wav, lens, step=step)
        torch.manual_seed(step)
        out_checkpointed = checkpointed(wav, lens, step=step)
        torch.testing.assert_close(out_checkpointed, out_plain, rtol=0, atol=0)
        weights = torch.randn(out_plain.shape)
        (out_plain * weights).sum().backward()
        (out_checkpointed * weights).sum().backward()
        assert_same_gradients(checkpointed, plain, rtol=1e-6, atol=1e-7)
        plain.zero_grad(set_to_none=True)
        checkpointed.zero_grad(set_to_none=True)


def test_activation_checkpointing_composes_with_inductor_compiled_layers(tiny_wavlm_dir):
    overrides = dict(layerdrop=0.5, apply_spec_augment=False, freeze="none", **NO_DROPOUT)
    eager = SpeechEncoder(str(tiny_wavlm_dir), **overrides).train()
    compiled = SpeechEncoder(str(tiny_wavlm_dir), activation_checkpointing=True, compile_layers=True, pad_frames_to=64,
                     **overrides).train()
    for step, lengths in enumerate([[8000, 6000], [9600, 9600, 4000]]):
        wav, lens = batch(lengths, seed=step)
        out_eager, out_compiled = eager(wav, lens, step=step), compiled(wav, lens, step=step)
        torch.testing.assert_close(out_compiled, out_eager, **COMPILED)
        weights = torch.randn(out_eager.shape)
        (out_eager * weights).sum().backward()
        (out_compiled * weights).sum().backward()
        assert_same_gradients(compiled, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("lengths", [[8000], [9600, 7000, 4000]])
@pytest.mark.parametrize("pad_frames_to", [1, 64])
def test_flex_attention_forward_matches_stock_hf(tiny_wavlm_dir, lengths, pad_frames_to):
    """FlexAttention has no backward on the CPU (torch 2.14): the forward is proven
    here, the gradients on a GPU by bench/parity.py."""
    overrides = dict(layerdrop=0.0, apply_spec_augment=False, mask_time_prob=0.05, **NO_DROPOUT)
    flex = SpeechEncoder(str(tiny_wavlm_dir), attention="flex", freeze="none", normalize_wav=False,
                 pad_frames_to=pad_frames_to, **overrides).train()
    stock = WavLMModel.from_pretrained(tiny_wavlm_dir, **overrides).train()
    wav, lens = batch(lengths, seed=len(lengths))
    with torch.no_grad():
        out = flex(wav, lens)
        ref, mask = _stock_forward(stock, wav, lens)
    frames = stock._get_feature_vector_attention_mask(ref.shape[1], mask)
    torch.testing.assert_close(out[frames], ref[frames], rtol=1e-4, atol=1e-5)


def test_flex_attention_refuses_attention_dropout_and_other_families(tiny_wavlm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"attention='flex' has no attention dropout.*--attention_dropout=0"):
        SpeechEncoder(str(tiny_wavlm_dir), attention="flex", attention_dropout=0.1)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = tmp_path / "w2v"
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=[16] * 7, num_conv_pos_embeddings=8,
                                 num_conv_pos_embedding_groups=2)).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"attention='flex' is WavLM's.*--attention=sdpa"):
        SpeechEncoder(str(folder), attention="flex", attention_dropout=0.0)


def test_triton_attention_refuses_attention_dropout(tiny_wavlm_dir):
    with pytest.raises(ValueError, match=r"attention='triton' has no attention dropout.*--attention_dropout=0"):
        SpeechEncoder(str(tiny_wavlm_dir), attention="triton", attention_dropout=0.1)


@pytest.mark.parametrize("block", [48, 8, 64.0, True])
def test_triton_block_must_be_a_power_of_two_of_at_least_16(tiny_wavlm_dir, block):
    with pytest.raises(ValueError, match=rf"triton_block={block!r} is not a power of two >= 16.*--triton_block=64"):
        SpeechEncoder(str(tiny_wavlm_dir), attention="triton", attention_dropout=0.0, triton_block=block)


def test_triton_block_reaches_the_kernel_of_every_layer(tiny_wavlm_dir, monkeypatch):
    from wavlm_ddp.encoder import gated_attention

    blocks = []
    monkeypatch.setattr(gated_attention, "gated_bias_attention",
                        lambda query, *args, block: blocks.append(block) or torch.zeros_like(query))
    encoder = SpeechEncoder(str(tiny_wavlm_dir), attention="triton", triton_block=32, **NO_DROPOUT)
    encoder(*batch([8000, 6000]))
    assert blocks == [32] * encoder.num_layers


def test_compile_cnn_refuses_a_cnn_that_trains(tiny_wavlm_dir):
    with pytest.raises(ValueError, match=r"compile_cnn compiles the frozen CNN.*--compile_cnn=False"):
        SpeechEncoder(str(tiny_wavlm_dir), compile_cnn=True, freeze="none")


def test_the_recompile_limit_covers_every_padded_length_in_training_the_frozen_phase_and_evaluation(
        tiny_wavlm_dir, monkeypatch):
    """Each padded length up to 60 s is a graph in each mode a layer runs in (with and
    without gradients in training, and in evaluation): none may fall back to eager code."""
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    with torch._dynamo.config.patch(recompile_limit=8):
        SpeechEncoder(str(tiny_wavlm_dir), compile_layers=True, pad_frames_to=64)
        assert torch._dynamo.config.recompile_limit >= 3 * math.ceil(60 * 50 / 64)


GRAPHED = dict(compile_layers=True, pad_frames_to=64, layerdrop=0.0, cuda_graphs=True)


@pytest.mark.parametrize("settings,message", [
    (dict(compile_layers=False), r"cuda_graphs records the compiled layers' kernels.*--compile_layers=True"),
    (dict(compile_backend="aot_eager"), r"cuda_graphs are inductor's.*compile_backend: inductor"),
    (dict(pad_frames_to=1), r"cuda_graphs records one graph per frame count.*--pad_frames_to=64"),
    (dict(layerdrop=0.1), r"layerdrop=0.1 draws a new sequence at nearly every step.*--layerdrop=0"),
    (dict(activation_checkpointing=True), r"cuda_graphs with activation_checkpointing.*--activation_checkpointing=False"),
], ids=["layers-not-compiled", "not-inductor", "frames-not-padded", "layerdrop", "activation-checkpointing"])
def test_cuda_graphs_refuse_settings_whose_recordings_would_change_every_step_or_not_replay(tiny_wavlm_dir, settings,
                                                                                            message):
    with pytest.raises(ValueError, match=message) as error:
        SpeechEncoder(str(tiny_wavlm_dir), **{**GRAPHED, **settings})
    assert "\n" not in str(error.value)


def test_cuda_graphs_refuse_gradient_accumulation_naming_the_keys_that_remove_it():
    from wavlm_ddp.encoder.loading import check_graphed_accumulation

    with pytest.raises(ValueError, match=r"cuda_graphs cannot accumulate gradients.*accumulates 2 micro-batches "
                                         r"\(global_batch_seconds 400 over 2 ranks\).*max_batch_length.*"
                                         r"--cuda_graphs=False"):
        check_graphed_accumulation(True, 2, 400.0, 2)
    check_graphed_accumulation(True, 1, 400.0, 4)
    check_graphed_accumulation(False, 2, 400.0, 2)


def test_cuda_graphs_compile_each_layer_in_reduce_overhead_mode_and_begin_a_step_at_each_forward(tiny_wavlm_dir,
                                                                                               monkeypatch):
    """The wiring of the key, with torch.compile and the step marker recorded instead of
    run (CUDA graphs record on a GPU only; bench/parity.py checks the replayed steps there)."""
    compiled, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(options) or module)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(compiled)))
    wav, lens = batch([8000, 6000])
    for cuda_graphs in (False, True):
        compiled.clear()
        encoder = SpeechEncoder(str(tiny_wavlm_dir), **{**GRAPHED, "cuda_graphs": cuda_graphs}, **NO_DROPOUT)
        mode = {"mode": "reduce-overhead"} if cuda_graphs else {}
        assert compiled == [{"backend": "inductor", **mode}] * encoder.num_layers
        encoder.train()
        encoder(wav, lens, step=0).sum().backward()
        encoder(wav, lens, step=1).sum().backward()
        with torch.no_grad():
            encoder.eval()(wav, lens)
        assert len(marks) == (3 if cuda_graphs else 0)


def test_a_compiled_frozen_cnn_gives_the_eager_features_at_any_length(tmp_path):
    """On a CNN of 2 convolutions with WavLM's total stride of 320 samples (the 7 of the
    tiny model compile the same way, several times slower)."""
    model = save_tiny_wavlm(tmp_path / "two-convolutions", conv_dim=[16, 16], conv_kernel=[10, 8], conv_stride=[5, 64])
    overrides = dict(layerdrop=0.0, apply_spec_augment=False, freeze="cnn", **NO_DROPOUT)
    eager = SpeechEncoder(str(model), **overrides).train()
    compiled = SpeechEncoder(str(model), compile_cnn=True, **overrides).train()
    for step, lengths in enumerate([[8000, 6000], [9600, 9600, 4000], [12000, 5000]]):
        wav, lens = batch(lengths, seed=step)
        torch.testing.assert_close(compiled(wav, lens, step=step), eager(wav, lens, step=step), **COMPILED)


@pytest.mark.parametrize("options", [{}, {"compile_cnn": True, "compile_layers": True, "attention": "flex",
                                          "attention_dropout": 0.0, "activation_checkpointing": True}],
                         ids=["plain", "every-speed-key"])
def test_the_encoders_state_dict_is_hfs_model_whatever_the_speed_keys(tiny_wavlm_dir, options):
    """Checkpoints hold the encoder's state dict: it must be HF's model under `model.`,
    nothing more, so a run saved with other speed settings (or before they existed) loads."""
    encoder = SpeechEncoder(str(tiny_wavlm_dir), **options)
    keys = list(encoder.state_dict())
    assert len(keys) == len(encoder.model.state_dict()) and keys == [f"model.{k}" for k in encoder.model.state_dict()]


def test_the_old_class_name_of_saved_yaml_files_still_builds_the_encoder(tiny_wavlm_dir):
    """Run folders saved before the family was supported name `wavlm_wrapper.WavLM`."""
    from wavlm_wrapper import WavLM

    assert WavLM is SpeechEncoder and WavLM(str(tiny_wavlm_dir)).family == "wavlm"
