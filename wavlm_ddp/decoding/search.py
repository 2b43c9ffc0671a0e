"""CTC decoding: greedy, or beam search with a word n-gram LM (torchaudio's
flashlight-text decoder, C++, reads ARPA and KenLM binary models).

Configured by a YAML block (`test_search`):

    mode: beam            # greedy or beam
    beam_size: 50         # hypotheses kept per frame
    beam_threshold: 25.0  # pruning: drop hypotheses this far (log score) below the best
    lm_path: lm.arpa      # ARPA or KenLM binary; null: beam search without LM
    lm_weight: 2.0        # LM log-probability weight
    word_score: 0.0       # added per word (counters the LM's preference for few words)
    lexicon: null         # "WORD t o k e n s" lines; null: the LM's words spelled by the tokenizer

The search is constrained to the lexicon's words (flashlight's lexicon decoder), so a
word the lexicon lacks cannot be output: the LM's vocabulary must cover the language
(LibriSpeech's official LM has 200,000 words). Every file is checked before any
decoding, with one-line errors that name the file and the fix.
"""

import math
from pathlib import Path

import speechbrain as sb
import torch
import yaml

from wavlm_ddp.preflight import ConfigError

SEARCH_MODES = ("greedy", "beam")
KENLM_BINARY_MAGIC = b"mmap lm "
LM_SPECIALS = ("<s>", "</s>", "<unk>")
BLANK = "<blank>"  # the name given to the CTC blank in the decoder's token list
SILENCE = "\u2581"  # SentencePiece's word boundary piece


def arpa_words(path):
    """The unigrams of an ARPA file (specials excluded); None for a KenLM binary."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(KENLM_BINARY_MAGIC))
    if head == KENLM_BINARY_MAGIC:
        return None
    words, in_unigrams, seen_data = [], False, False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line == "\\data\\":
                seen_data = True
            elif line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams and line.startswith("\\"):
                break
            elif in_unigrams and line:
                fields = line.split("\t") if "\t" in line else line.split()
                if len(fields) >= 2 and fields[1] not in LM_SPECIALS:
                    words.append(fields[1])
    if not seen_data or not words:
        raise ConfigError(f"lm_path={path} is neither an ARPA file (no \\data\\ section or no unigrams) nor a "
                          "KenLM binary: build one with python -m wavlm_ddp.build_lm, or set lm_path: null")
    return words


def spell(word, tokenizer):
    """The tokenizer's pieces for `word`, without a lone word-boundary piece."""
    return [p for p in tokenizer.encode_as_pieces(word) if p != SILENCE]


def lexicon_from_words(words, tokenizer, source):
    """{word: spelling}; a word with characters the tokenizer cannot encode is an error."""
    pieces = {tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())}
    bad = [w for w in words if any(p not in pieces or tokenizer.piece_to_id(p) == 0 for p in spell(w, tokenizer))]
    if bad:
        raise ConfigError(f"{len(bad)} of the {len(words)} words of {source} use characters the tokenizer "
                          f"cannot encode (e.g. {', '.join(repr(w) for w in bad[:3])}): build the LM from text "
                          "in the transcripts' alphabet and case (python -m wavlm_ddp.build_lm)")
    return {w: spell(w, tokenizer) for w in words}


def read_lexicon(path, tokenizer):
    """{word: spelling} from "WORD t o k e n s" lines; unknown tokens are an error."""
    pieces = {tokenizer.id_to_piece(i) for i in range(1, tokenizer.get_piece_size())}
    lexicon = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"lexicon={path} cannot be read ({error}): fix the path in test_search") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        unknown = [t for t in fields[1:] if t not in pieces]
        if len(fields) < 2 or unknown:
            raise ConfigError(f"{path}:{number}: {line.strip()!r} "
                              + (f"uses tokens the tokenizer lacks: {' '.join(unknown)}" if unknown
                                 else "has no spelling") + "; lines are 'WORD t o k e n s' in the tokenizer's pieces")
        lexicon.setdefault(fields[0], fields[1:])
    if not lexicon:
        raise ConfigError(f"lexicon={path} has no entries: fix it, or set lexicon: null")
    return lexicon


def check_search(search):
    """The settings alone (before the tokenizer exists): one line per problem."""
    mode = search.get("mode")
    if mode not in SEARCH_MODES:
        raise ConfigError(f"test_search: mode={mode!r} is not one of {', '.join(SEARCH_MODES)}")
    if mode == "greedy":
        return
    for key in ("beam_size",):
        value = search.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"test_search: {key}={value!r} is not a positive integer: set it to 50, for example")
    for key in ("beam_threshold", "lm_weight", "word_score"):
        value = search.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"test_search: {key}={value!r} is not a number")


def check_decoding(search, lm_text, charset, lm_url=None):
    """Before training: the settings, the LM file (or the text to build it from, or the
    URL to fetch it from), the LM's words against the training transcripts' characters,
    the lexicon file."""
    check_search(search)
    if search["mode"] == "greedy":
        return
    try:
        import flashlight.lib.text.decoder  # noqa: F401 - the beam search's decoder
    except ImportError:
        raise ConfigError("test_search: mode=beam needs flashlight-text, which is not installed: "
                          "pip install -e '.[lm]' (or flashlight-text), or set --test_search='{mode: greedy}'") from None
    lm_path, lexicon = search.get("lm_path"), search.get("lexicon")
    if lexicon is not None and not Path(lexicon).is_file():
        raise ConfigError(f"test_search: lexicon={lexicon} does not exist: fix the path, or set it to null")
    if lm_path is None:
        if lexicon is None:
            raise ConfigError("test_search: beam search without lm_path needs a lexicon (the words it may "
                              "output): set lexicon, or lm_path")
        return
    if not Path(lm_path).is_file():
        if lm_url:
            return  # fetched before training; its words are checked when the decoder reads them
        if lm_text is None or not Path(lm_text).is_file():
            raise ConfigError(f"lm_path={lm_path} does not exist and lm_text={lm_text} cannot build it: point "
                              "lm_path at an ARPA or KenLM binary file, set lm_text to a manifest or text file, "
                              "or set test_search: mode=greedy")
        return
    try:
        words = arpa_words(lm_path)
    except OSError as error:
        raise ConfigError(f"lm_path={lm_path} cannot be read ({error}): fix its permissions or the path") from None
    bad = [w for w in words or [] if set(w) - set(charset)]
    if bad:
        raise ConfigError(f"{len(bad)} of the {len(words)} words of {lm_path} use characters that the training "
                          f"transcripts (the tokenizer) do not have (e.g. {', '.join(repr(w) for w in bad[:3])}): "
                          "use an LM in the transcripts' alphabet and case (python -m wavlm_ddp.build_lm)")


def search_settings(test_search, tuned_file):
    """`test_search` with the LM weight and word score of `tuned_file` (written by
    tune_decoding.py) when it exists."""
    settings = dict(test_search)
    if tuned_file is not None and Path(tuned_file).is_file():
        tuned = yaml.safe_load(Path(tuned_file).read_text()) or {}
        settings.update({k: tuned[k] for k in ("lm_weight", "word_score") if k in tuned})
    return settings


class CTCDecoder:
    """Transcripts from CTC log-probabilities: greedy, or beam search with an LM."""

    def __init__(self, tokenizer, blank_index, mode="greedy", beam_size=50, beam_threshold=25.0, lm_path=None,
                 lm_weight=2.0, word_score=0.0, lexicon=None):
        check_search({"mode": mode, "beam_size": beam_size, "beam_threshold": beam_threshold,
                      "lm_weight": lm_weight, "word_score": word_score})
        self.tokenizer, self.blank_index, self.mode = tokenizer, blank_index, mode
        self.lm_weight, self.word_score, self.lm_path = lm_weight, word_score, lm_path
        self.beam_size, self.beam_threshold = beam_size, beam_threshold
        if mode == "greedy":
            return
        if lm_path is not None and not Path(lm_path).is_file():
            raise ConfigError(f"lm_path={lm_path} does not exist: build it with python -m wavlm_ddp.build_lm, "
                              "point test_search: lm_path at an ARPA or KenLM binary file, or set it to null")
        if lexicon is not None:
            words = read_lexicon(lexicon, tokenizer)
        elif lm_path is not None:
            lm_vocab = arpa_words(lm_path)
            if lm_vocab is None:
                raise ConfigError(f"lm_path={lm_path} is a KenLM binary, whose words cannot be listed: set "
                                  "test_search: lexicon to a 'WORD t o k e n s' file")
            words = lexicon_from_words(lm_vocab, tokenizer, lm_path)
        else:
            raise ConfigError("test_search: beam search without lm_path needs a lexicon (the words it may "
                              "output): set lexicon, or lm_path")
        self.lexicon = words  # {word: spelling}: the words the search may output
        self._build(words, lm_path, beam_size, beam_threshold)

    def _build(self, lexicon, lm_path, beam_size, beam_threshold):
        from flashlight.lib.text.decoder import SmearingMode, Trie, ZeroLM
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary

        tokenizer = self.tokenizer
        self.tokens = Dictionary()
        for i in range(tokenizer.get_piece_size()):
            self.tokens.add_entry(BLANK if i == self.blank_index else tokenizer.id_to_piece(i))
        self.words = Dictionary()
        for entry in (*LM_SPECIALS, *lexicon):
            self.words.add_entry(entry)
        self.lm = KenLM(str(lm_path), self.words) if lm_path is not None else ZeroLM()
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
        self.silence = pieces.index(SILENCE) if SILENCE in pieces else self.blank_index
        self.trie = Trie(self.tokens.index_size(), self.silence)
        start = self.lm.start(False)
        for word, spelling in lexicon.items():
            index = self.words.get_index(word)
            _, score = self.lm.score(start, index)
            self.trie.insert([self.tokens.get_index(t) for t in spelling], index, score)
        self.trie.smear(SmearingMode.MAX)
        self.set_weights(self.lm_weight, self.word_score)

    def set_weights(self, lm_weight, word_score):
        """(Re)build the search with these LM weight and word score; the lexicon
        and the LM are kept (the tuning command tries many pairs)."""
        from flashlight.lib.text.decoder import CriterionType, LexiconDecoder, LexiconDecoderOptions

        self.lm_weight, self.word_score = lm_weight, word_score
        options = LexiconDecoderOptions(
            beam_size=self.beam_size, beam_size_token=self.tokens.index_size(), beam_threshold=self.beam_threshold,
            lm_weight=lm_weight, word_score=word_score, unk_score=-math.inf, sil_score=0.0, log_add=False,
            criterion_type=CriterionType.CTC,
        )
        self.decoder = LexiconDecoder(options, self.trie, self.lm, self.silence, self.blank_index,
                                      self.words.get_index("<unk>"), [], False)

    def __call__(self, log_probs, wav_lens):
        """Transcripts (words joined by single spaces) of a padded batch."""
        if self.mode == "greedy":
            hyps = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=self.blank_index)
            return [" ".join(self.tokenizer.decode_ids(h).split()) for h in hyps]
        emissions = log_probs.detach().float().cpu()
        lengths = torch.round(wav_lens.detach().cpu() * emissions.shape[1]).int().tolist()
        texts = []
        for i, frames in enumerate(lengths):
            utterance = emissions[i, :frames].contiguous()  # alive while the C++ decoder reads it
            results = self.decoder.decode(utterance.data_ptr(), frames, utterance.shape[1])
            words = [self.words.get_entry(w) for w in results[0].words if w >= 0] if results else []
            texts.append(" ".join(w for w in words if w not in LM_SPECIALS))
        return texts
