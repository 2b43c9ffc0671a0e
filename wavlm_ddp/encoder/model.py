"""HuggingFace WavLM (and its family: wav2vec 2.0 / XLS-R, HuBERT, data2vec-audio) as
a SpeechBrain module for CTC fine-tuning.

The module runs the model's own sub-modules (CNN, projection, positional conv, encoder
layers) but owns the loop over the encoder layers. Owning the loop is what lets the
recipe choose *which* layers to drop (the same ones on every DDP rank: layerdrop.py),
skip them without computing them, and compile each layer once whatever the drop
pattern (compilation.py). Loading, the YAML's overrides and freezing are in
loading.py; WavLM's attention patch in attention.py.
"""

from contextlib import nullcontext
import logging

import torch
import torch.nn.functional as F
from torch import nn

from wavlm_ddp.encoder import attention as wavlm_attention
from wavlm_ddp.encoder import compilation as encoder_compile
from wavlm_ddp.encoder.layerdrop import LayerDrop
from wavlm_ddp.encoder.loading import check_arguments, freeze_parts, load_model, make_local_checkpoint

logger = logging.getLogger(__name__)


class SpeechEncoder(nn.Module):
    """A self-supervised speech encoder of WavLM's family (chosen by the checkpoint's
    `model_type`) configured from the YAML, where each key is described
    (hparams/wavlm_large_ctc.yaml). WavLM runs the patched attention with its gated
    relative position bias; the others HF's own attention.

    Arguments
    ---------
    source : str
        HF hub id (e.g. ``microsoft/wavlm-large``) or a local ``save_pretrained`` folder.
    save_path : str or None
        Cache folder for hub downloads (``cache_dir``).
    init_config : dict or None
        When given and `source` does not exist yet, a randomly initialised model with
        this config (and `init_seed`) is saved there first (the demo model).
    layerdrop, layerdrop_mode, layerdrop_seed :
        LayerDrop probability (written into the HF config), ``synced`` or
        ``independent``, and the seed of the draws (layerdrop.LayerDrop).
    apply_spec_augment, mask_*, *_dropout :
        Written into the HF config before the model is built, verified after.
    freeze : str
        ``none``, ``cnn`` (no backward through the CNN) or ``all`` (no autograd).
    attention, flex_kernel_options, triton_block :
        ``sdpa``, ``flex``, ``triton`` or ``eager`` (wavlm_attention), FlexAttention's block
        sizes, the Triton kernel's tile side (None: gated_attention.DEFAULT_BLOCK).
    activation_checkpointing : bool
        Recompute each encoder layer in backward (non-reentrant: composes with DDP).
    compile_layers, compile_cnn, compile_backend :
        torch.compile each encoder layer, the frozen CNN, with this backend.
    cuda_graphs : bool
        Replay the compiled layers as CUDA graphs (inductor's 'reduce-overhead'; CUDA,
        layerdrop 0, padded frames, no activation checkpointing, no gradient accumulation).
    pad_frames_to : int
        Pad the frame axis to a multiple of this (masked frames, cut off at the end).
    normalize_wav : bool
        Zero-mean unit-variance normalisation of each waveform over its real samples.
    """

    def __init__(self, source, save_path=None, init_config=None, init_seed=0, layerdrop=0.0,
                 layerdrop_mode="synced", layerdrop_seed=0, apply_spec_augment=False, mask_time_prob=0.0,
                 mask_time_length=10, mask_feature_prob=0.0, mask_feature_length=10, hidden_dropout=0.1,
                 attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0, freeze="cnn",
                 attention="sdpa", flex_kernel_options=None, activation_checkpointing=False, compile_layers=False,
                 compile_cnn=False, compile_backend="inductor", pad_frames_to=1, normalize_wav=True,
                 cuda_graphs=False, triton_block=None):
        super().__init__()
        check_arguments(layerdrop, layerdrop_mode, freeze, attention, attention_dropout, compile_cnn, pad_frames_to,
                        compile_layers, cuda_graphs, compile_backend, activation_checkpointing, triton_block)
        if init_config is not None:
            make_local_checkpoint(source, init_config, init_seed)
        overrides = dict(layerdrop=layerdrop, apply_spec_augment=apply_spec_augment, mask_time_prob=mask_time_prob,
                         mask_time_length=mask_time_length, mask_feature_prob=mask_feature_prob,
                         mask_feature_length=mask_feature_length, hidden_dropout=hidden_dropout,
                         attention_dropout=attention_dropout, activation_dropout=activation_dropout,
                         feat_proj_dropout=feat_proj_dropout)
        self.model = load_model(source, save_path, overrides, attention)
        self.family = self.model.config.model_type
        self.freeze, self.attention, self.normalize_wav = freeze, attention, normalize_wav
        self.output_size = self.model.config.hidden_size
        self.num_layers = self.model.config.num_hidden_layers
        self.layer_drop = LayerDrop(self.model.config, self.num_layers, layerdrop_mode, layerdrop_seed)
        freeze_parts(self.model, freeze)
        if self.family == "wavlm":
            wavlm_attention.patch_attention(self.model.encoder.layers, attention, flex_kernel_options, triton_block)
        self.activation_checkpointing = activation_checkpointing
        self.compiled, self.pad_frames_to, self.cuda_graphs = compile_layers, pad_frames_to, cuda_graphs
        self.layers = list(self.model.encoder.layers)
        if compile_layers:
            self.layers = encoder_compile.compile_layers(self.layers, compile_backend, pad_frames_to, cuda_graphs)
        self._compiled_cnn = encoder_compile.compile_cnn(self.model.feature_extractor, compile_backend) \
            if compile_cnn else None
        logger.info(
            f"{self.family} from {source}: {self.num_layers} layers, hidden {self.output_size}, "
            f"layerdrop={self.layerdrop} ({layerdrop_mode}), freeze={freeze}, attention={attention}, "
            f"activation checkpointing={'on' if activation_checkpointing else 'off'}, "
            f"SpecAugment={'on' if self.spec_augment_on else 'off'}"
        )

    @property
    def layerdrop(self):
        """The LayerDrop probability in effect: read from the live model config."""
        return self.layer_drop.probability

    @property
    def spec_augment_on(self):
        config = self.model.config
        return config.apply_spec_augment and (config.mask_time_prob > 0 or config.mask_feature_prob > 0)

    def unused_parameters_expected(self):
        """True when some trainable parameter may get no gradient in a training step."""
        return self.layerdrop > 0.0 and self.freeze != "all"

    def frame_lengths(self, wav_lens, samples, frames):
        """Relative lengths of the encoder output: the frames each utterance really has
        (the CNN's own length formula), over `frames`. With these, CTC and the decoders
        read exactly the real frames (SpeechBrain's round(wav_lens x frames) can be one off)."""
        counts = self.model._get_feat_extract_output_lengths(torch.round(wav_lens * samples).long())
        return counts.to(torch.float32) / frames

    def forward(self, wav, wav_lens=None, step=0):
        """(batch, frames, hidden) encodings of (batch, samples) 16 kHz waveforms with
        relative lengths `wav_lens` (SpeechBrain's convention; padded frames are not
        attended to); `step`, the optimizer step, selects the LayerDrop pattern."""
        if self.cuda_graphs:
            encoder_compile.begin_graphed_step()
        with torch.no_grad() if self.freeze == "all" else nullcontext():
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
            features = cnn_features(self._compiled_cnn or model.feature_extractor, model.config, wav,
                                    None if sample_mask is None else lengths)
        frame_mask = None
        if sample_mask is not None:
            frame_mask = model._get_feature_vector_attention_mask(features.shape[1], sample_mask.long())
        projected = model.feature_projection(features)  # HuBERT returns the tensor, the others a pair
        hidden = projected[0] if isinstance(projected, tuple) else projected
        hidden = model._mask_hidden_states(hidden, attention_mask=frame_mask)
        return self._run_encoder(hidden, frame_mask, step)

    def _run_encoder(self, hidden, frame_mask, step):
        encoder = self.model.encoder
        stable = getattr(self.model.config, "do_stable_layer_norm", False)
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
        hidden = hidden + positions(encoder.pos_conv_embed, self.family, hidden, frame_mask)
        if not stable:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)

        frames = hidden.shape[1]
        hidden, frame_mask = pad_frames(hidden, frame_mask, self.pad_frames_to)
        drop = [False] * self.num_layers
        if self.training and self.layerdrop > 0.0:
            drop = self.layer_drop.draw(step)
        # The SDPA path builds the position bias here, once, so that every layer
        # (the first too) runs the same code: with compile_layers, one graph for all.
        position_bias = layer_mask = None
        if self.family == "wavlm" and self.attention != "eager":
            position_bias = wavlm_attention.position_table(encoder.layers[0].attention, hidden.shape[1],
                                                           self.attention)
        if self.family != "wavlm":
            layer_mask = hf_layer_mask(self.model.config, hidden, frame_mask)
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer, skip in zip(self.layers, drop):
            if skip:
                continue
            if self.compiled:
                encoder_compile.mark_shapes(hidden, frame_mask, position_bias, static_length=self.pad_frames_to > 1)
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


def cnn_features(extractor, config, wav, lengths):
    """(batch, frames, channels) CNN features. A group-norm CNN (base models:
    `feat_extract_norm: group`) normalises over the whole time axis, padding
    included, so each utterance goes through it alone, on its real samples, as
    HF computes it without padding: the output does not depend on the batch."""
    group_norm = getattr(config, "feat_extract_norm", "layer") == "group"  # data2vec: layer norm only
    if not group_norm or lengths is None or bool((lengths == wav.shape[1]).all()):
        return extractor(wav).transpose(1, 2)
    parts = [extractor(wav[i : i + 1, :n]).transpose(1, 2)[0] for i, n in enumerate(lengths.tolist())]
    return nn.utils.rnn.pad_sequence(parts, batch_first=True)


def positions(pos_conv, family, hidden, frame_mask):
    """The convolutional position embedding. data2vec-audio stacks several
    convolutions, so padding leaks into real frames from the second one on:
    there each padded utterance goes through it alone (as HF without padding)."""
    if family != "data2vec-audio" or frame_mask is None or bool(frame_mask.all()):
        return pos_conv(hidden)
    out = torch.zeros_like(hidden)
    for i, n in enumerate(frame_mask.sum(dim=1).tolist()):
        out[i, :n] = pos_conv(hidden[i : i + 1, :n])[0]
    return out


def hf_layer_mask(config, hidden, frame_mask):
    """The attention mask HF's own (non-WavLM) layers take, in the format of their
    attention implementation; None without padding."""
    if frame_mask is None:
        return None
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

        return _prepare_4d_attention_mask(frame_mask, hidden.dtype)
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=frame_mask)


def pad_frames(hidden, frame_mask, multiple):
    """Pad the frame axis to a multiple of `multiple` with masked frames.

    The padded keys are masked out of attention and the padded rows cut off after
    the last layer, so the real frames are unchanged. Few distinct lengths let
    compiled layers specialise on the length (static index arithmetic), and
    aligned lengths spare SDPA a padded copy of the bias in every layer."""
    frames = hidden.shape[1]
    extra = -frames % multiple
    if extra == 0:
        return hidden, frame_mask
    if frame_mask is None:
        frame_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return F.pad(hidden, (0, 0, 0, extra)), F.pad(frame_mask, (0, extra), value=False)


def normalize_waveforms(wav, sample_mask):
    """Per-utterance zero mean, unit variance over the real samples; padding stays 0."""
    if sample_mask is None:
        return F.layer_norm(wav, wav.shape[1:])
    mask = sample_mask.to(wav.dtype)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (wav * mask).sum(dim=1, keepdim=True) / count
    var = (((wav - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
    return (wav - mean) / torch.sqrt(var + 1e-5) * mask
