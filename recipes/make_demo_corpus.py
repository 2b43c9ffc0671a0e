"""Synthesise the bundled demo corpus with eSpeak NG (run once; the result is shipped).

The corpus is real synthesised English speech: short sentences drawn from a small
grammar, spoken by several eSpeak NG voices at several speeds, stored at 8 kHz
as Ogg Vorbis (train.py resamples to 16 kHz on load) with SpeechBrain CSV manifests (train / valid / test share no
sentence). Only the maintainers need espeak-ng; users get the shipped files.

    python recipes/make_demo_corpus.py --out recipes/demo_data
"""

import argparse
import csv
import io
import random
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000  # the model's rate: what the manifests' durations describe
STORE_RATE = 8000  # stored at 8 kHz (telephone band) to fit the repository; train.py resamples
COLOURS = ["red", "green", "blue", "black", "white", "yellow", "brown", "pink"]
NOUNS = ["cat", "dog", "fish", "bird", "horse", "mouse", "snake", "goat"]
VERBS = ["sees", "likes", "finds", "jumps over", "runs to", "sits near"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m7", "en-gb-scotland+f2"]
SPEEDS = [150, 175, 200]


def all_sentences():
    """Every sentence of the grammar: '<number> <colour> <noun> <verb> the <noun>'."""
    return [
        f"{n} {c} {a} {v} the {b}"
        for n in NUMBERS
        for c in COLOURS
        for a in NOUNS
        for v in VERBS
        for b in NOUNS
        if a != b
    ]


def synthesise(text, voice, speed):
    """Speak `text` with espeak-ng and return float32 mono audio at 16 kHz."""
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE)
    audio = audio.numpy()
    voiced = np.nonzero(np.abs(audio) > 1e-3)[0]  # trim eSpeak's leading/trailing silence
    return audio[max(voiced[0] - 800, 0) : voiced[-1] + 800]


def write_split(out_dir, name, sentences, rng):
    rows = []
    for i, text in enumerate(sentences):
        voice, speed = rng.choice(VOICES), rng.choice(SPEEDS)
        audio = synthesise(text, voice, speed)
        utt_id = f"{name}-{i:04d}"
        path = out_dir / "audio" / f"{utt_id}.ogg"
        stored = torchaudio.functional.resample(torch.from_numpy(audio), SAMPLE_RATE, STORE_RATE).numpy()
        sf.write(path, stored, STORE_RATE, format="OGG", subtype="VORBIS")
        rows.append(
            {
                "ID": utt_id,
                "duration": f"{len(stored) / STORE_RATE:.3f}",
                "wav": f"$data_root/audio/{utt_id}.ogg",
                "spk_id": voice,
                "wrd": text.upper(),
            }
        )
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writeheader()
        writer.writerows(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo_data")
    parser.add_argument("--n_train", type=int, default=800)
    parser.add_argument("--n_valid", type=int, default=50)
    parser.add_argument("--n_test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    sentences = rng.sample(all_sentences(), args.n_train + args.n_valid + args.n_test)
    (args.out / "audio").mkdir(parents=True, exist_ok=True)
    splits = {
        "train": sentences[: args.n_train],
        "valid": sentences[args.n_train : args.n_train + args.n_valid],
        "test": sentences[args.n_train + args.n_valid :],
    }
    for name, split_sentences in splits.items():
        write_split(args.out, name, split_sentences, rng)


if __name__ == "__main__":
    main()
