"""Train the SentencePiece tokenizer once from the training manifest."""

import csv
import logging
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)


def train_tokenizer(train_csv, model_dir, vocab_size, model_type, text_column="wrd", texts=None):
    """Train a SentencePiece model on the training transcripts (`texts`, or the
    `text_column` of `train_csv`) unless `model_dir/tokenizer.model` already
    exists; they are kept in `model_dir/train_text.txt`. Returns the model path.

    Id 0 is `<unk>` and doubles as the CTC blank (SpeechBrain's convention): a
    character model covers every training character, so `<unk>` is never a target.
    """
    model_dir = Path(model_dir)
    model_path = model_dir / "tokenizer.model"
    if model_path.exists():
        logger.info(f"Tokenizer found at {model_path}, not retrained")
        return model_path
    model_dir.mkdir(parents=True, exist_ok=True)
    text_path = model_dir / "train_text.txt"
    if texts is None:
        with open(train_csv, newline="") as f:
            texts = [row[text_column] for row in csv.DictReader(f)]
    with open(text_path, "w") as out:
        out.writelines(text + "\n" for text in texts)
    spm.SentencePieceTrainer.train(
        input=str(text_path),
        model_prefix=str(model_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        hard_vocab_limit=model_type != "char",  # a char model has as many pieces as characters
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    logger.info(f"Trained a {model_type} tokenizer into {model_path}")
    return model_path


def load_tokenizer(model_path):
    return spm.SentencePieceProcessor(model_file=str(model_path))
