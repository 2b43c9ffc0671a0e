"""From a finished run to transcripts, an HF export, curves and TensorBoard."""

import csv
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.utils.metric_stats import ErrorRateStats
from transformers import Wav2Vec2Processor, WavLMForCTC

from export_hf import export
import transcribe
from transcribe import ExportedModel, TrainedModel, main as transcribe_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The demo trained for 2 epochs on one process, with TensorBoard on."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    result = subprocess.run(
        ["python3", str(ROOT / "train.py"), f"--output_folder={out}", f"--wavlm_source={tmp / 'wavlm-small'}",
         "--number_of_epochs=2", "--use_tensorboard=True", "--noprogressbar"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(finished_run):
    return TrainedModel(finished_run[0])


def test_epoch_line_shows_loss_wer_learning_rates_throughput_and_memory(finished_run):
    lines = [line for line in finished_run[1].splitlines() if line.startswith("epoch 2:")]
    assert lines, finished_run[1][-2000:]
    assert re.search(r"train loss [\d.]+, valid loss [\d.]+, valid CER [\d.]+ %, WER [\d.]+ %, "
                     r"lr head [\d.e+-]+, wavlm [\d.e+-]+, [\d.]+ audio-s/s, peak mem [\d.]+ GiB", lines[0])


def test_training_curves_png_is_written_each_epoch(finished_run):
    png = finished_run[0] / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0
    history = __import__("json").loads((finished_run[0] / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"train_loss", "valid_loss", "valid_WER", "lr_wavlm", "lr_head"} <= history[0].keys()


def test_tensorboard_events_are_written_when_switched_on(finished_run):
    events = list((finished_run[0] / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_transcribing_the_test_manifest_reproduces_the_runs_test_wer(finished_run, tmp_path):
    out_csv = tmp_path / "hyps.csv"
    transcribe_main([str(finished_run[0]), "--csv", str(DEMO / "test.csv"), "--data_root", str(DEMO),
                     "--out", str(out_csv), "--batch_seconds", "20"])
    with open(out_csv, newline="") as f:
        hyps = {row["ID"]: row["transcript"] for row in csv.DictReader(f)}
    with open(DEMO / "test.csv", newline="") as f:
        refs = {row["ID"]: row["wrd"] for row in csv.DictReader(f)}
    assert hyps.keys() == refs.keys() and any(hyps.values())
    stats = ErrorRateStats()
    stats.append(list(refs), [hyps[i].split() for i in refs], [refs[i].split() for i in refs])
    run_wer = float((finished_run[0] / "wer_test.txt").read_text().split()[1])
    assert stats.summarize("error_rate") == pytest.approx(run_wer, abs=0.01)


def test_long_files_are_chunked_or_refused(trained, tmp_path):
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:3]
    parts = [trained.load(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    long_file = tmp_path / "long.wav"
    sf.write(long_file, torch.cat(parts).numpy(), 16000)
    chunk_seconds = len(parts[0]) / 16000 + 0.5
    text = trained.transcribe_files([long_file], batch_seconds=30, chunk_seconds=chunk_seconds)[long_file]
    audio = trained.load(long_file)
    step = int(chunk_seconds * 16000)
    expected = " ".join(t for t in trained.transcribe_batch([audio[i:i + step] for i in range(0, len(audio), step)]) if t)
    assert text == expected and text
    with pytest.raises(ValueError, match="long.wav is .* s long.*--chunk_seconds"):
        trained.transcribe_files([long_file], batch_seconds=2, chunk_seconds=0)


def test_stereo_and_other_rates_are_loaded_like_training_audio(trained, tmp_path):
    row = next(csv.DictReader(open(DEMO / "test.csv", newline="")))
    mono = trained.load(DEMO / row["wav"].replace("$data_root/", ""))
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([mono.numpy()] * 2, axis=1), 16000)
    result = trained.transcribe_files([stereo, DEMO / row["wav"].replace("$data_root/", "")])
    assert len(set(result.values())) == 1


def test_exported_model_gives_the_recipes_logits_and_transcripts(trained, finished_run, tmp_path):
    export_dir = export(finished_run[0], tmp_path / "hf")
    model = WavLMForCTC.from_pretrained(export_dir).eval()
    processor = Wav2Vec2Processor.from_pretrained(export_dir)
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:3]
    signals = [trained.load(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    for signal in signals:
        ours = trained.logits(signal[None], torch.ones(1))
        inputs = processor(signal.numpy(), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            theirs = model(inputs.input_values).logits
        torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=1e-3)
        ours_text = trained.transcribe_batch([signal])[0]
        assert processor.batch_decode(theirs.argmax(-1))[0].split() == ours_text.split()  # the same words
    with pytest.raises(FileExistsError, match="not empty"):
        export(finished_run[0], export_dir)


def test_an_exported_folder_transcribes_like_the_run_without_running_any_yaml(trained, finished_run, tmp_path,
                                                                               monkeypatch):
    export_dir = export(finished_run[0], tmp_path / "hf")

    def no_yaml(*args, **kwargs):
        raise AssertionError("an exported folder must not run a YAML file")

    monkeypatch.setattr(transcribe, "load_hyperpyyaml", no_yaml)
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:6]
    paths = [str(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    exported = transcribe_main([str(export_dir), *paths])
    monkeypatch.undo()
    assert exported == list(trained.transcribe_files(paths).items())
    signal = trained.load(paths[0])
    torch.testing.assert_close(ExportedModel(export_dir).logits(signal[None], torch.ones(1)),
                               trained.logits(signal[None], torch.ones(1)), atol=2e-3, rtol=1e-3)


def test_a_folder_that_is_neither_a_run_nor_an_export_is_refused_naming_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, sentencepiece.model: give a folder "
                                                "written by export_hf.py"):
        transcribe.open_model(tmp_path)
