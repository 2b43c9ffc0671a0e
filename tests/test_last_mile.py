"""From a finished run to transcripts, an HF export, curves and TensorBoard."""

import copy
import csv
import gzip
import hashlib
import sys
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.utils.metric_stats import ErrorRateStats
from transformers import Wav2Vec2Processor, Wav2Vec2ProcessorWithLM, WavLMForCTC

from wavlm_ddp import tune_decoding
import yaml
from wavlm_ddp.export_hf import export
from wavlm_ddp.decoding.ngram import build_lm
from wavlm_ddp.decoding.search import arpa_words
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp import inference
from wavlm_ddp.inference import ExportedModel, TrainedModel
from wavlm_ddp.transcribe import main as transcribe_main
from helpers import run_train_captured

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"


TRAIN_ROWS = 60  # of the demo's 800: every character of the corpus (the tokenizer's), 112 s of audio


def emit_text(run, rows=20):
    """Give the run's model a CTC head that emits text, in every checkpoint of `run`.
    A demo run of a few optimizer steps learns the token prior only: blank wins every
    frame, its transcripts are empty, and empty transcripts are equal whatever computed
    them. This head projects each frame's encoder output, centred and scaled by its
    statistics over the first `rows` training utterances, on random directions, with
    the blank's bias set to win half of those frames: every transcript then spells
    tokens that follow its frames' features."""
    model = TrainedModel(run)
    utterances = list(csv.DictReader(open(DEMO / "train.csv", newline="")))[:rows]
    with torch.no_grad():
        feats = torch.cat([model.wavlm(model.load(DEMO / r["wav"].replace("$data_root/", ""))[None], torch.ones(1))[0]
                           for r in utterances])
    mean, std = feats.mean(0), feats.std(0)
    weight = torch.randn(model.head.w.weight.shape, generator=torch.Generator().manual_seed(0)) / std
    bias = -weight @ mean
    logits = feats @ weight.T + bias
    bias[model.blank_index] += (logits.max(-1).values - logits[:, model.blank_index]).median()
    for paramfile in Path(run, "save").glob("CKPT+*/ctc_head.ckpt"):
        state = torch.load(paramfile)
        state["w.weight"], state["w.bias"] = weight, bias
        torch.save(state, paramfile)


def speaks(transcripts):
    """Whether most transcripts hold words and they differ between utterances."""
    transcripts = list(transcripts)
    return sum(1 for text in transcripts if text.split()) > len(transcripts) // 2 and len(set(transcripts)) > 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The demo trained for 2 epochs on one process (12 s per optimizer step, no accumulation)
    on the first TRAIN_ROWS training utterances, with TensorBoard on; then given a head
    that emits text (emit_text) and evaluated on the test set again (--test_only), so
    that the transcripts compared below are words, not empty strings. Its LM is fetched
    from a file:// URL (lm_url, lm_sha256: as the official 4-gram would be), a gzipped
    3-gram of the training slice: (output folder, the training's log followed by the
    evaluation's)."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    lines = (DEMO / "train.csv").read_text().splitlines()
    (tmp / "train.csv").write_text("\n".join(lines[: TRAIN_ROWS + 1]) + "\n")
    build_lm([str(tmp / "train.csv")], str(tmp / "lm.arpa"), order=3)
    (tmp / "lm.arpa.gz").write_bytes(gzip.compress((tmp / "lm.arpa").read_bytes()))
    command = [f"--output_folder={out}", f"--wavlm_source={tmp / 'wavlm-small'}",
               f"--train_csv={tmp / 'train.csv'}", "--number_of_epochs=2", "--global_batch_seconds=12",
               "--global_batch_tolerance=0.5",  # a small sample fills batches less well
               f"--lm_url={(tmp / 'lm.arpa.gz').as_uri()}",
               f"--lm_sha256={hashlib.sha256((tmp / 'lm.arpa.gz').read_bytes()).hexdigest()}",
               "--use_tensorboard=True", "--noprogressbar",
               "--hang_timeout_minutes=10"]  # in this process: a hang ends the pytest worker with the stacks
    log = ""
    for extra in ([], ["--test_only"]):  # in this process (helpers.run_train_captured): two process starts saved
        code, stdout, stderr = run_train_captured(*command, *extra)
        assert code == 0, (stdout + stderr)[-3000:]
        log += stdout + stderr
        if not extra:
            emit_text(out)
    return out, log


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


def manifest_wer(hyps_csv):
    with open(hyps_csv, newline="") as f:
        hyps = {row["ID"]: row["transcript"] for row in csv.DictReader(f)}
    assert speaks(hyps.values())
    with open(DEMO / "test.csv", newline="") as f:
        refs = {row["ID"]: row["wrd"] for row in csv.DictReader(f)}
    assert hyps.keys() == refs.keys()
    stats = ErrorRateStats()
    stats.append(list(refs), [hyps[i].split() for i in refs], [refs[i].split() for i in refs])
    return stats.summarize("error_rate")


def test_the_test_evaluation_prints_greedy_and_beam_search_with_lm_wers_oov_and_the_decoding_time(finished_run):
    log = finished_run[1]
    assert re.search(r"^test WER [\d.]+ %, CER [\d.]+ %, greedy$", log, re.M), log[-2000:]
    beam = re.search(r"^test WER [\d.]+ %, CER [\d.]+ %, beam search 50 \+ LM lm_3gram.arpa \(lm_weight 2, "
                     r"word_score 0; ([\d.]+) % of the test words are not in its lexicon\): decoding [\d.]+ s for 94 "
                     r"s of audio \(real-time factor [\d.]+\)$", log, re.M)
    assert beam, log[-2000:]
    arpa = finished_run[0] / "save" / "lm_3gram.arpa"
    assert arpa.read_bytes() == (finished_run[0].parent / "lm.arpa").read_bytes()  # fetched from lm_url, unpacked
    assert f"into {arpa} (SHA-256 of the download " in log
    # The share printed is the test transcripts' words that the LM (the lexicon's source) lacks.
    vocabulary = set(arpa_words(arpa))
    words = [w for row in csv.DictReader(open(DEMO / "test.csv", newline="")) for w in row["wrd"].split()]
    assert float(beam.group(1)) == pytest.approx(round(100 * sum(w not in vocabulary for w in words) / len(words), 2))


@pytest.mark.parametrize("beam", [False, True], ids=["greedy", "beam-lm"])
def test_transcribing_the_test_manifest_reproduces_the_runs_test_wer(finished_run, tmp_path, beam):
    out_csv = tmp_path / "hyps.csv"
    transcribe_main([str(finished_run[0]), "--csv", str(DEMO / "test.csv"), "--data_root", str(DEMO),
                     "--out", str(out_csv), "--batch_seconds", "20", *(["--beam"] if beam else [])])
    lines = re.findall(r"^test WER ([\d.]+) %, CER [\d.]+ %, (greedy|beam)", finished_run[1], re.M)
    run_wer = float(dict((kind, wer) for wer, kind in lines)["beam" if beam else "greedy"])
    assert manifest_wer(out_csv) == pytest.approx(run_wer, abs=0.01)
    if beam:  # wer_test.txt holds the best decoding's details
        assert float((finished_run[0] / "wer_test.txt").read_text().split()[1]) == pytest.approx(run_wer, abs=0.01)


def concatenated(trained, split, count):
    rows = list(csv.DictReader(open(DEMO / f"{split}.csv", newline="")))[:count]
    return torch.cat([trained.load(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]), rows


def test_a_long_file_read_in_overlapping_windows_gives_exactly_the_frames_of_the_whole_file(trained, tmp_path):
    """45 s of demo utterances, windows of 10 s with 3 s of context on each side, against
    one pass over the whole file. The model here is one whose frames depend on nearby
    samples only (the run's CNN, 400 samples wide, and a linear head: no transformer
    layer, no whole-file normalisation), so the windowing must reproduce every frame to
    float tolerance, whatever the model learned: every frame kept exactly once, from a
    window that saw all the samples it needs."""
    local = copy.copy(trained)
    cnn = trained.wavlm.model.feature_extractor
    torch.manual_seed(0)
    head = torch.nn.Linear(cnn.conv_layers[-1].conv.out_channels, trained.tokenizer.vocab_size())
    local.logits = lambda wavs, wav_lens: head(cnn(wavs).transpose(1, 2))
    audio, _ = concatenated(trained, "train", 24)
    whole = local.file_log_probs([audio], batch_seconds=100, chunk_seconds=0)[0]
    windows = local.file_log_probs([audio], batch_seconds=30, chunk_seconds=10, context_seconds=3)[0]
    assert len(local.windows(audio, 10, 3)) == 5
    assert windows.shape == whole.shape  # every frame exactly once, none lost at a window edge
    torch.testing.assert_close(windows, whole, rtol=1e-5, atol=1e-5)
    long_file = tmp_path / "long.wav"
    sf.write(long_file, audio.numpy(), 16000, subtype="FLOAT")  # the same samples back
    texts, failed = local.transcribe_files([long_file], 30, 10, 3)
    assert failed == {} and texts[long_file] == local.decode(windows[None], torch.ones(1))[0]
    texts, failed = trained.transcribe_files([long_file], batch_seconds=2, chunk_seconds=0)
    assert texts == {} and re.match(r"\d+ s long, more than --batch_seconds=2: set --chunk_seconds", failed[long_file])


def test_unreadable_files_are_named_on_stderr_and_every_other_file_is_transcribed(finished_run, tmp_path):
    """A folder and a list file as inputs; a missing file, a file that is no audio and
    a file too short for the CNN among good ones: the good ones are transcribed, each
    bad one gets one line, and the exit status is 1."""
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:3]
    good = [str(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.ogg").write_bytes(Path(good[0]).read_bytes())
    (folder / "not_audio.wav").write_text("this is no audio\n")
    (folder / "notes.txt").write_text("not an audio suffix: ignored\n")
    sf.write(folder / "tiny.wav", np.zeros(100, dtype=np.float32), 16000)
    listing = tmp_path / "more.txt"
    listing.write_text(f"{good[1]}\n# a comment\n{tmp_path / 'missing.wav'}\n\n{good[2]}\n")
    result = subprocess.run([sys.executable, "-m", "wavlm_ddp.transcribe", str(finished_run[0]), str(folder),
                             "--list", str(listing)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    printed = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(printed) == sorted([str(folder / "a.ogg"), good[1], good[2]])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {folder / 'not_audio.wav'}: not readable as audio " + errors[0].split("not readable as audio ")[1],
        f"error: {folder / 'tiny.wav'}: too short: 100 samples, the CNN needs 400",
        f"error: {tmp_path / 'missing.wav'}: no such file",
    ]
    assert "Traceback" not in result.stderr and "3 of 6 file(s) could not be transcribed" in result.stderr


def test_a_two_minute_file_is_transcribed_with_beam_search_in_windows(trained, finished_run, tmp_path, monkeypatch):
    """Read in windows (too long for one batch of --batch_seconds), joined, and decoded
    once by the beam search over the whole file's frames: its words are whole lexicon
    words, whatever falls on a window edge. (That the joined windows give exactly the
    whole file's frames: the test above.)"""
    audio, rows = concatenated(trained, "train", 66)
    assert len(audio) / 16000 >= 120
    long_file = tmp_path / "two_minutes.wav"
    sf.write(long_file, audio.numpy(), 16000)
    searched, decode = [], inference.Transcriber.decode

    def recorded(self, log_probs, wav_lens):  # the search's input, then the search
        searched.append(log_probs.shape)
        return decode(self, log_probs, wav_lens)

    monkeypatch.setattr(inference.Transcriber, "decode", recorded)
    [(name, text)], failed = transcribe_main([str(finished_run[0]), str(long_file), "--beam", "--batch_seconds",
                                              "30"])
    assert failed == {}
    assert [tuple(shape[:2]) for shape in searched] == [(1, trained.frame_count(torch.tensor([len(audio)])).item())]
    vocabulary = {w for r in csv.DictReader(open(DEMO / "train.csv", newline="")) for w in r["wrd"].split()}
    assert name == str(long_file) and text.split() and set(text.split()) <= vocabulary  # lexicon words only


def test_tuning_writes_the_best_lm_weight_and_word_score_that_transcribe_then_uses(finished_run, trained, tmp_path):
    run = finished_run[0]
    try:
        lm_weight, word_score = tune_decoding.main([str(run)])
        tuned = yaml.safe_load((run / "decoding.yaml").read_text())
        assert (tuned["lm_weight"], tuned["word_score"]) == (lm_weight, word_score)
        assert len(tuned["grid"]) == 5 * 4 and tuned["valid_WER"] == min(g["valid_WER"] for g in tuned["grid"])
        assert len({g["valid_WER"] for g in tuned["grid"]}) > 1  # the weights change the transcripts
        settings = TrainedModel(run).use_search()
        assert (settings["lm_weight"], settings["word_score"]) == (lm_weight, word_score)
        with pytest.raises(ConfigError, match="exists \\(an earlier tuning\\): pass --overwrite"):
            tune_decoding.main([str(run)])
    finally:
        (run / "decoding.yaml").unlink(missing_ok=True)


def test_stereo_and_other_rates_are_loaded_like_training_audio(trained, tmp_path):
    row = next(csv.DictReader(open(DEMO / "test.csv", newline="")))
    mono = trained.load(DEMO / row["wav"].replace("$data_root/", ""))
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([mono.numpy()] * 2, axis=1), 16000)
    result, failed = trained.transcribe_files([stereo, DEMO / row["wav"].replace("$data_root/", "")])
    assert failed == {} and len(result) == 2 and len(set(result.values())) == 1 and list(result.values())[0]


def test_a_run_trained_with_cuda_graphs_is_read_without_them(finished_run, trained, tmp_path):
    """CUDA graphs serve training steps of few shapes; files of any length would each record
    their own. A run whose YAML has them on is read with them off (on the CPU, where the
    YAML's own setting would be refused for want of compiled layers)."""
    text = (finished_run[0] / "hyperparams.yaml").read_text()
    graphed, count = re.subn(r"^( *)cuda_graphs: (False|false)", r"\1cuda_graphs: True", text, flags=re.M)
    assert count == 2  # the top-level key and the encoder's, resolved
    (tmp_path / "hyperparams.yaml").write_text(graphed)
    model = TrainedModel(tmp_path)
    assert model.wavlm.cuda_graphs is False and model.checkpoint.path == trained.checkpoint.path
    row = next(csv.DictReader(open(DEMO / "test.csv", newline="")))
    wav = DEMO / row["wav"].replace("$data_root/", "")
    assert model.transcribe_files([wav]) == trained.transcribe_files([wav])


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
        assert ours_text and processor.batch_decode(theirs.argmax(-1))[0].split() == ours_text.split()  # same words
    with pytest.raises(FileExistsError, match="not empty"):
        export(finished_run[0], export_dir)


def test_the_export_carries_the_lm_and_its_processor_gives_the_recipes_beam_search_transcripts(
        finished_run, tmp_path):
    """pyctcdecode (HF's Wav2Vec2ProcessorWithLM) must hold the run's LM, its words and its
    weights (flashlight's lm_weight on log10 is alpha = lm_weight / ln 10), and its labels
    must map the recipe's tokens: on emissions that spell test sentences, with one letter
    made likelier to be wrong, it gives the sentence as the recipe's own search does. (On
    a weak model's real logits the two searches may differ: they prune differently.)
    `transcribe.py exported/ --beam`, the recipe's own search on the export, gives exactly
    the run's transcripts."""
    from test_decoding import emissions

    trained = TrainedModel(finished_run[0])
    search = trained.use_search()
    export_dir = export(finished_run[0], tmp_path / "hf")
    processor = Wav2Vec2ProcessorWithLM.from_pretrained(export_dir)
    language_model = processor.decoder._language_model
    assert language_model.alpha == pytest.approx(search["lm_weight"] / np.log(10))
    assert language_model.beta == pytest.approx(search["word_score"])
    assert language_model._unigram_set == set(trained.decoder.lexicon)
    tokenizer = trained.tokenizer
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:10]
    for row in rows:
        pieces = tokenizer.encode_as_pieces(row["wrd"])
        letter = next(i for i, p in enumerate(pieces) if p.isalpha())
        wrong = next(piece for piece in map(tokenizer.id_to_piece, range(1, tokenizer.get_piece_size()))
                     if piece.isalpha() and piece != pieces[letter])
        frames = emissions(tokenizer, pieces, confusion={letter: wrong})
        assert trained.decode(frames, torch.ones(1)) == [row["wrd"]]
        assert processor.batch_decode(frames.numpy()).text == [row["wrd"]]
    paths = [str(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    ours = [trained.transcribe_batch([trained.load(p)])[0] for p in paths]
    exported, _ = transcribe_main([str(export_dir), *paths, "--beam"])
    assert [text for _, text in exported] == ours and speaks(ours)


def test_an_exported_folder_transcribes_like_the_run_without_running_any_yaml(trained, finished_run, tmp_path,
                                                                               monkeypatch):
    export_dir = export(finished_run[0], tmp_path / "hf")

    def no_yaml(*args, **kwargs):
        raise AssertionError("an exported folder must not run a YAML file")

    monkeypatch.setattr(inference, "load_hyperpyyaml", no_yaml)
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:6]
    paths = [str(DEMO / r["wav"].replace("$data_root/", "")) for r in rows]
    exported, _ = transcribe_main([str(export_dir), *paths])
    monkeypatch.undo()
    assert exported == list(trained.transcribe_files(paths)[0].items()) and all(text for _, text in exported)
    signal = trained.load(paths[0])
    torch.testing.assert_close(ExportedModel(export_dir).logits(signal[None], torch.ones(1)),
                               trained.logits(signal[None], torch.ones(1)), atol=2e-3, rtol=1e-3)


def test_a_folder_that_is_neither_a_run_nor_an_export_is_refused_naming_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, sentencepiece.model: give a folder "
                                                "written by export_hf.py"):
        inference.open_model(tmp_path)


def test_hfs_one_line_pipeline_decodes_an_export_with_its_lm_without_arguments(finished_run, tmp_path):
    """`pipeline("automatic-speech-recognition", model=export)`, as HF users run a model:
    it must build the LM pipeline by itself and give exactly what the export's
    Wav2Vec2ProcessorWithLM (pyctcdecode with the run's LM and weights) gives."""
    from transformers import pipeline

    export_dir = export(finished_run[0], tmp_path / "hf")
    asr = pipeline("automatic-speech-recognition", model=str(export_dir), device="cpu")
    assert asr.type == "ctc_with_lm" and asr.decoder is not None
    processor = Wav2Vec2ProcessorWithLM.from_pretrained(export_dir)
    model = WavLMForCTC.from_pretrained(export_dir).eval()
    trained = TrainedModel(finished_run[0])
    from pyctcdecode import BeamSearchDecoderCTC

    decoder = BeamSearchDecoderCTC.load_from_dir(str(export_dir))
    rows = list(csv.DictReader(open(DEMO / "test.csv", newline="")))[:5]
    for row in rows:
        signal = trained.load(DEMO / row["wav"].replace("$data_root/", "")).numpy()
        inputs = processor(signal, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            logits = model(inputs.input_values).logits
        expected = processor.batch_decode(logits.numpy()).text[0]
        assert expected and asr({"raw": signal, "sampling_rate": 16000})["text"] == expected
        assert decoder.decode_beams(logits[0].numpy())[0][0] == expected  # transformers 6: pyctcdecode alone
