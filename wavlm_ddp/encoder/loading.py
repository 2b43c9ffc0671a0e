"""Loading an encoder of WavLM's family for fine-tuning: the argument checks, the
demo's local checkpoint, the YAML's overrides written into the HF config (and
verified after loading), and freezing.

transformers is imported inside the functions: the settings checks that run before
any worker starts (train.py --check_only) do not pay for importing it.
"""

import functools
import inspect
import os
import tempfile
from pathlib import Path

import torch

from wavlm_ddp.encoder import attention as wavlm_attention
from wavlm_ddp.preflight import LAYERDROP_MODES, ConfigError, check_choice, check_layerdrop, check_positive_int

# HF encoders the recipe drives (config.model_type): the same CNN + projection +
# positional conv + encoder-layer loop; only WavLM has the gated relative position bias.
FAMILIES = ("wavlm", "wav2vec2", "hubert", "data2vec-audio")
FREEZE_CHOICES = ("none", "cnn", "all")
ATTENTION_CHOICES = wavlm_attention.KINDS


def check_arguments(layerdrop, layerdrop_mode, freeze, attention, attention_dropout, compile_cnn, pad_frames_to,
                    compile_layers=False, cuda_graphs=False, compile_backend="inductor", activation_checkpointing=False,
                    triton_block=None):
    """The checks that need no model: one ConfigError naming the key and the fix."""
    check_choice("layerdrop_mode", layerdrop_mode, LAYERDROP_MODES)
    check_choice("freeze", freeze, FREEZE_CHOICES)
    check_choice("attention", attention, ATTENTION_CHOICES)
    check_layerdrop(layerdrop)
    check_positive_int("pad_frames_to", pad_frames_to, 64)
    if compile_cnn and freeze == "none":
        raise ConfigError("compile_cnn compiles the frozen CNN (no backward), but freeze='none' trains it: "
                          "set --compile_cnn=False or freeze the CNN (freeze: cnn)")
    if triton_block is not None and (isinstance(triton_block, bool) or not isinstance(triton_block, int)
                                     or triton_block < 16 or triton_block & (triton_block - 1)):
        raise ConfigError(f"triton_block={triton_block!r} is not a power of two >= 16 (the Triton kernel's tile "
                          "side): set --triton_block=64, or null for the kernel's default")
    if cuda_graphs:
        check_cuda_graphs(layerdrop, compile_layers, compile_backend, pad_frames_to, activation_checkpointing)
    if attention in wavlm_attention.TABLE_KINDS and attention_dropout > 0:
        raise ConfigError(f"attention='{attention}' has no attention dropout, but attention_dropout={attention_dropout}: "
                          "set --attention_dropout=0 or --attention=sdpa")


def check_encoder_keys(factory):
    """check_arguments on the YAML's encoder (`wavlm: !name:wavlm_wrapper.SpeechEncoder`,
    a partial), so that a refusal comes from the settings check, before any worker starts."""
    if not isinstance(factory, functools.partial):  # not the recipe's `!name:`: checked when it is built
        return
    defaults = inspect.signature(factory.func).parameters
    names = inspect.signature(check_arguments).parameters
    check_arguments(**{name: factory.keywords.get(name, defaults[name].default) for name in names})


def check_cuda_graphs(layerdrop, compile_layers, compile_backend, pad_frames_to, activation_checkpointing):
    """CUDA graphs replay what the compiled layers recorded, one recording per sequence
    of calls and shapes (inductor's CUDA graph trees): the settings under which that
    sequence changes every step, or which the trees cannot replay, are refused."""
    if not compile_layers:
        raise ConfigError("cuda_graphs records the compiled layers' kernels, but compile_layers=False: "
                          "set --compile_layers=True or --cuda_graphs=False")
    if compile_backend != "inductor":
        raise ConfigError(f"cuda_graphs are inductor's (torch.compile mode 'reduce-overhead'), but compile_backend="
                          f"{compile_backend}: set compile_backend: inductor or --cuda_graphs=False")
    if pad_frames_to == 1:
        raise ConfigError("cuda_graphs records one graph per frame count, and pad_frames_to=1 leaves every length "
                          "its own: set --pad_frames_to=64 or --cuda_graphs=False")
    if layerdrop > 0:
        raise ConfigError(f"cuda_graphs records one graph per sequence of layers run, and layerdrop={layerdrop} draws "
                          "a new sequence at nearly every step (each one recorded anew): set --layerdrop=0 or "
                          "--cuda_graphs=False")
    if activation_checkpointing:
        raise ConfigError("cuda_graphs with activation_checkpointing is not supported: the recomputation runs each "
                          "recorded layer again inside the backward pass; set --activation_checkpointing=False or "
                          "--cuda_graphs=False")


def check_graphed_accumulation(cuda_graphs, accumulation, global_seconds, world_size):
    """A recorded backward writes its gradients into the same memory at every replay,
    so gradients accumulated over several micro-batches would be overwritten."""
    if cuda_graphs and accumulation > 1:
        raise ConfigError(f"cuda_graphs cannot accumulate gradients (each replay of a recorded backward overwrites "
                          f"the last one's), and this run accumulates {accumulation} micro-batches "
                          f"(global_batch_seconds {global_seconds:g} over {world_size} rank{'s' if world_size > 1 else ''}): raise "
                          "dynamic_batch_sampler's max_batch_length, use more GPUs, or set --cuda_graphs=False")


def make_local_checkpoint(folder, config, seed):
    """Save a randomly initialised model built from `config` (a dict of config fields;
    `model_type` one of FAMILIES, default wavlm) to `folder` in the `save_pretrained`
    layout, unless it is already there.

    Under DDP the main process writes it while the others wait. It is initialised from
    `seed` in a forked random state: torch's random state (dropout, SpecAugment) is
    left as the run seeded it, so a run that creates the model trains exactly like one
    that finds it. It is written into a temporary folder and renamed into place, so an
    interrupted save never leaves a half-written checkpoint that a later run would
    take for a good one.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    distributed = torch.distributed.is_initialized()
    if not (folder / "config.json").exists() and (not distributed or torch.distributed.get_rank() == 0):
        folder.parent.mkdir(parents=True, exist_ok=True)
        fields = dict(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type", "wavlm"), **fields))
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        model.save_pretrained(tmp)
        os.rename(tmp, folder)
    if distributed:
        torch.distributed.barrier()
    return folder


def load_model(source, save_path, overrides, attention):
    """The HF model of `source` (hub id or save_pretrained folder) with `overrides`
    (layerdrop, SpecAugment, dropouts) written into its config before it is built,
    and checked on the live config after. WavLM loads with HF's eager attention,
    which wavlm_attention then patches; the other families with `attention`."""
    from transformers import AutoConfig, AutoModel, WavLMModel

    config = AutoConfig.from_pretrained(source, cache_dir=save_path)
    family = config.model_type
    if family not in FAMILIES:
        raise ConfigError(f"{source} is a {family!r} model; this recipe drives {', '.join(FAMILIES)}: "
                          "set wavlm_source to one of those")
    if attention in wavlm_attention.TABLE_KINDS and family != "wavlm":
        raise ConfigError(f"attention='{attention}' is WavLM's gated position bias; {source} is a {family!r} "
                          "model, which runs HF's own attention: set --attention=sdpa or eager")
    for key, value in overrides.items():  # on the config object: data2vec-audio's has no apply_spec_augment field
        setattr(config, key, value)
    if not hasattr(config, "mask_feature_min_masks"):
        # WavLMConfig lacks it (transformers 5.24) although HF's WavLM reads it as soon as
        # mask_feature_prob > 0: wav2vec 2.0's default (0) makes feature masking work.
        config.mask_feature_min_masks = 0
    if family == "wavlm":
        model = WavLMModel.from_pretrained(source, config=config, cache_dir=save_path)
    else:
        model = AutoModel.from_pretrained(source, config=config, cache_dir=save_path, attn_implementation=attention)
    for key, value in overrides.items():
        live = getattr(model.config, key)
        if live != value:
            raise RuntimeError(f"{family} config {key} is {live} after loading, expected {value}")
    return model


def freeze_parts(model, freeze):
    """Freeze the CNN (`cnn`: HF's own freezing, no backward through it) or the whole
    model (`all`); and take `masked_spec_embed` out of training when SpecAugment never
    masks time: it would get no gradient, and DDP without find_unused_parameters
    dies on it even with layerdrop 0."""
    if freeze in ("cnn", "all"):
        model.feature_extractor._freeze_parameters()
    if freeze == "all":
        model.requires_grad_(False)
    embed = getattr(model, "masked_spec_embed", None)
    config = model.config
    if embed is not None and not (config.apply_spec_augment and config.mask_time_prob > 0):
        embed.requires_grad_(False)
