"""Data preparation (fake LibriSpeech tree), the tokenizer, and the bundled corpus."""

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from recipes.prepare_librispeech import prepare_librispeech
from wavlm_ddp.data.tokenizer import load_tokenizer, train_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo_data"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_librispeech(root, layout):
    """layout: {subset: {(speaker, chapter): [(utterance number, words, seconds)]}}"""
    rng = np.random.default_rng(0)
    for subset, chapters in layout.items():
        for (speaker, chapter), utts in chapters.items():
            folder = root / subset / str(speaker) / str(chapter)
            folder.mkdir(parents=True)
            lines = []
            for number, words, seconds in utts:
                utt_id = f"{speaker}-{chapter}-{number:04d}"
                sf.write(folder / f"{utt_id}.flac", rng.standard_normal(int(seconds * 16000)) * 0.1, 16000)
                lines.append(f"{utt_id} {words}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    make_librispeech(root, {
        "train-clean-100": {(19, 198): [(0, "HELLO WORLD", 1.0), (1, "GOOD MORNING", 0.5)],
                            (26, 495): [(3, "A SHORT ONE", 0.25)]},
        "train-clean-360": {(100, 7): [(0, "MORE DATA", 0.75)]},
        "dev-clean": {(84, 121): [(2, "VALIDATION", 0.5)]},
        "test-other": {(367, 130): [(1, "TESTING", 1.5)]},
    })
    return root


def test_librispeech_tree_becomes_manifests(fake_librispeech, tmp_path):
    out = tmp_path / "manifests"
    prepare_librispeech(fake_librispeech, out, ["train-clean-100", "train-clean-360"], ["dev-clean", "test-other"])
    train = read_csv(out / "train.csv")
    assert [r["ID"] for r in train] == ["19-198-0000", "19-198-0001", "26-495-0003", "100-7-0000"]
    first = train[0]
    assert first["wrd"] == "HELLO WORLD" and first["spk_id"] == "19"
    assert float(first["duration"]) == pytest.approx(1.0)
    assert Path(first["wav"]).is_file()
    assert [r["wrd"] for r in read_csv(out / "test-other.csv")] == ["TESTING"]
    assert [r["ID"] for r in read_csv(out / "dev-clean.csv")] == ["84-121-0002"]
    assert not list(out.glob("*.tmp"))


def test_librispeech_preparation_is_skipped_when_done(fake_librispeech, tmp_path):
    out = tmp_path / "manifests"
    prepare_librispeech(fake_librispeech, out, ["train-clean-100"], ["dev-clean"])
    (out / "train.csv").write_text("ID,duration,wav,spk_id,wrd\nkept,1,x,y,Z\n")
    prepare_librispeech(fake_librispeech, out, ["train-clean-100"], ["dev-clean"])
    assert read_csv(out / "train.csv")[0]["ID"] == "kept"


def test_a_missing_librispeech_subset_names_the_folder_and_the_key(fake_librispeech, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-other-500.*set data_folder"):
        prepare_librispeech(fake_librispeech, tmp_path / "m", ["train-other-500"], ["dev-clean"])


@pytest.mark.parametrize("model_type,vocab_size", [("char", 40), ("unigram", 50)])
def test_tokenizer_round_trips_the_training_text(tmp_path, model_type, vocab_size):
    model = train_tokenizer(DEMO / "train.csv", tmp_path, vocab_size, model_type)
    tokenizer = load_tokenizer(model)
    assert tokenizer.id_to_piece(0) == "<unk>"  # the CTC blank
    for row in read_csv(DEMO / "test.csv"):
        ids = tokenizer.encode_as_ids(row["wrd"])
        assert 0 not in ids
        assert tokenizer.decode_ids(ids) == row["wrd"]
    if model_type == "char":
        assert tokenizer.vocab_size() == len(set("".join(r["wrd"] for r in read_csv(DEMO / "train.csv")))) + 1
    else:
        assert tokenizer.vocab_size() == vocab_size


def test_tokenizer_is_trained_once(tmp_path):
    model = train_tokenizer(DEMO / "train.csv", tmp_path, 40, "char")
    before = model.stat().st_mtime_ns
    train_tokenizer(DEMO / "train.csv", tmp_path, 40, "char")
    assert model.stat().st_mtime_ns == before


def test_demo_corpus_is_real_mono_speech_with_disjoint_splits():
    splits = {name: read_csv(DEMO / f"{name}.csv") for name in ("train", "valid", "test")}
    sentences = {name: {r["wrd"] for r in rows} for name, rows in splits.items()}
    assert not sentences["train"] & sentences["valid"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["valid"] & sentences["test"]
    for rows in splits.values():
        for row in rows[:20]:
            audio, rate = sf.read(row["wav"].replace("$data_root", str(DEMO)))
            assert rate == 8000 and audio.ndim == 1  # stored at 8 kHz, resampled on load
            assert len(audio) / rate == pytest.approx(float(row["duration"]), abs=0.01)
            assert np.abs(audio).max() > 0.05  # not silence
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024


@pytest.mark.parametrize("sets", [["/d/test.csv"], ["/d/a b.csv"], [None], ["/d/train_text.csv"],
                                  ["/a/other.csv", "/b/other.csv"], {"other": "/d/other.csv"}])
def test_a_more_test_sets_entry_that_is_no_manifest_of_its_own_is_one_line(sets):
    from wavlm_ddp.data.pipeline import add_test_sets
    from wavlm_ddp.preflight import ConfigError

    hparams = {"more_test_sets": sets, "train_text_data": None, "train_text_csv": "other.csv"}
    with pytest.raises(ConfigError, match=r"^more_test_sets.* set --more_test_sets='\[/data/test-other.csv\]'"):
        add_test_sets(hparams)


def test_more_test_sets_become_splits_named_by_their_files_and_read_like_test():
    from wavlm_ddp.data.pipeline import add_test_sets, splits

    hparams = {"more_test_sets": ["/data/test-other.csv"]}
    add_test_sets(hparams)
    assert splits(hparams) == ("train", "valid", "test", "test-other")
    assert hparams["test-other_csv"] == "/data/test-other.csv"
