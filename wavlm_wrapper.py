"""HuggingFace WavLM (and its family: wav2vec 2.0 / XLS-R, HuBERT, data2vec-audio) as
a SpeechBrain module: loading, YAML overrides, freezing, rank-synchronised LayerDrop,
a memory-efficient attention path for WavLM, padding-independent group-norm CNNs.

The module runs the model's own sub-modules (CNN, projection, positional conv, encoder
layers) but owns the loop over the encoder layers. Owning the loop is what lets the
recipe choose *which* layers to drop (the same ones on every DDP rank), skip them
without computing them, and compile each layer once whatever the drop pattern.
"""

import logging
import math
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, WavLMModel

import wavlm_attention
from preflight import LAYERDROP_MODES, ConfigError, check_choice, check_layerdrop, check_positive_int

logger = logging.getLogger(__name__)

FREEZE_CHOICES = ("none", "cnn", "all")
# HF encoders this wrapper drives (config.model_type): the same CNN + projection +
# positional conv + encoder-layer loop; only WavLM has the gated relative position bias.
FAMILIES = ("wavlm", "wav2vec2", "hubert", "data2vec-audio")
ATTENTION_CHOICES = wavlm_attention.KINDS
# Compiled layers keep one graph per padded length; the recompile limit allows
# lengths up to this many seconds (WavLM's CNN gives 50 frames per second).
MAX_COMPILED_SECONDS = 60
FRAMES_PER_SECOND = 50


def make_local_checkpoint(folder, config, seed):
    """Save a randomly initialised model built from `config` (a dict of config fields;
    `model_type` one of FAMILIES, default wavlm) to `folder` in the `save_pretrained`
    layout, unless it is already there.

    Under DDP the main process writes it while the others wait. It is written into
    a temporary folder and renamed into place, so an interrupted save never leaves a
    half-written checkpoint that a later run would take for a good one.
    """
    folder = Path(folder)
    distributed = torch.distributed.is_initialized()
    if not (folder / "config.json").exists() and (not distributed or torch.distributed.get_rank() == 0):
        folder.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        fields = dict(config)
        model = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type", "wavlm"), **fields))
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        model.save_pretrained(tmp)
        os.rename(tmp, folder)
    if distributed:
        torch.distributed.barrier()
    return folder


def layerdrop_schedule(step, num_layers, layerdrop, seed, rank=0):
    """The layers to drop at optimizer step `step`, as a list of bools.

    A pure function of (seed, step, rank): no global RNG, no data. The synced mode
    passes rank=0 on every rank, so every rank drops the same layers; the
    independent mode passes the real rank. Layer 0 owns the relative position bias
    and is never dropped (as in HF).
    """
    if layerdrop <= 0.0:
        return [False] * num_layers
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    draws = torch.rand(num_layers, generator=torch.Generator().manual_seed(int(state)))
    drop = (draws < layerdrop).tolist()
    drop[0] = False
    return drop


class SpeechEncoder(nn.Module):
    """A self-supervised speech encoder of WavLM's family (FAMILIES: WavLM, wav2vec 2.0 /
    XLS-R, HuBERT, data2vec-audio, chosen by the checkpoint's `model_type`) for
    fine-tuning, configured from the YAML. WavLM runs the patched SDPA attention
    with its gated relative position bias; the others HF's own attention.

    Arguments
    ---------
    source : str
        HF hub id (e.g. ``microsoft/wavlm-large``) or a local folder in the
        ``save_pretrained`` layout.
    save_path : str or None
        Cache folder for hub downloads (``cache_dir``). Offline use: a local folder
        as `source`, or ``HF_HUB_OFFLINE=1`` with a filled cache.
    init_config : dict or None
        When given and `source` is a folder that does not exist yet, a randomly
        initialised WavLM with this config is saved there first (the demo model).
    init_seed : int
        Seed of that random initialisation.
    layerdrop : float
        Probability of skipping each encoder layer (but the first) per step.
    layerdrop_mode : str
        ``synced`` (every rank drops the same layers) or ``independent``.
    layerdrop_seed : int
        Seed of the LayerDrop schedule.
    apply_spec_augment, mask_time_prob, mask_time_length, mask_feature_prob,
    mask_feature_length : HF SpecAugment settings.
    hidden_dropout, attention_dropout, activation_dropout, feat_proj_dropout : float
        Dropout probabilities written into the model config before it is built.
    freeze : str
        ``none``, ``cnn`` (CNN feature encoder frozen, no backward through it) or
        ``all`` (the whole model frozen, run without autograd).
    attention : str
        ``sdpa`` (memory-efficient, the default), ``flex`` (FlexAttention with the
        gated bias computed inside the kernel; WavLM only, no attention dropout) or
        ``eager`` (HF's own). See wavlm_attention.
    flex_kernel_options : dict or None
        FlexAttention's ``kernel_options`` (block sizes, stages); None: its defaults.
    activation_checkpointing : bool
        Recompute each encoder layer in the backward pass instead of keeping its
        activations (non-reentrant: composes with DDP and LayerDrop).
    compile_layers : bool
        ``torch.compile`` each encoder layer (the layers share one graph per padded
        length, whatever is dropped).
    compile_cnn : bool
        ``torch.compile`` the frozen CNN feature encoder (dynamic in the number of
        samples): its layer norms and GELUs fuse into the convolutions' epilogues.
    compile_backend : str
        The ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
    pad_frames_to : int
        Pad the encoder's frame axis to a multiple of this (masked frames, cut off
        again at the end): 64 gives compiled layers few lengths to specialise on.
    normalize_wav : bool
        Zero-mean unit-variance normalisation of each waveform over its real samples.
    """

    def __init__(
        self,
        source,
        save_path=None,
        init_config=None,
        init_seed=0,
        layerdrop=0.0,
        layerdrop_mode="synced",
        layerdrop_seed=0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        mask_time_length=10,
        mask_feature_prob=0.0,
        mask_feature_length=10,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        freeze="cnn",
        attention="sdpa",
        flex_kernel_options=None,
        activation_checkpointing=False,
        compile_layers=False,
        compile_cnn=False,
        compile_backend="inductor",
        pad_frames_to=1,
        normalize_wav=True,
    ):
        super().__init__()
        check_choice("layerdrop_mode", layerdrop_mode, LAYERDROP_MODES)
        check_choice("freeze", freeze, FREEZE_CHOICES)
        check_choice("attention", attention, ATTENTION_CHOICES)
        check_layerdrop(layerdrop)
        check_positive_int("pad_frames_to", pad_frames_to, 64)
        if init_config is not None:
            make_local_checkpoint(source, init_config, init_seed)
        overrides = dict(
            layerdrop=layerdrop,
            apply_spec_augment=apply_spec_augment,
            mask_time_prob=mask_time_prob,
            mask_time_length=mask_time_length,
            mask_feature_prob=mask_feature_prob,
            mask_feature_length=mask_feature_length,
            hidden_dropout=hidden_dropout,
            attention_dropout=attention_dropout,
            activation_dropout=activation_dropout,
            feat_proj_dropout=feat_proj_dropout,
        )
        config = AutoConfig.from_pretrained(source, cache_dir=save_path)
        self.family = config.model_type
        if self.family not in FAMILIES:
            raise ConfigError(f"{source} is a {self.family!r} model; this recipe drives {', '.join(FAMILIES)}: "
                              "set wavlm_source to one of those")
        if attention == "flex" and self.family != "wavlm":
            raise ConfigError(f"attention='flex' is WavLM's gated position bias; {source} is a {self.family!r} "
                              "model, which runs HF's own attention: set --attention=sdpa or eager")
        if compile_cnn and freeze == "none":
            raise ConfigError("compile_cnn compiles the frozen CNN (no backward), but freeze='none' trains it: "
                              "set --compile_cnn=False or freeze the CNN (wavlm: freeze: cnn)")
        if attention == "flex" and attention_dropout > 0:
            raise ConfigError(f"attention='flex' has no attention dropout, but attention_dropout={attention_dropout}: "
                              "set --attention_dropout=0 or --attention=sdpa")
        for key, value in overrides.items():  # on the config object: data2vec-audio's has no apply_spec_augment field
            setattr(config, key, value)
        if not hasattr(config, "mask_feature_min_masks"):
            # WavLMConfig lacks it (transformers 5.24) although HF's WavLM reads it as soon as
            # mask_feature_prob > 0: wav2vec 2.0's default (0) makes feature masking work.
            config.mask_feature_min_masks = 0
        if self.family == "wavlm":  # attention patched below (HF's WavLM has eager attention only)
            self.model = WavLMModel.from_pretrained(source, config=config, cache_dir=save_path)
        else:  # HF's own attention: SDPA or eager
            self.model = AutoModel.from_pretrained(source, config=config, cache_dir=save_path,
                                                   attn_implementation=attention)
        for key, value in overrides.items():
            live = getattr(self.model.config, key)
            if live != value:
                raise RuntimeError(f"WavLM config {key} is {live} after loading, expected {value}")
        self.layerdrop_mode = layerdrop_mode
        self.layerdrop_seed = layerdrop_seed
        self.freeze = freeze
        self.attention = attention
        self.normalize_wav = normalize_wav
        self.output_size = self.model.config.hidden_size
        self.num_layers = self.model.config.num_hidden_layers
        # Per layer: how many training steps it was dropped since the last reset.
        self.drop_counts = [0] * self.num_layers
        self.last_drop = [False] * self.num_layers
        self._last_drawn_step = None

        self._apply_freeze()
        self._disable_unused_mask_embedding()
        if self.family == "wavlm":
            wavlm_attention.patch_attention(self.model.encoder.layers, attention, flex_kernel_options)
        self.activation_checkpointing = activation_checkpointing
        self.layers = list(self.model.encoder.layers)
        self.compiled = compile_layers
        self.pad_frames_to = pad_frames_to
        if compile_layers:
            # Each layer is its own call, so skipping a layer never changes a graph; the
            # layers share their code, hence their graphs: one per padded length
            # (see _mark_shapes), which the recompile limit must allow.
            limit = math.ceil(MAX_COMPILED_SECONDS * FRAMES_PER_SECOND / max(pad_frames_to, 64)) + 2
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            self.layers = [torch.compile(layer, backend=compile_backend) for layer in self.layers]
        # A compiled function, not a module attribute: a registered copy of the CNN would
        # add its parameters to the state dict a second time (checkpoints would change).
        self._compiled_cnn = None
        if compile_cnn:
            self._compiled_cnn = torch.compile(self.model.feature_extractor.forward, backend=compile_backend,
                                               dynamic=True)
        logger.info(
            f"{self.family} from {source}: {self.num_layers} layers, hidden {self.output_size}, "
            f"layerdrop={self.model.config.layerdrop} ({layerdrop_mode}), freeze={freeze}, "
            f"attention={attention}, activation checkpointing={'on' if activation_checkpointing else 'off'}, "
            f"SpecAugment={'on' if self.spec_augment_on else 'off'}"
        )

    @property
    def layerdrop(self):
        """The LayerDrop probability in effect: read from the live model config."""
        return self.model.config.layerdrop

    @property
    def spec_augment_on(self):
        config = self.model.config
        return config.apply_spec_augment and (
            config.mask_time_prob > 0 or config.mask_feature_prob > 0
        )

    def _apply_freeze(self):
        if self.freeze in ("cnn", "all"):
            self.model.feature_extractor._freeze_parameters()  # HF's: the CNN output needs no grad either
        if self.freeze == "all":
            self.model.requires_grad_(False)

    def _disable_unused_mask_embedding(self):
        """`masked_spec_embed` only receives a gradient when HF's SpecAugment masks
        time steps. Left trainable without it, it is an unused parameter, and DDP
        without `find_unused_parameters` dies on it even with layerdrop 0."""
        embed = getattr(self.model, "masked_spec_embed", None)
        config = self.model.config
        if embed is not None and not (config.apply_spec_augment and config.mask_time_prob > 0):
            embed.requires_grad_(False)

    def unused_parameters_expected(self):
        """True when some trainable parameter may get no gradient in a training step."""
        return self.layerdrop > 0.0 and self.freeze != "all"

    def draw_layerdrop(self, step):
        """The drop pattern for optimizer step `step` (recorded once per step)."""
        rank = 0
        if self.layerdrop_mode == "independent" and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        drop = layerdrop_schedule(step, self.num_layers, self.layerdrop, self.layerdrop_seed, rank)
        if step != self._last_drawn_step:  # gradient accumulation: one count per step
            self._last_drawn_step = step
            self.drop_counts = [c + d for c, d in zip(self.drop_counts, drop)]
        self.last_drop = drop
        return drop

    def reset_drop_counts(self):
        self.drop_counts = [0] * self.num_layers
        self._last_drawn_step = None

    def frame_lengths(self, wav_lens, samples, frames):
        """Relative lengths of the encoder output: the frames each utterance really has
        (the CNN's own length formula), over `frames`. With these, CTC and the decoders
        read exactly the real frames (SpeechBrain's round(wav_lens x frames) can be one off)."""
        counts = self.model._get_feat_extract_output_lengths(torch.round(wav_lens * samples).long())
        return counts.to(torch.float32) / frames

    def forward(self, wav, wav_lens=None, step=0):
        """Encode a padded batch of waveforms.

        Arguments
        ---------
        wav : torch.Tensor
            (batch, samples) waveforms at 16 kHz.
        wav_lens : torch.Tensor or None
            Relative lengths in (0, 1], SpeechBrain's convention.
        step : int
            The optimizer step: it selects the LayerDrop pattern while training.

        Returns
        -------
        (batch, frames, hidden) encoder output; padded frames are not attended to.
        """
        grad_ctx = torch.no_grad() if self.freeze == "all" else nullcontext()
        with grad_ctx:
            return self._encode(wav, wav_lens, step)

    def _encode(self, wav, wav_lens, step):
        model = self.model
        sample_mask = None
        if wav_lens is not None:
            lengths = torch.round(wav_lens * wav.shape[1]).long()
            sample_mask = torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths[:, None]
        if self.normalize_wav:
            wav = normalize_waveforms(wav, sample_mask)

        cnn_ctx = torch.no_grad() if self.freeze != "none" else nullcontext()
        with cnn_ctx:
            features = self._cnn_features(wav, None if sample_mask is None else lengths)
        frame_mask = None
        if sample_mask is not None:
            frame_mask = model._get_feature_vector_attention_mask(features.shape[1], sample_mask.long())
        projected = model.feature_projection(features)  # HuBERT returns the tensor, the others a pair
        hidden = projected[0] if isinstance(projected, tuple) else projected
        hidden = model._mask_hidden_states(hidden, attention_mask=frame_mask)
        return self._run_encoder(hidden, frame_mask, step)

    def _cnn_features(self, wav, lengths):
        """(batch, frames, channels) CNN features. A group-norm CNN (base models:
        `feat_extract_norm: group`) normalises over the whole time axis, padding
        included, so each utterance goes through it alone, on its real samples, as
        HF computes it without padding: the output does not depend on the batch."""
        extractor = self._compiled_cnn or self.model.feature_extractor
        group_norm = getattr(self.model.config, "feat_extract_norm", "layer") == "group"  # data2vec: layer norm only
        if not group_norm or lengths is None or bool((lengths == wav.shape[1]).all()):
            return extractor(wav).transpose(1, 2)
        parts = [extractor(wav[i : i + 1, :n]).transpose(1, 2)[0] for i, n in enumerate(lengths.tolist())]
        return nn.utils.rnn.pad_sequence(parts, batch_first=True)

    def _positions(self, hidden, frame_mask):
        """The convolutional position embedding. data2vec-audio stacks several
        convolutions, so padding leaks into real frames from the second one on:
        there each padded utterance goes through it alone (as HF without padding)."""
        pos_conv = self.model.encoder.pos_conv_embed
        if self.family != "data2vec-audio" or frame_mask is None or bool(frame_mask.all()):
            return pos_conv(hidden)
        out = torch.zeros_like(hidden)
        for i, n in enumerate(frame_mask.sum(dim=1).tolist()):
            out[i, :n] = pos_conv(hidden[i : i + 1, :n])[0]
        return out

    def _layer_mask(self, hidden, frame_mask):
        """The attention mask HF's own (non-WavLM) layers take, in the format of their
        attention implementation; None without padding."""
        if frame_mask is None:
            return None
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

            return _prepare_4d_attention_mask(frame_mask, hidden.dtype)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=frame_mask)

    def _run_encoder(self, hidden, frame_mask, step):
        encoder = self.model.encoder
        stable = getattr(self.model.config, "do_stable_layer_norm", False)
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
        hidden = hidden + self._positions(hidden, frame_mask)
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)

        frames = hidden.shape[1]
        hidden, frame_mask = self._pad_frames(hidden, frame_mask)
        drop = [False] * self.num_layers
        if self.training and self.layerdrop > 0.0:
            drop = self.draw_layerdrop(step)
        # The SDPA path builds the position bias here, once, so that every layer
        # (the first too) runs the same code: with compile_layers, one graph for all.
        position_bias = layer_mask = None
        if self.family == "wavlm" and self.attention != "eager":
            position_bias = wavlm_attention.position_table(encoder.layers[0].attention, hidden.shape[1],
                                                           self.attention)
        if self.family != "wavlm":
            layer_mask = self._layer_mask(hidden, frame_mask)
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, skip in zip(self.layers, drop):
            if skip:
                continue
            if self.compiled:
                _mark_shapes(hidden, frame_mask, position_bias, static_length=self.pad_frames_to > 1)
            if self.family == "wavlm":
                kwargs = dict(attention_mask=frame_mask, position_bias=position_bias)
            else:
                kwargs = dict(attention_mask=layer_mask)
            if checkpointed:  # non-reentrant: DDP hooks and unused layers behave as without it
                out = torch.utils.checkpoint.checkpoint(layer, hidden, use_reentrant=False, **kwargs)
            else:
                out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if self.family == "wavlm":
                position_bias = out[1]
        hidden = hidden[:, :frames]
        if stable:
            hidden = encoder.layer_norm(hidden)
        return hidden

    def _pad_frames(self, hidden, frame_mask):
        """Pad the frame axis to a multiple of `pad_frames_to` with masked frames.

        The padded keys are masked out of attention and the padded rows cut off after
        the last layer, so the real frames are unchanged. Few distinct lengths let
        compiled layers specialise on the length (static index arithmetic), and
        aligned lengths spare SDPA a padded copy of the bias in every layer."""
        frames = hidden.shape[1]
        extra = -frames % self.pad_frames_to
        if extra == 0:
            return hidden, frame_mask
        if frame_mask is None:
            frame_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return F.pad(hidden, (0, 0, 0, extra)), F.pad(frame_mask, (0, extra), value=False)


def _mark_shapes(hidden, frame_mask, position_bias, static_length):
    """Tell torch.compile which sizes vary: the batch does (one graph for every
    batch size); a padded length does not (one graph per length, with static
    index arithmetic; a symbolic length made the fused bias kernels several times
    slower on an H200). Unpadded lengths (pad_frames_to 1) are left to PyTorch's
    automatic dynamic shapes: one graph per length would recompile every batch.
    Sizes of 1 are specialised by PyTorch anyway."""
    for tensor in (hidden, frame_mask):
        if tensor is not None:
            if tensor.shape[0] > 1:
                torch._dynamo.mark_dynamic(tensor, 0)
            if static_length:
                torch._dynamo.mark_static(tensor, 1)
    if position_bias is not None:
        if static_length:
            torch._dynamo.mark_static(position_bias)
        else:
            torch._dynamo.mark_static(position_bias, 0)  # the head count


def normalize_waveforms(wav, sample_mask):
    """Per-utterance zero mean, unit variance over the real samples; padding stays 0."""
    if sample_mask is None:
        return F.layer_norm(wav, wav.shape[1:])
    mask = sample_mask.to(wav.dtype)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (wav * mask).sum(dim=1, keepdim=True) / count
    var = (((wav - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
    return (wav - mean) / torch.sqrt(var + 1e-5) * mask


# The name the recipe's YAML files (and saved run folders) used before the family was supported.
WavLM = SpeechEncoder
