"""The n-gram LM builder: a proper distribution in every context, the ARPA layout,
and KenLM (through flashlight-text, the decoder's reader) reading the same scores."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from flashlight.lib.text.decoder import KenLM
from flashlight.lib.text.dictionary import Dictionary

from wavlm_ddp.decoding.ngram import build_lm

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["THE CAT SEES THE DOG", "THE DOG SEES THE CAT", "A CAT SITS", "THE BIRD SITS NEAR THE CAT",
        "A DOG SEES A BIRD", "THE CAT SITS"]


def read_arpa(path):
    """({n: {gram: log10 p}}, {gram: log10 backoff}) of an ARPA file."""
    probs, backoffs, n = {}, {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            n = int(line[1:].split("-")[0])
            probs[n] = {}
        elif n and line.strip() and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            probs[n][gram] = float(fields[0])
            if len(fields) > 2:
                backoffs[gram] = float(fields[2])
    return probs, backoffs


def log_prob(probs, backoffs, gram):
    """log10 p(gram[-1] | gram[:-1]) by ARPA backoff."""
    if gram in probs.get(len(gram), {}):
        return probs[len(gram)][gram]
    if len(gram) == 1:
        return probs[1][("<unk>",)]
    return backoffs.get(gram[:-1], 0.0) + log_prob(probs, backoffs, gram[1:])


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    text = folder / "text.txt"
    text.write_text("\n".join(TEXT) + "\n")
    return build_lm([text], folder / "lm.arpa", order=3)


def test_every_context_of_the_model_is_a_probability_distribution(arpa):
    probs, backoffs = read_arpa(arpa)
    vocab = [g[0] for g in probs[1] if g[0] != "<s>"]
    contexts = [()] + [g for n in (1, 2) for g in probs[n] if g[-1] != "</s>"]
    for context in contexts:
        total = sum(10 ** log_prob(probs, backoffs, (*context, w)) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), context


def test_the_arpa_file_has_the_layout_readers_expect(arpa):
    text = arpa.read_text()
    probs, backoffs = read_arpa(arpa)
    assert [f"ngram {n}={len(probs[n])}" in text for n in (1, 2, 3)] == [True] * 3
    assert probs[1][("<s>",)] == -99.0 and ("<unk>",) in probs[1]
    for n in (2, 3):  # every n-gram's context and suffix are in the model
        for gram in probs[n]:
            assert gram[:-1] in probs[n - 1] and gram[1:] in probs[n - 1]
    # seen continuations are likelier than unseen ones
    assert log_prob(probs, backoffs, ("THE", "CAT")) > log_prob(probs, backoffs, ("THE", "SITS"))


def test_kenlm_reads_the_same_sentence_scores(arpa):
    probs, backoffs = read_arpa(arpa)
    words = ["<unk>", "<s>", "</s>"] + sorted({w for line in TEXT for w in line.split()})
    dictionary = Dictionary()
    for word in words:
        dictionary.add_entry(word)
    lm = KenLM(str(arpa), dictionary)
    for sentence in ["THE CAT SEES A BIRD", "A DOG SITS NEAR THE DOG"]:
        state, kenlm_total = lm.start(False), 0.0
        for word in sentence.split():
            state, score = lm.score(state, dictionary.get_index(word))
            kenlm_total += score
        kenlm_total += lm.finish(state)[1]
        tokens = ["<s>", *sentence.split(), "</s>"]
        ours = sum(log_prob(probs, backoffs, tuple(tokens[max(0, i - 2): i + 1])) for i in range(1, len(tokens)))
        assert kenlm_total == pytest.approx(ours, abs=1e-3)


def test_the_command_builds_from_a_manifest_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo.arpa"
    command = [sys.executable, "-m", "wavlm_ddp.build_lm", str(ROOT / "recipes/demo_data/train.csv"),
               "--output", str(out), "--order", "2"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    probs, _ = read_arpa(out)
    assert ("SIX",) in probs[1] and len(probs) == 2
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip() == f"error: {out} exists: choose another --output or delete it"
    assert math.isfinite(probs[1][("SIX",)])
