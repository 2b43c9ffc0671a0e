"""The large recipe (hparams/wavlm_large_ctc.yaml), as a GPU user starts it, on a
small LibriSpeech-shaped tree the test makes (FLAC + *.trans.txt) and a tiny
wavlm-large-like checkpoint: the README's CPU smoke-test line through launch_ddp.sh
on 2 gloo processes, data preparation included."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch

from wavlm_ddp.data.audio import load_audio
from helpers import free_port, save_tiny_wavlm

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"
# The README's smoke-test settings for a CPU (everything else is the large recipe's).
SMOKE = ["--precision=fp32", "--compile_layers=False", "--compile_cnn=False", "--global_batch_seconds=60",
         "--dynamic_batch_sampler={max_batch_length: 30}", "--global_batch_tolerance=0.5",
         "--debug", "--debug_batches=2", "--debug_epochs=1"]


def librispeech_tree(root, counts):
    """<root>/LibriSpeech/<split>/<speaker>/<chapter>/<id>.flac and <speaker>-<chapter>.trans.txt,
    16 kHz FLAC made from the demo corpus; the first training utterance is 25 s long
    (the demo utterances joined), over the recipe's max_duration of 20 s."""
    rows = list(csv.DictReader(open(DEMO / "train.csv", newline="")))
    data = root / "LibriSpeech"
    taken = 0
    for speaker, (split, count) in enumerate(counts.items(), start=19):
        chapter = data / split / str(speaker) / "198"
        chapter.mkdir(parents=True)
        lines = []
        for i in range(count):
            utt_id = f"{speaker}-198-{i:04d}"
            if split == "train-clean-100" and i == 0:
                parts = [load_audio(DEMO / r["wav"].replace("$data_root/", ""), 16000) for r in rows[:14]]
                audio, text = torch.cat(parts)[: 25 * 16000], " ".join(r["wrd"] for r in rows[:14])
            else:
                row = rows[taken]
                taken += 1
                audio, text = load_audio(DEMO / row["wav"].replace("$data_root/", ""), 16000), row["wrd"]
            sf.write(chapter / f"{utt_id}.flac", audio.numpy(), 16000)
            lines.append(f"{utt_id} {text}")
        (chapter / f"{speaker}-198.trans.txt").write_text("\n".join(lines) + "\n")
    return data


def test_the_large_recipe_trains_on_two_gloo_ranks_with_the_readmes_smoke_settings(tmp_path):
    data = librispeech_tree(tmp_path, {"train-clean-100": 80, "dev-other": 8, "test-clean": 8, "test-other": 6})
    source = save_tiny_wavlm(tmp_path / "wavlm-large-like", hidden_size=64, num_attention_heads=4,
                             intermediate_size=128)  # 64 channels: room for the recipe's 64-wide feature masks
    out = tmp_path / "run"
    command = [str(ROOT / "launch_ddp.sh"), "hparams/wavlm_large_ctc.yaml", f"--data_folder={data}",
               f"--wavlm_source={source}", f"--output_folder={out}", *SMOKE, "--noprogressbar",
               "--train_dataloader_opts={num_workers: 0}", "--valid_dataloader_opts={num_workers: 0}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MASTER_PORT": str(free_port()), "PYTHON": sys.executable})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "checks passed for world size 2" in log and "rank 1 of world size 2 (gloo)" in log
    assert "max_duration=20 s: left out 1 of 80 training utterances" in log
    assert "wavlm from " + str(source) + ": 4 layers, hidden 64, layerdrop=0.1 (synced)" in log
    assert "epoch 1: train loss" in log
    for name, count in (("test", 8), ("test-other", 6)):  # both LibriSpeech test sets, each its lines and file
        assert re.search(rf"^{name} WER [\d.]+ %, CER [\d.]+ %, greedy$", log, re.M), log[-3000:]
        assert re.search(rf"^{name} WER [\d.]+ %, CER [\d.]+ %, beam search 1500 \+ LM lm_3gram.arpa .*"
                         rf"% of the {name} words are not in its lexicon", log, re.M), log[-3000:]
        wer_file = out / ("wer_test.txt" if name == "test" else f"wer_{name}.txt")
        assert len(re.findall(r"^[\w-]+, %WER", wer_file.read_text(), re.M)) == count
    with open(out / "save" / "train.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 80  # prepared from the tree; the filter acts on loading
    assert (out / "save" / "test-other.csv").exists()
