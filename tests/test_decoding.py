"""Beam search with an n-gram LM on made-up emissions, and every bad LM / lexicon
setting stopped with one line before any decoding."""

import sys
import math
from pathlib import Path

import pytest
import torch

from wavlm_ddp.decoding.search import CTCDecoder, check_decoding, search_settings
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.decoding.ngram import build_lm
from wavlm_ddp.data.tokenizer import load_tokenizer, train_tokenizer

SENTENCES = ["THE CAT SEES THE DOG", "THE DOG SEES THE CAT", "A CAT SITS", "THE DOG SITS"]
BEAM = {"mode": "beam", "beam_size": 20, "beam_threshold": 25.0, "lm_weight": 1.0, "word_score": 0.0,
        "lexicon": None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, LM path, folder): a char tokenizer and a 2-gram LM of SENTENCES."""
    folder = tmp_path_factory.mktemp("decoding")
    manifest = folder / "train.csv"
    manifest.write_text("ID,duration,wav,spk_id,wrd\n" + "".join(
        f"u{i},1.0,x.wav,s,{text}\n" for i, text in enumerate(SENTENCES)))
    train_tokenizer(manifest, folder, vocab_size=40, model_type="char")
    lm = build_lm([manifest], folder / "lm.arpa", order=2)
    return load_tokenizer(folder / "tokenizer.model"), lm, folder


def emissions(tokenizer, pieces, confusion=None):
    """Log-probabilities that spell `pieces` (blank between), one frame each; at a
    piece listed in `confusion` the given wrong piece is a little likelier."""
    frames = []
    size = tokenizer.get_piece_size()
    for i, piece in enumerate(pieces):
        for index, weight in ((tokenizer.piece_to_id(piece), 5.0), (0, 5.0)):
            row = torch.full((size,), -3.0)
            row[index] = weight
            if index != 0 and confusion and i in confusion:
                row[tokenizer.piece_to_id(confusion[i])] = weight + 0.5
            frames.append(row)
    return torch.stack(frames).log_softmax(-1)[None]


def test_beam_search_with_the_lm_mends_what_greedy_gets_wrong(setup):
    tokenizer, lm, _ = setup
    pieces = ["▁", "T", "H", "E", "▁", "C", "A", "T", "▁", "S", "E", "E", "S", "▁", "T", "H", "E", "▁", "D", "O", "G"]
    log_probs = emissions(tokenizer, pieces, confusion={6: "O", 19: "A"})  # CAT -> COT, DOG -> DAG
    greedy = CTCDecoder(tokenizer, 0)(log_probs, torch.ones(1))
    beam = CTCDecoder(tokenizer, 0, lm_path=lm, **BEAM)(log_probs, torch.ones(1))
    assert greedy == ["THE COT SEES THE DAG"]
    assert beam == ["THE CAT SEES THE DOG"]


def test_the_decoder_reads_each_utterance_to_its_own_length(setup):
    tokenizer, lm, _ = setup
    short = emissions(tokenizer, ["▁", "A", "▁", "C", "A", "T"])
    long = emissions(tokenizer, ["▁", "T", "H", "E", "▁", "D", "O", "G", "▁", "S", "I", "T", "S"])
    padding = emissions(tokenizer, ["▁", "S", "E", "E", "S", "▁", "A"])  # read, it would add words
    batch = torch.cat([torch.cat([short, padding], dim=1), long])
    decoder = CTCDecoder(tokenizer, 0, lm_path=lm, **BEAM)
    assert decoder(batch, torch.tensor([short.shape[1] / batch.shape[1], 1.0])) == ["A CAT", "THE DOG SITS"]


def write(path, text):
    Path(path).write_text(text)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "lm_path={lm} does not exist and lm_text=None cannot build it"),
        ("not-arpa", "lm_path={lm} is neither an ARPA file"),
        ("lower-case", "3 of the 6 words of {lm} use characters that the training transcripts (the tokenizer) "
                       "do not have (e.g. 'cat', 'dog', 'the')"),
        ("no-lexicon", "test_search: lexicon={lm}.lex does not exist"),
        ("mode", "test_search: mode='viterbi' is not one of greedy, beam"),
        ("beam-size", "test_search: beam_size=0 is not a positive integer"),
    ],
)
def test_a_bad_lm_setting_stops_before_decoding_with_one_line(setup, tmp_path, case, message):
    tokenizer, lm, folder = setup
    search = {**BEAM, "lm_path": lm}
    charset = set("".join(SENTENCES))
    bad_lm = tmp_path / "lm.arpa"
    if case == "missing":
        search["lm_path"] = bad_lm
    elif case == "not-arpa":
        write(bad_lm, "hello\n")
        search["lm_path"] = bad_lm
    elif case == "lower-case":
        write(bad_lm, Path(lm).read_text().replace("\tCAT", "\tcat").replace("\tDOG", "\tdog")
              .replace("\tTHE", "\tthe"))
        search["lm_path"] = bad_lm
    elif case == "no-lexicon":
        search["lexicon"] = f"{bad_lm}.lex"
    elif case == "mode":
        search["mode"] = "viterbi"
    else:
        search["beam_size"] = 0
    with pytest.raises(ConfigError) as error:
        check_decoding(search, None, charset)
    assert message.format(lm=bad_lm) in str(error.value) and "\n" not in str(error.value)


def test_a_lexicon_with_tokens_the_tokenizer_lacks_is_named_by_line(setup, tmp_path):
    tokenizer, lm, _ = setup
    lexicon = write(tmp_path / "words.lex", "CAT C A T\nDOG D O G\nÉTÉ É T É\n")
    with pytest.raises(ConfigError, match=rf"{lexicon}:3: 'ÉTÉ É T É' uses tokens the tokenizer lacks: É É"):
        CTCDecoder(tokenizer, 0, **{**BEAM, "lm_path": lm, "lexicon": lexicon})
    good = write(tmp_path / "good.lex", "CAT C A T\nDOG D O G\n")
    decoder = CTCDecoder(tokenizer, 0, **{**BEAM, "lm_path": None, "lexicon": good})
    assert decoder(emissions(tokenizer, ["▁", "D", "O", "G"]), torch.ones(1)) == ["DOG"]


def test_a_kenlm_binary_needs_a_lexicon_and_an_lm_in_another_alphabet_is_refused_at_build(setup, tmp_path):
    tokenizer, lm, _ = setup
    binary = write(tmp_path / "lm.bin", "mmap lm http://kheafield.com/code format version 5\n")
    with pytest.raises(ConfigError, match="is a KenLM binary, whose words cannot be listed: set test_search: lexicon"):
        CTCDecoder(tokenizer, 0, **{**BEAM, "lm_path": binary})
    other = write(tmp_path / "other.arpa", Path(lm).read_text().replace("\tCAT", "\tKAT"))
    with pytest.raises(ConfigError, match=r"1 of the 6 words of .*other.arpa use characters the tokenizer cannot "
                                          r"encode \(e.g. 'KAT'\)"):
        CTCDecoder(tokenizer, 0, **{**BEAM, "lm_path": other})


def test_tuned_weights_replace_the_yaml_ones(tmp_path):
    tuned = write(tmp_path / "decoding.yaml", "lm_weight: 1.5\nword_score: -1.0\nvalid_WER: 3.0\n")
    settings = search_settings({**BEAM, "lm_path": "x"}, tuned)
    assert (settings["lm_weight"], settings["word_score"], settings["beam_size"]) == (1.5, -1.0, 20)
    assert search_settings(BEAM, tmp_path / "absent.yaml") == BEAM
    assert math.isfinite(settings["lm_weight"])


def test_beam_search_without_flashlight_installed_stops_before_training_naming_the_extra(setup, monkeypatch):
    tokenizer, lm, folder = setup
    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"mode=beam needs flashlight-text.*\.\[lm\].*mode: greedy"):
        check_decoding({**BEAM, "lm_path": lm}, None, set("".join(SENTENCES)))
    check_decoding({**BEAM, "mode": "greedy"}, None, set())  # greedy needs no decoder
