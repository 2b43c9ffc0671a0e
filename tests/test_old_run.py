"""A run folder saved by the code of 2026-11-30 (before the encoder and the Brain were
split into modules; tests/data/run_2026-11-30: one epoch of a tiny WavLM on 40 demo
utterances) still transcribes and exports with today's code."""

from pathlib import Path

import pytest
import torch

from wavlm_ddp.export_hf import export
from wavlm_ddp.inference import ExportedModel, TrainedModel
from wavlm_ddp.transcribe import main as transcribe

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("tests/data/run_2026-11-30")  # its YAML names its paths relative to the project root
DEMO = ROOT / "recipes" / "demo_data"


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_a_run_folder_of_the_day_before_transcribes_and_exports_to_the_same_logits(at_root, tmp_path):
    audio = DEMO / "audio" / "test-0000.ogg"
    rows, failed = transcribe([str(RUN), str(audio)])
    assert not failed and [key for key, _ in rows] == [str(audio)]
    trained = TrainedModel(RUN)
    assert type(trained.wavlm).__name__ == "SpeechEncoder" and trained.checkpoint is not None
    exported = ExportedModel(export(RUN, tmp_path / "hf"))
    signal = trained.load(audio)[None]
    torch.testing.assert_close(exported.logits(signal, torch.ones(1)), trained.logits(signal, torch.ones(1)),
                               atol=2e-3, rtol=1e-3)
    assert exported.transcribe_batch([signal[0]]) == trained.transcribe_batch([signal[0]])
