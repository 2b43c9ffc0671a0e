"""The speech encoder the recipe fine-tunes (WavLM and its family)."""

from wavlm_ddp.encoder.model import SpeechEncoder, normalize_waveforms

__all__ = ["SpeechEncoder", "normalize_waveforms"]
