#!/usr/bin/env python3
"""Transcribe audio files with a finished run, on CPU or GPU.

    python transcribe.py results/demo/1986 a.wav b.flac           # prints "file<TAB>transcript"
    python transcribe.py results/demo/1986 --csv test.csv --out hyps.csv

The run's own configuration (`hyperparams.yaml`) rebuilds the model, and the
checkpoint with the best valid WER is loaded. Files are batched by length (at
most `--batch_seconds` of audio per batch). A file longer than `--chunk_seconds`
is cut into chunks of that length, transcribed chunk by chunk and joined
(`--chunk_seconds=0` refuses such files instead).
"""

import argparse
import csv
import sys
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpointer

from recipes.tokenizer import load_tokenizer
from train import load_audio


class TrainedModel:
    """The encoder, the CTC head and the tokenizer of a finished run."""

    def __init__(self, output_folder, device="cpu"):
        output_folder = Path(output_folder)
        config = output_folder / "hyperparams.yaml"
        if not config.exists():
            raise FileNotFoundError(f"{config} not found: give the output_folder of a training run")
        with open(config) as f:
            self.hparams = load_hyperpyyaml(f)
        save_folder = Path(self.hparams["save_folder"])
        if not save_folder.is_absolute() and not save_folder.exists():
            save_folder = output_folder / "save"  # a run folder that was moved
        self.tokenizer_path = save_folder / "tokenizer.model"
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.wavlm = self.hparams["wavlm"]()
        self.head = self.hparams["ctc_head"](input_size=self.wavlm.output_size,
                                             n_neurons=self.tokenizer.vocab_size())
        checkpointer = Checkpointer(save_folder, recoverables={"wavlm": self.wavlm, "ctc_head": self.head})
        self.checkpoint = checkpointer.recover_if_possible(min_key="WER")
        if self.checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {save_folder}: has the run finished an epoch?")
        self.device = torch.device(device)
        self.wavlm.to(self.device).eval()
        self.head.to(self.device).eval()
        self.sample_rate = self.hparams["sample_rate"]
        self.blank_index = self.hparams["blank_index"]

    @torch.no_grad()
    def logits(self, wavs, wav_lens):
        """(batch, frames, vocab) CTC logits for padded waveforms at the model's rate."""
        return self.head(self.wavlm(wavs.to(self.device), wav_lens.to(self.device)))

    @torch.no_grad()
    def transcribe_batch(self, signals):
        """Transcripts of a list of 1-D waveforms at the model's rate."""
        wavs, wav_lens = sb.utils.data_utils.batch_pad_right(signals)
        log_probs = self.logits(wavs, wav_lens).log_softmax(-1)
        hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens.to(self.device), blank_id=self.blank_index)
        return [self.tokenizer.decode_ids(h) for h in hyps]

    def load(self, path):
        return load_audio(path, self.sample_rate)

    def transcribe_files(self, paths, batch_seconds=60.0, chunk_seconds=30.0):
        """{path: transcript}; long files are chunked (or refused with chunk_seconds=0)."""
        pieces = []  # (path, chunk index, waveform)
        for path in paths:
            audio = self.load(path)
            seconds = len(audio) / self.sample_rate
            if chunk_seconds <= 0 or seconds <= chunk_seconds:
                if chunk_seconds <= 0 and seconds > batch_seconds:
                    raise ValueError(f"{path} is {seconds:.0f} s long, more than --batch_seconds="
                                     f"{batch_seconds}: set --chunk_seconds (e.g. 30) to cut it")
                pieces.append((path, 0, audio))
                continue
            step = int(chunk_seconds * self.sample_rate)
            pieces.extend((path, i, audio[start:start + step]) for i, start in enumerate(range(0, len(audio), step)))
        pieces.sort(key=lambda piece: len(piece[2]))
        batches, batch = [], []
        limit = batch_seconds * self.sample_rate
        for piece in pieces:  # ascending length: the new piece is the longest of its batch
            if batch and len(piece[2]) * (len(batch) + 1) > limit:
                batches.append(batch)
                batch = []
            batch.append(piece)
        batches += [batch] if batch else []
        texts = {}
        for batch in batches:
            for (path, index, _), text in zip(batch, self.transcribe_batch([p[2] for p in batch])):
                texts[(path, index)] = text
        return {path: " ".join(t for (p, _), t in sorted(texts.items()) if p == path and t) for path in paths}


def read_csv_paths(csv_path, data_root):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [(row["ID"], row["wav"].replace("$data_root", str(data_root))) for row in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder", help="the output_folder of a training run")
    parser.add_argument("audio", nargs="*", help="audio files (any rate, any channels)")
    parser.add_argument("--csv", help="a manifest (ID, wav, ...) instead of files")
    parser.add_argument("--data_root", default=".", help="replaces $data_root in --csv")
    parser.add_argument("--out", help="write ID/file,transcript rows here (default: stdout)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_seconds", type=float, default=60.0, help="audio per batch (padded)")
    parser.add_argument("--chunk_seconds", type=float, default=30.0, help="cut longer files (0: refuse)")
    args = parser.parse_args(argv)
    items = read_csv_paths(args.csv, args.data_root) if args.csv else [(a, a) for a in args.audio]
    if not items:
        parser.error("give audio files or --csv")
    model = TrainedModel(args.output_folder, args.device)
    texts = model.transcribe_files([path for _, path in items], args.batch_seconds, args.chunk_seconds)
    rows = [(key, texts[path]) for key, path in items]
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ID", "transcript"])
            writer.writerows(rows)
    else:
        for key, text in rows:
            print(f"{key}\t{text}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
