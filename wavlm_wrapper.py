"""The model of the recipe: the speech encoder that the YAML builds
(`wavlm: !name:wavlm_wrapper.SpeechEncoder`) and fine-tunes with a CTC head.

`SpeechEncoder` runs HF's WavLM (or wav2vec 2.0 / HuBERT / data2vec-audio) with the
YAML's overrides, and owns the loop over the encoder layers so that LayerDrop drops
the same layers on every DDP rank. Its parts, each in one module of wavlm_ddp.encoder:

    model.py        SpeechEncoder: CNN, projection, positions, the layer loop
    loading.py      hub id or local folder, the YAML's config overrides, freezing
    layerdrop.py    LayerDrop: the draw, shared by every rank, and its cross-rank check
    attention.py    WavLM's attention with its gated position bias on SDPA or FlexAttention
    compilation.py  torch.compile of each layer and of the CNN

Every argument is a YAML key, described in hparams/wavlm_large_ctc.yaml and
docs/configuration.md.
"""

from wavlm_ddp.encoder import SpeechEncoder, normalize_waveforms

# The name that run folders saved before the family was supported give the encoder.
WavLM = SpeechEncoder

__all__ = ["SpeechEncoder", "WavLM", "normalize_waveforms"]
