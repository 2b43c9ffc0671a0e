"""Build a word n-gram LM (ARPA) from transcripts or text, for the beam search.

    python -m wavlm_ddp.build_lm TEXT [TEXT ...] --output lm.arpa [--order 3]

TEXT is a manifest CSV (its `wrd` column) or a plain text file with one sentence per
line. Interpolated Kneser-Ney, written as KenLM's `lmplz` writes it (decoding/ngram.py).
"""

import argparse
import sys
from pathlib import Path

from wavlm_ddp.decoding.ngram import build_lm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="+", help="manifest CSVs (wrd column) or text files")
    parser.add_argument("--output", required=True, help="the ARPA file to write")
    parser.add_argument("--order", type=int, default=3, help="n-gram order (3; LibriSpeech's official LM: 4)")
    args = parser.parse_args(argv)
    if Path(args.output).exists():
        raise FileExistsError(f"{args.output} exists: choose another --output or delete it")
    return build_lm(args.texts, args.output, args.order)


def cli(argv=None):
    """The command's exit status: 0, or 1 with one line on stderr."""
    try:
        path = main(argv)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
