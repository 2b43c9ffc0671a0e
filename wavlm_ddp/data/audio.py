"""Reading audio, for training and transcription alike: any rate, any channel count,
from a file or from the bytes an HF dataset (parquet, save_to_disk) holds."""

import io
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

# What soundfile (libsndfile) reads; a folder argument of transcribe.py takes these.
AUDIO_SUFFIXES = tuple(f".{name.lower()}" for name in sf.available_formats()) + (".opus", ".oga")
# What a file that cannot be read raises: missing, not audio, truncated.
AUDIO_ERRORS = (sf.LibsndfileError, RuntimeError, OSError)


def audio_source(value):
    """What soundfile opens for an audio value: a path, or encoded bytes (HF's audio
    struct {"bytes", "path"}, whose bytes win when present; or bytes alone)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    return str(value)


def load_audio(path, sample_rate):
    """Mono float32 audio at `sample_rate` from a path or encoded bytes (audio_source):
    several channels are averaged, another rate is resampled (the manifest check
    decides whether that is allowed)."""
    audio, rate = sf.read(audio_source(path), dtype="float32", always_2d=True)
    audio = torch.from_numpy(audio).mean(dim=1)
    if rate != sample_rate:
        audio = torchaudio.functional.resample(audio, rate, sample_rate)
    return audio


def audio_files(folder):
    """The audio files under `folder` (recursively), sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def read_error(path, error):
    """Why `path` could not be read, in a few words."""
    if not Path(path).exists():
        return "no such file"
    if Path(path).is_dir():
        return "a folder"
    return f"not readable as audio ({str(error).splitlines()[0][:200]})"
