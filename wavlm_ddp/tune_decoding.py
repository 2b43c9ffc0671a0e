#!/usr/bin/env python3
"""Find the LM weight and word score of a finished run's beam search on its valid set.

    python -m wavlm_ddp.tune_decoding results/wavlm_large_ctc/1986 [--overwrite]

The valid set goes through the model once (log-probabilities kept in memory);
then every pair of the run's `decoding_grid` (lm_weight x word_score) decodes
those log-probabilities with the run's `test_search`. The best pair (lowest WER,
ties to the smaller LM weight) is written to the run's `decoding_file`, which the
test evaluation (`train.py ... --test_only`) and `wavlm_ddp.transcribe --beam` then use.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from speechbrain.utils.metric_stats import ErrorRateStats

from wavlm_ddp.decoding.search import CTCDecoder
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.data.manifests import read_manifest
from wavlm_ddp.inference import TrainedModel


def valid_set(hparams):
    """[(ID, audio path or value, words)] of the run's valid split: its manifest, or
    its HF dataset (valid_data)."""
    if hparams.get("valid_data"):
        from wavlm_ddp.data import hf as hf_data

        columns = dict(hparams["hf_columns"])
        dataset = hf_data.open_split(hparams["valid_data"], "valid", (hparams.get("hf_splits") or {}).get(
            "valid", "valid"), {**columns, "duration": None})
        ids = hf_data.row_ids(dataset, columns.get("id"), "valid", range(len(dataset)))
        return [(utt_id, audio, (text or "").split())
                for utt_id, audio, text in zip(ids, dataset[columns["audio"]], dataset[columns["text"]])]
    rows = read_manifest(hparams["valid_csv"], hparams["data_folder"])
    return [(utt_id, row["wav"], row["wrd"].split()) for utt_id, row in rows.items()]


def word_error_rate(ids, hypotheses, references):
    stats = ErrorRateStats()
    stats.append(ids, [h.split() for h in hypotheses], references)
    return stats.summarize("error_rate")


def tune(model, grid, log=print):
    """(best (lm_weight, word_score, WER), greedy WER, every result) on the valid set."""
    rows = valid_set(model.hparams)
    ids, references = [r[0] for r in rows], [r[2] for r in rows]
    started = time.time()
    log_probs = model.file_log_probs([model.load(r[1]) for r in rows])
    log(f"valid set: {len(rows)} utterances through the model in {time.time() - started:.1f} s")
    greedy = word_error_rate(ids, [model.decode(lp[None], torch.ones(1))[0] for lp in log_probs], references)
    decoder = CTCDecoder(model.tokenizer, model.blank_index, **{**model.hparams["test_search"], "mode": "beam"})
    results = []
    for lm_weight in grid["lm_weight"]:
        for word_score in grid["word_score"]:
            decoder.set_weights(lm_weight, word_score)
            texts = [decoder(lp[None], torch.ones(1))[0] for lp in log_probs]
            results.append((lm_weight, word_score, word_error_rate(ids, texts, references)))
            log(f"lm_weight {lm_weight:g}, word_score {word_score:g}: valid WER {results[-1][2]:.2f} %")
    best = min(results, key=lambda r: (r[2], r[0], abs(r[1])))
    return best, greedy, results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder", help="the output_folder of a finished training run")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier decoding_file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = TrainedModel(args.output_folder, args.device)
    target = Path(model.hparams["decoding_file"])
    if target.exists() and not args.overwrite:
        raise ConfigError(f"{target} exists (an earlier tuning): pass --overwrite to replace it")
    if model.hparams["test_search"]["mode"] != "beam":
        raise ConfigError("test_search: mode is greedy in this run: there is no LM weight to tune")
    (lm_weight, word_score, wer), greedy, results = tune(model, model.hparams["decoding_grid"])
    tmp = target.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({
        "lm_weight": lm_weight, "word_score": word_score, "valid_WER": round(wer, 2),
        "valid_WER_greedy": round(greedy, 2),
        "grid": [{"lm_weight": w, "word_score": s, "valid_WER": round(e, 2)} for w, s, e in results],
    }, sort_keys=False))
    tmp.replace(target)
    print(f"best: lm_weight {lm_weight:g}, word_score {word_score:g}, valid WER {wer:.2f} % (greedy "
          f"{greedy:.2f} %); written to {target}, used by the test evaluation and wavlm_ddp.transcribe --beam")
    return lm_weight, word_score


def cli(argv=None):
    """The command's exit status: 0, or 2 with one line on stderr."""
    try:
        main(argv)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
