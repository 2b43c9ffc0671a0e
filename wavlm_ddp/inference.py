"""The models that transcribe: a finished run (its YAML and best checkpoint) or an
HF export (safetensors, JSON, SentencePiece: no YAML, no pickle), with batching by
length, long files read in overlapping windows, and greedy or beam-search decoding.
Used by transcribe.py, export_hf.py, tune_decoding.py and the decoder benchmark.
"""

import importlib.util
import json
import math
import re
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from transformers import AutoModelForCTC, Wav2Vec2FeatureExtractor

from wavlm_ddp.data.audio import AUDIO_ERRORS, load_audio, read_error
from wavlm_ddp.decoding.search import CTCDecoder, search_settings
from wavlm_ddp.faults.checkpoints import SafeCheckpointer
from wavlm_ddp.data.tokenizer import load_tokenizer
from wavlm_ddp.encoder.model import normalize_waveforms

# Where the classes that a run folder's hyperparams.yaml names live now: the recipe's
# library was top-level modules before it became the wavlm_ddp package, and the
# encoder is the package's wherever the recipe's wavlm_wrapper.py is not importable
# (an installed wheel transcribing a run folder).
MOVED_NAMES = {
    "fault_tolerance.SafeCheckpointer": "wavlm_ddp.faults.checkpoints.SafeCheckpointer",
}
WRAPPER_NAMES = {
    "wavlm_wrapper.SpeechEncoder": "wavlm_ddp.encoder.SpeechEncoder",
    "wavlm_wrapper.WavLM": "wavlm_ddp.encoder.SpeechEncoder",
}
# Keys a finished run's YAML may hold that transcribing never calls (data preparation,
# which lives in the checkout's recipes/): set to null so that loading imports nothing.
UNUSED_FOR_INFERENCE = ("prepare_data",)

# The feature extractor's settings are in processor_config.json (transformers 5) or
# preprocessor_config.json (4.x); Wav2Vec2FeatureExtractor reads either.
EXPORTED_FILES = ("config.json", "model.safetensors", "sentencepiece.model")


class Transcriber:
    """Batching, long-file windows and decoding; a subclass provides `logits`,
    `frame_count`, `tokenizer`, `sample_rate`, `blank_index`, `frame_stride` and `device`.
    `decoder` (decoding.CTCDecoder) is greedy unless `use_search` set another."""

    decoder = None
    min_samples = 400  # the shortest input the encoders' CNN turns into one frame

    @torch.no_grad()
    def transcribe_batch(self, signals):
        """Transcripts of a list of 1-D waveforms at the model's rate."""
        wavs, wav_lens = sb.utils.data_utils.batch_pad_right(signals)
        log_probs = self.logits(wavs, wav_lens).log_softmax(-1)
        frames = self.frame_count(torch.tensor([len(s) for s in signals])).to(log_probs.device)
        return self.decode(log_probs, frames / log_probs.shape[1])

    def decode(self, log_probs, wav_lens):
        if self.decoder is None:
            self.decoder = CTCDecoder(self.tokenizer, self.blank_index)
        return self.decoder(log_probs, wav_lens)

    def load(self, path):
        return load_audio(path, self.sample_rate)

    def windows(self, audio, chunk_seconds, context_seconds):
        """[(start, keep_from, keep_to, waveform)] in samples: centres of `chunk_seconds`
        that tile the file, each read with `context_seconds` more on both sides, all
        on the model's frame grid so that a window's frame i is the file's frame
        start / frame_stride + i. One window when the file is short enough."""
        stride = self.frame_stride
        centre = int(chunk_seconds * self.sample_rate) // stride * stride
        if chunk_seconds <= 0 or len(audio) <= centre:
            return [(0, 0, len(audio), audio)]
        context = int(context_seconds * self.sample_rate) // stride * stride
        pieces = []
        for keep_from in range(0, len(audio), centre):
            keep_to = min(keep_from + centre, len(audio))
            start, end = max(0, keep_from - context), min(len(audio), keep_to + context)
            pieces.append((start, keep_from, keep_to, audio[start:end]))
        return pieces

    @torch.no_grad()
    def file_log_probs(self, audios, batch_seconds=60.0, chunk_seconds=30.0, context_seconds=5.0):
        """Per file, (frames, vocab) CTC log-probabilities: long files are read in
        overlapping windows and only each window's centre frames are kept, so that
        every frame was computed with `context_seconds` of audio on both sides."""
        pieces = [(i, *w) for i, audio in enumerate(audios) for w in self.windows(audio, chunk_seconds,
                                                                                   context_seconds)]
        pieces.sort(key=lambda piece: len(piece[4]))
        batches, batch = [], []
        limit = batch_seconds * self.sample_rate
        for piece in pieces:  # ascending length: the new piece is the longest of its batch
            if batch and len(piece[4]) * (len(batch) + 1) > limit:
                batches.append(batch)
                batch = []
            batch.append(piece)
        batches += [batch] if batch else []
        kept = [[] for _ in audios]  # (first frame, frames)
        for batch in batches:
            wavs, wav_lens = sb.utils.data_utils.batch_pad_right([p[4] for p in batch])
            log_probs = self.logits(wavs, wav_lens).log_softmax(-1).float().cpu()
            lengths = self.frame_count(torch.tensor([len(p[4]) for p in batch])).tolist()
            for (index, start, keep_from, keep_to, _), frames, length in zip(batch, log_probs, lengths):
                first = (keep_from - start) // self.frame_stride
                last = length if keep_to == len(audios[index]) else (keep_to - start) // self.frame_stride
                kept[index].append((keep_from // self.frame_stride, frames[first:last]))
        return [torch.cat([frames for _, frames in sorted(parts, key=lambda p: p[0])]) for parts in kept]

    def transcribe_files(self, paths, batch_seconds=60.0, chunk_seconds=30.0, context_seconds=5.0, sources=None):
        """({path: transcript}, {path: why it failed}): every readable file decoded
        once, from its joined frames; a file that cannot be read loses nothing else.
        `sources` {key: audio value (bytes, HF's audio struct)}: `paths` are its keys."""
        audios, readable, failed = [], [], {}
        for path in paths:
            try:
                audio = self.load(sources[path] if sources is not None else path)
            except AUDIO_ERRORS as error:
                failed[path] = read_error(path, error) if sources is None else \
                    f"not readable as audio ({str(error).splitlines()[0][:200]})"
                continue
            if chunk_seconds <= 0 and len(audio) > batch_seconds * self.sample_rate:
                failed[path] = (f"{len(audio) / self.sample_rate:.0f} s long, more than --batch_seconds="
                                f"{batch_seconds}: set --chunk_seconds (e.g. 30) to read it in windows")
                continue
            if len(audio) < self.min_samples:
                failed[path] = f"too short: {len(audio)} samples, the CNN needs {self.min_samples}"
                continue
            audios.append(audio)
            readable.append(path)
        texts = {}
        for path, log_probs in zip(readable, self.file_log_probs(audios, batch_seconds, chunk_seconds,
                                                                 context_seconds)):
            texts[path] = self.decode(log_probs[None], torch.ones(1))[0]
        return texts, failed


class TrainedModel(Transcriber):
    """The encoder, the CTC head and the tokenizer of a finished run (runs its YAML)."""

    def __init__(self, output_folder, device="cpu"):
        output_folder = Path(output_folder)
        config = output_folder / "hyperparams.yaml"
        if not config.exists():
            raise FileNotFoundError(f"{config} not found: give the output_folder of a training run")
        self.hparams = load_run_hparams(config)
        save_folder = Path(self.hparams["save_folder"])
        if not save_folder.is_absolute() and not save_folder.exists():
            save_folder = output_folder / "save"  # a run folder that was moved
        self.tokenizer_path = save_folder / "tokenizer.model"
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        # A run trained with a GPU-only attention kernel (the same weights, the same maths)
        # is read on another device through SDPA. CUDA graphs speed up training steps of
        # few shapes; files of any length would each record their own.
        on_gpu = torch.device(device).type == "cuda"
        self.wavlm = self.hparams["wavlm"](cuda_graphs=False, **({} if on_gpu else {"attention": "sdpa"}))
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
        self.frame_stride = math.prod(self.wavlm.model.config.conv_stride)
        self.frame_count = self.wavlm.model._get_feat_extract_output_lengths  # samples -> frames

    def use_search(self, lm_weight=None, word_score=None):
        """Decode with the run's test_search (and tune_decoding.py's weights, when
        it ran), optionally with another LM weight or word score."""
        search = search_settings(self.hparams["test_search"], self.hparams.get("decoding_file"))
        search.update({k: v for k, v in (("lm_weight", lm_weight), ("word_score", word_score)) if v is not None})
        self.decoder = CTCDecoder(self.tokenizer, self.blank_index, **search)
        return search

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
        self.model = AutoModelForCTC.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
        self.sample_rate = extractor.sampling_rate
        self.normalize_wav = extractor.do_normalize
        self.blank_index = self.model.config.pad_token_id
        self.frame_stride = math.prod(self.model.config.conv_stride)
        base = getattr(self.model, self.model.base_model_prefix)
        self.frame_count = base._get_feat_extract_output_lengths  # samples -> frames
        self.tokenizer = load_tokenizer(folder / "sentencepiece.model")
        self.folder = folder

    def use_search(self, lm_weight=None, word_score=None):
        """Decode with the run's search settings saved by export_hf.py (decoding.json)."""
        path = self.folder / "decoding.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: this export has no LM (its run decoded greedily)")
        search = json.loads(path.read_text())
        search["lm_path"] = str(self.folder / search["lm_path"])
        search.update({k: v for k, v in (("lm_weight", lm_weight), ("word_score", word_score)) if v is not None})
        self.decoder = CTCDecoder(self.tokenizer, self.blank_index, **search)
        return search

    @torch.no_grad()
    def logits(self, wavs, wav_lens):
        """(batch, frames, vocab) CTC logits, the waveforms normalised as in training."""
        wavs, wav_lens = wavs.to(self.device), wav_lens.to(self.device)
        mask = torch.arange(wavs.shape[1], device=self.device)[None] < torch.round(wav_lens * wavs.shape[1])[:, None]
        if self.normalize_wav:
            wavs = normalize_waveforms(wavs, mask)
        if getattr(self.model.config, "feat_extract_norm", "layer") == "group" and wavs.shape[0] > 1:
            # A group-norm CNN depends on padding (HF: do not pad such models): each file alone.
            alone = [self.model(wavs[i : i + 1, :n]).logits[0] for i, n in enumerate(mask.sum(dim=1).tolist())]
            return torch.nn.utils.rnn.pad_sequence(alone, batch_first=True)
        return self.model(wavs, attention_mask=mask.long()).logits


def load_run_hparams(config):
    """A run folder's hyperparams.yaml, loaded with the classes it names where they
    live now (MOVED_NAMES) and without the keys that only training calls."""
    text = Path(config).read_text()
    moved = dict(MOVED_NAMES)
    if importlib.util.find_spec("wavlm_wrapper") is None:
        moved.update(WRAPPER_NAMES)
    for old, new in moved.items():
        text = re.sub(rf"(!(?:name|new|apply):){re.escape(old)}\b", rf"\g<1>{new}", text)
    present = [key for key in UNUSED_FOR_INFERENCE if re.search(rf"^{key}:", text, flags=re.M)]
    return load_hyperpyyaml(text, {key: None for key in present})


def open_model(folder, device="cpu"):
    """An exported folder (config.json, no hyperparams.yaml) or a run folder."""
    folder = Path(folder)
    if (folder / "config.json").exists() and not (folder / "hyperparams.yaml").exists():
        return ExportedModel(folder, device)
    return TrainedModel(folder, device)
