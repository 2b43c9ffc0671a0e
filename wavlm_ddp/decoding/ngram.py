"""Build a word n-gram language model in the ARPA format from text, with no network
and no compiled tool: interpolated Kneser-Ney smoothing, written in backoff form as
KenLM's `lmplz` writes it (any ARPA reader loads it: KenLM, flashlight, pyctcdecode).

The command is `python -m wavlm_ddp.build_lm` (build_lm.py). TEXT is a manifest CSV (its `wrd` column: by default the training transcripts) or a
plain text file with one sentence per line (for LibriSpeech, the official
librispeech-lm-norm.txt, or download the official 4-gram ARPA instead). Words are
split on spaces and kept as they are (the recipe's transcripts are upper case).

Smoothing, per order n with adjusted counts a (raw counts at the highest order and
for n-grams that start with <s>; otherwise the number of distinct words seen before
the n-gram, Kneser-Ney's continuation count):
    p(w | h) = max(a(h w) - D_n, 0) / A(h) + D_n * T(h) / A(h) * p(w | h minus its first word)
with A(h) the sum and T(h) the number of the a(h .), and D_n = n1 / (n1 + 2 n2) from
the counts of n-grams seen once and twice (Ney's estimate). Unigrams interpolate with
the uniform distribution over the vocabulary and <unk>. The ARPA file stores p(w | h)
for every seen n-gram and D_n * T(h) / A(h) as the backoff weight of h.
"""

import collections
import csv
import math
import os
import tempfile
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG_ZERO = -99.0  # ARPA's log10 probability of <s>, which is never predicted
FALLBACK_DISCOUNT = 0.5  # when the count-of-counts cannot estimate D (tiny corpora)


def read_sentences(paths):
    """Sentences (lists of words) from manifest CSVs (`wrd` column) or text files."""
    for path in paths:
        path = Path(path)
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = csv.DictReader(f)
                if "wrd" not in (rows.fieldnames or []):
                    raise ValueError(f"{path} has no wrd column: pass a manifest CSV or a text file")
                lines = [row["wrd"] for row in rows]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            words = line.split()
            if words:
                yield words


def count_ngrams(sentences, order):
    """Raw counts {n: Counter(tuple)} of every n-gram up to `order`, sentences framed
    by <s> and </s>."""
    counts = {n: collections.Counter() for n in range(1, order + 1)}
    for words in sentences:
        tokens = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                counts[n][tuple(tokens[i : i + n])] += 1
    return counts


def adjusted_counts(counts, order):
    """Kneser-Ney counts: continuation counts below the highest order, except for
    n-grams starting with <s> (nothing precedes them), which keep their raw count."""
    adjusted = {order: counts[order]}
    for n in range(1, order):
        left = collections.Counter(gram[1:] for gram in counts[n + 1])
        adjusted[n] = collections.Counter(
            {gram: (count if gram[0] == BOS else left[gram]) for gram, count in counts[n].items()}
        )
    return adjusted


def discount(adjusted_n):
    singles = sum(1 for c in adjusted_n.values() if c == 1)
    doubles = sum(1 for c in adjusted_n.values() if c == 2)
    if singles == 0 or doubles == 0:
        return FALLBACK_DISCOUNT
    return min(max(singles / (singles + 2 * doubles), 0.05), 0.95)


def estimate(counts, order):
    """({n: {gram: log10 p}}, {n: {gram: log10 backoff}}) of the interpolated
    Kneser-Ney model."""
    adjusted = adjusted_counts(counts, order)
    vocab = sorted({gram[0] for gram in counts[1]} | {UNK})
    probs, backoffs = {}, {}
    lower = None  # p of the order below, as a function
    for n in range(1, order + 1):
        d = discount(adjusted[n])
        totals, types = collections.Counter(), collections.Counter()
        for gram, count in adjusted[n].items():
            if gram[-1] == BOS:
                continue  # <s> is never predicted
            totals[gram[:-1]] += count
            types[gram[:-1]] += 1
        gamma = {h: d * types[h] / totals[h] for h in totals}
        level = {}
        for gram, count in adjusted[n].items():
            if gram[-1] == BOS:
                continue
            h = gram[:-1]
            below = 1.0 / (len(vocab) - 1) if n == 1 else lower(gram[1:])
            level[gram] = max(count - d, 0.0) / totals[h] + gamma[h] * below
        if n == 1:
            level[(UNK,)] = gamma[()] / (len(vocab) - 1)  # vocabulary without <s>, <unk> included
        probs[n] = level
        if n > 1:
            backoffs[n - 1] = gamma
        else:
            backoffs[0] = gamma
        lower = _backoff_lookup(probs, backoffs, n)
    logs = {n: {g: math.log10(p) for g, p in level.items()} for n, level in probs.items()}
    logs[1][(BOS,)] = LOG_ZERO
    bows = {n: {g: math.log10(w) for g, w in backoffs.get(n, {}).items() if w > 0} for n in range(1, order)}
    return logs, bows


def _backoff_lookup(probs, backoffs, top):
    """p(gram[-1] | gram[:-1]) of the model up to order `top`, by backoff."""

    def p(gram):
        n = len(gram)
        if gram in probs[n]:
            return probs[n][gram]
        weight = backoffs.get(n - 1, {}).get(gram[:-1], 1.0) if n > 1 else 1.0
        return weight * p(gram[1:]) if n > 1 else probs[1][(UNK,)]

    return p


def write_arpa(logs, bows, path):
    """Write the model atomically (a reader never sees a half-written file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n\\data\\\n")
        for n in sorted(logs):
            f.write(f"ngram {n}={len(logs[n])}\n")
        for n in sorted(logs):
            f.write(f"\n\\{n}-grams:\n")
            for gram in sorted(logs[n]):
                line = f"{logs[n][gram]:.6f}\t{' '.join(gram)}"
                if n in bows and gram in bows[n]:
                    line += f"\t{bows[n][gram]:.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    os.replace(tmp, path)
    return path


def build_lm(texts, output, order=3):
    """Count, smooth and write; returns the ARPA path."""
    if order < 1:
        raise ValueError(f"order={order}: an n-gram model needs order >= 1")
    counts = count_ngrams(read_sentences(texts), order)
    if not counts[1]:
        raise ValueError(f"no words in {', '.join(map(str, texts))}: the LM needs text")
    logs, bows = estimate(counts, order)
    return write_arpa(logs, bows, output)
