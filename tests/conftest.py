"""Shared fixtures: a tiny WavLM saved locally with save_pretrained (no download)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY_CONFIG, save_tiny_wavlm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_wavlm_dir(tmp_path_factory):
    """A randomly initialised tiny WavLM in the save_pretrained layout."""
    return save_tiny_wavlm(tmp_path_factory.mktemp("models") / "tiny-wavlm")


@pytest.fixture(scope="session")
def tiny_config():
    return dict(TINY_CONFIG)
