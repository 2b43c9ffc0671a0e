#!/usr/bin/env python3
"""Decoding speed and WER of the two beam searches the recipe could use, on the
same log-probabilities: flashlight-text's lexicon decoder (C++, wavlm_ddp/decoding/search.py) and
SpeechBrain's CTCBeamSearcher (Python, KenLM through the `kenlm` package).

    python bench/decoders.py results/demo/1986 [--repeats 3]

Needs a finished run with an LM (its test_search lm_path) and `pip install kenlm`
for SpeechBrain's searcher. Prints one JSON line per decoder: seconds of decoding,
real-time factor (decoding time / audio duration) and test WER; one CPU thread.
"""

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speechbrain.decoders.ctc import CTCBeamSearcher  # noqa: E402
from speechbrain.utils.metric_stats import ErrorRateStats  # noqa: E402

from wavlm_ddp.decoding.search import SILENCE, CTCDecoder  # noqa: E402
from wavlm_ddp.inference import TrainedModel  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run's output_folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = TrainedModel(args.run)
    search = model.hparams["test_search"]
    with open(model.hparams["test_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    audios = [model.load(r["wav"].replace("$data_root", str(model.hparams["data_folder"]))) for r in rows]
    log_probs = model.file_log_probs(audios)
    seconds = sum(len(a) for a in audios) / model.sample_rate

    flashlight = CTCDecoder(model.tokenizer, model.blank_index, **search)
    pieces = [model.tokenizer.id_to_piece(i) for i in range(model.tokenizer.get_piece_size())]
    vocab = ["" if i == model.blank_index else (" " if p == SILENCE else p) for i, p in enumerate(pieces)]
    unigrams = list(flashlight.lexicon) if hasattr(flashlight, "lexicon") else None
    # flashlight adds lm_weight x log10 p; pyctcdecode-style searchers use ln p: alpha = lm_weight / ln 10.
    speechbrain = CTCBeamSearcher(model.blank_index, vocab, kenlm_model_path=str(search["lm_path"]),
                                  unigrams=unigrams, alpha=search["lm_weight"] / math.log(10),
                                  beta=search["word_score"], beam_size=search["beam_size"])

    def run_flashlight():
        return [flashlight(lp[None], torch.ones(1))[0] for lp in log_probs]

    def run_speechbrain():
        return [speechbrain(lp[None], torch.ones(1))[0][0].text for lp in log_probs]

    for name, decode in (("flashlight-text LexiconDecoder (wavlm_ddp.decoding)", run_flashlight),
                         ("SpeechBrain CTCBeamSearcher + kenlm", run_speechbrain)):
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            texts = decode()
            timings.append(time.perf_counter() - started)
        stats = ErrorRateStats()
        stats.append([r["ID"] for r in rows], [t.split() for t in texts], [r["wrd"].split() for r in rows])
        best = min(timings)
        print(json.dumps({"decoder": name, "utterances": len(rows), "audio_seconds": round(seconds, 1),
                          "decode_seconds": round(best, 3), "real_time_factor": round(best / seconds, 5),
                          "WER": round(stats.summarize("error_rate"), 2), "beam_size": search["beam_size"],
                          "lm": Path(search["lm_path"]).name}))


if __name__ == "__main__":
    main()
