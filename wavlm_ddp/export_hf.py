#!/usr/bin/env python3
"""Export a finished run to the HuggingFace format: a `WavLMForCTC` folder (or the
family's own class: `Wav2Vec2ForCTC`, `HubertForCTC`, `Data2VecAudioForCTC`) that
`transformers` loads (`AutoModelForCTC`), with the feature extractor and the CTC tokenizer.

    python -m wavlm_ddp.export_hf results/demo/1986 exported/
    # then: WavLMForCTC.from_pretrained("exported/"), Wav2Vec2Processor.from_pretrained("exported/")

The exported model computes the same logits as the recipe's model (tested).
The feature extractor normalises each waveform as the recipe does (normalize_wav),
and the tokenizer maps the SentencePiece vocabulary (id 0, `<unk>`, is the CTC
blank and the pad token; SentencePiece's `▁` becomes the delimiter `|`). The SentencePiece model is copied
beside it for unigram vocabularies, which the CTC tokenizer cannot decode.

When the run decodes its test set with an n-gram LM, the export is a
`Wav2Vec2ProcessorWithLM` (pyctcdecode; its `language_model/` holds the LM, the
words and the weights) and `decoding.json` holds the recipe's search settings:
`processor.batch_decode(logits.numpy()).text` and `python -m wavlm_ddp.transcribe exported/ --beam`
then give the recipe's beam-search transcripts.
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

from wavlm_ddp.decoding.search import CTCDecoder, search_settings
from wavlm_ddp.inference import TrainedModel

SPM_WORD_MARK = "\u2581"  # SentencePiece's word-boundary piece
DECODING_FILE = "decoding.json"  # test_search of the run, when it has an LM
PAD = "<pad>"  # the CTC blank's name in the export
WORD_DELIMITER = "|"  # the CTC tokenizer's default delimiter (transformers 5 does not save another one)


def export(output_folder, export_dir):
    trained = TrainedModel(output_folder, device="cpu")
    export_dir = Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise FileExistsError(f"{export_dir} is not empty: choose a new folder")
    export_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = trained.tokenizer.vocab_size()
    encoder = trained.wavlm.model
    config = encoder.config.to_dict()
    ctc_class = f"{type(encoder).__name__[: -len('Model')]}ForCTC"  # WavLMForCTC, Wav2Vec2ForCTC, HubertForCTC, ...
    config.update(architectures=[ctc_class], vocab_size=vocab_size, pad_token_id=trained.blank_index,
                  ctc_loss_reduction="mean", layerdrop=0.0)
    model = AutoModelForCTC.from_config(type(encoder.config).from_dict(config))
    getattr(model, model.base_model_prefix).load_state_dict(encoder.state_dict(), strict=False)
    model.lm_head.load_state_dict({"weight": trained.head.w.weight, "bias": trained.head.w.bias})
    model.save_pretrained(export_dir)

    pieces = [trained.tokenizer.id_to_piece(i) for i in range(vocab_size)]
    if WORD_DELIMITER in pieces:
        raise ValueError(f"the vocabulary already holds {WORD_DELIMITER!r}: the export cannot map words onto it")
    # The blank (id 0, SentencePiece's <unk>) is named <pad>, as HF's CTC tokenizers and pyctcdecode expect.
    vocab = {PAD if i == trained.blank_index else WORD_DELIMITER if piece == SPM_WORD_MARK else piece: i
             for i, piece in enumerate(pieces)}
    (export_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(str(export_dir / "vocab.json"), unk_token=PAD, pad_token=PAD,
                                     word_delimiter_token=WORD_DELIMITER, bos_token=None, eos_token=None)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=trained.sample_rate, padding_value=0.0,
                                         do_normalize=trained.wavlm.normalize_wav, return_attention_mask=True)
    search = search_settings(trained.hparams["test_search"], trained.hparams.get("decoding_file"))
    if search["mode"] == "beam" and search.get("lm_path"):
        processor = processor_with_lm(trained, search, extractor, tokenizer, pieces)
    else:
        processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    processor.save_pretrained(export_dir)
    if search["mode"] == "beam" and search.get("lm_path"):
        declare_lm_processor(export_dir, type(processor).__name__)
    shutil.copy(trained.tokenizer_path, export_dir / "sentencepiece.model")
    if search["mode"] == "beam" and search.get("lm_path"):
        # The recipe's own search settings, for `wavlm_ddp.transcribe exported/ --beam (the LM is pyctcdecode's copy).
        lm_file = next((export_dir / "language_model").glob(f"{Path(search['lm_path']).stem}*"))
        settings = {**search, "lm_path": str(lm_file.relative_to(export_dir)), "lexicon": None}
        (export_dir / DECODING_FILE).write_text(json.dumps(settings, indent=1))
    return export_dir


def declare_lm_processor(export_dir, processor_class):
    """Write `processor_class` into the feature extractor's settings, where HF's
    `pipeline("automatic-speech-recognition", model=...)` looks to decide whether to
    load the pyctcdecode decoder from `language_model/` (transformers 5: the feature
    extractor's dict in processor_config.json, or preprocessor_config.json); without it
    the pipeline decodes greedily. Hub models with an LM carry the same entry."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(export_dir) / name
        if not path.exists():
            continue
        settings = json.loads(path.read_text())
        target = settings.get("feature_extractor", settings) if name == "processor_config.json" else settings
        if name == "processor_config.json" and "feature_extractor" not in settings:
            continue
        target["processor_class"] = processor_class
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def processor_with_lm(trained, search, extractor, tokenizer, pieces):
    """A Wav2Vec2ProcessorWithLM whose pyctcdecode decoder holds the run's LM, its
    words (the same lexicon as the recipe's search) and its weights. flashlight
    adds lm_weight x log10 p(word) per word, pyctcdecode alpha x ln p(word): alpha
    = lm_weight / ln 10 gives the same scores; beta is the word score."""
    try:
        from pyctcdecode import build_ctcdecoder
    except ImportError:
        raise ValueError("the run has an LM: its export needs pyctcdecode and kenlm (pip install -e '.[lm]')") from None
    from transformers import Wav2Vec2ProcessorWithLM

    words = list(CTCDecoder(trained.tokenizer, trained.blank_index, **search).lexicon)
    labels = ["" if i == trained.blank_index else " " if p == SPM_WORD_MARK else p for i, p in enumerate(pieces)]
    decoder = build_ctcdecoder(labels, kenlm_model_path=str(search["lm_path"]), unigrams=words,
                               alpha=search["lm_weight"] / math.log(10), beta=search["word_score"])
    return Wav2Vec2ProcessorWithLM(feature_extractor=extractor, tokenizer=tokenizer, decoder=decoder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder", help="the output_folder of a training run")
    parser.add_argument("export_dir", help="a new (or empty) folder")
    args = parser.parse_args(argv)
    print(f"exported to {export(args.output_folder, args.export_dir)}")


def cli(argv=None):
    """The command's exit status: 0, or 2 with one line on stderr."""
    try:
        main(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
