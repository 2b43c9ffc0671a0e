#!/usr/bin/env python3
"""Transcribe audio files with a finished run or an HF export, on CPU or GPU.

    python transcribe.py results/demo/1986 a.wav b.flac           # prints "file<TAB>transcript"
    python transcribe.py results/demo/1986 --csv test.csv --out hyps.csv
    python transcribe.py exported/ a.wav                          # a folder written by export_hf.py

A run folder is code: its `hyperparams.yaml` rebuilds the model (hyperpyyaml can
call any Python function named there), and the checkpoint with the best valid WER
is loaded. Use it for your own runs only. An exported folder (safetensors, JSON and
the SentencePiece model) runs no YAML and unpickles nothing: share models that way.
Files are batched by length (at
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
from transformers import Wav2Vec2FeatureExtractor, WavLMForCTC

from fault_tolerance import SafeCheckpointer
from recipes.tokenizer import load_tokenizer
from train import load_audio
from wavlm_wrapper import normalize_waveforms

# The feature extractor's settings are in processor_config.json (transformers 5) or
# preprocessor_config.json (4.x); Wav2Vec2FeatureExtractor reads either.
EXPORTED_FILES = ("config.json", "model.safetensors", "sentencepiece.model")


class Transcriber:
    """Batching, chunking and greedy CTC decoding; a subclass provides `logits`,
    `tokenizer`, `sample_rate`, `blank_index` and `device`."""

    @torch.no_grad()
    def transcribe_batch(self, signals):
        """Transcripts of a list of 1-D waveforms at the model's rate."""
        wavs, wav_lens = sb.utils.data_utils.batch_pad_right(signals)
        log_probs = self.logits(wavs, wav_lens).log_softmax(-1)
        hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens.to(self.device), blank_id=self.blank_index)
        return [" ".join(self.tokenizer.decode_ids(h).split()) for h in hyps]  # words, single spaces

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


class TrainedModel(Transcriber):
    """The encoder, the CTC head and the tokenizer of a finished run (runs its YAML)."""

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
        # The best checkpoint that loads: a damaged one is reported and skipped, as in training.
        checkpointer = SafeCheckpointer(save_folder, recoverables={"wavlm": self.wavlm, "ctc_head": self.head})
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


class ExportedModel(Transcriber):
    """A folder written by export_hf.py: weights from safetensors, settings from
    JSON, the SentencePiece model for decoding. No YAML, no pickle."""

    def __init__(self, folder, device="cpu"):
        folder = Path(folder)
        missing = [name for name in EXPORTED_FILES if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: give a folder written by export_hf.py")
        self.device = torch.device(device)
        self.model = WavLMForCTC.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
        self.sample_rate = extractor.sampling_rate
        self.normalize_wav = extractor.do_normalize
        self.blank_index = self.model.config.pad_token_id
        self.tokenizer = load_tokenizer(folder / "sentencepiece.model")

    @torch.no_grad()
    def logits(self, wavs, wav_lens):
        """(batch, frames, vocab) CTC logits, the waveforms normalised as in training."""
        wavs, wav_lens = wavs.to(self.device), wav_lens.to(self.device)
        mask = torch.arange(wavs.shape[1], device=self.device)[None] < torch.round(wav_lens * wavs.shape[1])[:, None]
        if self.normalize_wav:
            wavs = normalize_waveforms(wavs, mask)
        return self.model(wavs, attention_mask=mask.long()).logits


def open_model(folder, device="cpu"):
    """An exported folder (config.json, no hyperparams.yaml) or a run folder."""
    folder = Path(folder)
    if (folder / "config.json").exists() and not (folder / "hyperparams.yaml").exists():
        return ExportedModel(folder, device)
    return TrainedModel(folder, device)


def read_csv_paths(csv_path, data_root):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [(row["ID"], row["wav"].replace("$data_root", str(data_root))) for row in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder", help="the output_folder of a training run, or a folder written "
                        "by export_hf.py (runs no YAML)")
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
    model = open_model(args.output_folder, args.device)
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
