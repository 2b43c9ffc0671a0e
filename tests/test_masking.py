"""SpecAugment as the model really applies it at each recipe's settings, measured.

HF draws the number of masks as fairseq does, `int(prob x length / mask_length + U[0, 1))`
spans at distinct random starts (overlaps allowed), so `mask_time_prob: 0.5` covers about
40 % of the frames, not 50 % (and 0.065 about 6 %). Here the masks of each family YAML are
measured on the encoder (wavlm_wrapper.SpeechEncoder with the YAML's keys, at the real
hidden size) over utterances of LibriSpeech's training lengths, and compared with the
share that fairseq's procedure gives for the same lengths, computed exactly."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from helpers import save_tiny_wavlm
from wavlm_ddp.encoder.model import SpeechEncoder

ROOT = Path(__file__).resolve().parents[1]
FAMILY_YAMLS = ["wavlm_large_ctc.yaml", "wav2vec2_large_ctc.yaml", "hubert_large_ctc.yaml", "wavlm_base_plus_ctc.yaml"]
MASK_KEYS = ("apply_spec_augment", "mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length")
SENTINEL = 1.0e4  # masked_spec_embed set to this: a frame that holds it was masked in time
TIME_MIN_MASKS = 2  # HF's mask_time_min_masks and fairseq's min_masks for time, both defaults
# LibriSpeech train-clean-100 lies between about 1.4 and 24.5 s (mean 12.7 s); 96 utterances
# spread over 2-20 s, in batches of 8 (padding included, as training sees them).
SECONDS = np.linspace(2.0, 20.0, 96)


def yaml_masking(name):
    """The SpecAugment keys of a recipe's encoder (its `wavlm:` entry)."""
    hparams = load_hyperpyyaml((ROOT / "hparams" / name).read_text(), overrides={"data_folder": "unused"})
    return {key: hparams["wavlm"].keywords[key] for key in MASK_KEYS}


def fairseq_expected_share(length, prob, span, min_masks):
    """The expected share of `length` positions that fairseq's compute_mask_indices masks
    (static spans, overlaps allowed): n = int(prob x length / span + U[0, 1)), at least
    min_masks, starts drawn without replacement among length - span positions. A position
    stays unmasked when no start lies in the span positions before it: hypergeometric."""
    x = prob * length / span
    low, frac = math.floor(x), x - math.floor(x)
    starts = length - span
    share = 0.0
    for n, weight in ((max(min_masks, low), 1 - frac), (max(min_masks, low + 1), frac)):
        n = min(n, starts - 1)
        if weight == 0 or n == 0:
            continue
        unmasked = 0.0
        for t in range(length):
            covering = min(t, starts - 1) - max(0, t - span + 1) + 1  # the starts whose span holds t
            unmasked += choose_ratio(starts, covering, n)
        share += weight * (1 - unmasked / length)
    return share


def choose_ratio(total, excluded, n):
    """C(total - excluded, n) / C(total, n): n draws without replacement miss `excluded` items."""
    if total - excluded < n:
        return 0.0
    return math.exp(math.lgamma(total - excluded + 1) - math.lgamma(total - excluded - n + 1)
                    - math.lgamma(total + 1) + math.lgamma(total - n + 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 1-layer WavLM at each hidden size the family YAMLs train (large 1024, base 768)."""
    folder = tmp_path_factory.mktemp("masking")
    return {size: save_tiny_wavlm(folder / str(size), hidden_size=size, num_hidden_layers=1, num_attention_heads=16,
                                  intermediate_size=64) for size in (1024, 768)}


def measure(model_dir, masking):
    """(share of frames masked in time, share of channels masked) over SECONDS, and the
    utterances' frame counts, from the encoder's SpecAugment in training mode."""
    np.random.seed(0)  # HF draws the masks with numpy
    torch.manual_seed(0)
    encoder = SpeechEncoder(str(model_dir), layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                            **masking).train()
    encoder.model.masked_spec_embed.data.fill_(SENTINEL)
    encoder._run_encoder = lambda hidden, frame_mask, step: (hidden, frame_mask)  # the masked input of layer 1
    masked_frames = frames_total = masked_channels = channels_total = 0
    lengths = []
    for start in range(0, len(SECONDS), 8):
        samples = (SECONDS[start:start + 8] * 16000).astype(int)
        wav = torch.randn(len(samples), int(samples.max()))
        with torch.no_grad():
            hidden, frame_mask = encoder(wav, torch.tensor(samples / samples.max(), dtype=torch.float32))
        for row, valid in zip(hidden, frame_mask):
            real = row[valid]  # the utterance's own frames
            zero_channels = (real == 0).all(dim=0)
            time_masked = (real[:, ~zero_channels] == SENTINEL).all(dim=1)
            masked_frames += int(time_masked.sum())
            frames_total += len(real)
            masked_channels += int(zero_channels.sum())
            channels_total += real.shape[1]
            lengths.append(len(real))
    return masked_frames / frames_total, masked_channels / channels_total, lengths


@pytest.mark.parametrize("name", FAMILY_YAMLS)
def test_the_masks_cover_the_share_of_frames_and_channels_that_fairseqs_procedure_gives(models, name):
    masking = yaml_masking(name)
    size = 768 if "base" in name else 1024
    frames, channels, lengths = measure(models[size], masking)
    expected_frames = sum(fairseq_expected_share(t, masking["mask_time_prob"], masking["mask_time_length"],
                                                 TIME_MIN_MASKS) * t for t in lengths) / sum(lengths)
    expected_channels = fairseq_expected_share(size, masking["mask_feature_prob"], masking["mask_feature_length"], 0)
    assert frames == pytest.approx(expected_frames, abs=0.02), (frames, expected_frames)
    assert channels == pytest.approx(expected_channels, abs=0.02), (channels, expected_channels)


def test_a_mask_probability_of_one_half_masks_about_forty_percent_not_half():
    """The misreading this test exists for: the probability is spans x length / frames
    before overlaps, so 0.5 masks 1 - e^-0.5 (39 %) of a long utterance, and 0.065 about 6 %."""
    assert fairseq_expected_share(600, 0.5, 10, 2) == pytest.approx(1 - math.exp(-0.5), abs=0.015)
    assert fairseq_expected_share(600, 0.065, 10, 2) == pytest.approx(0.063, abs=0.005)
    assert fairseq_expected_share(1024, 0.5, 64, 0) == pytest.approx(0.39, abs=0.02)
