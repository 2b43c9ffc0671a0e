"""LibriSpeech (an extracted tree: <subset>/<speaker>/<chapter>/*.flac + *.trans.txt)
into SpeechBrain CSV manifests: ID, duration, wav, spk_id, wrd.

Runs on the main process only (train.py calls it through run_on_main) and is
skipped when every manifest already exists. Bring your own data instead: write
the same five columns (wav may use $data_root) and point train_csv / valid_csv /
test_csv at them.
"""

import csv
import logging
from pathlib import Path

import soundfile as sf

logger = logging.getLogger(__name__)
COLUMNS = ["ID", "duration", "wav", "spk_id", "wrd"]


def prepare_librispeech(data_folder, save_folder, train_splits, other_splits):
    """Write `<save_folder>/train.csv` with the `train_splits` subsets together
    (e.g. train-clean-100, train-clean-360), and `<save_folder>/<split>.csv` for
    each subset of `other_splits` (e.g. dev-clean, test-other)."""
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    targets = [save_folder / "train.csv"] + [save_folder / f"{split}.csv" for split in other_splits]
    if all(t.exists() for t in targets):
        logger.info(f"LibriSpeech manifests found in {save_folder}, preparation skipped")
        return
    save_folder.mkdir(parents=True, exist_ok=True)
    merged = []
    for split in list(train_splits) + list(other_splits):
        split_dir = data_folder / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"LibriSpeech subset {split_dir} not found: set data_folder to the folder that "
                f"holds {split}/ (the extracted LibriSpeech/), or remove {split} from the splits"
            )
        rows = list(_split_rows(split_dir))
        logger.info(f"{split}: {len(rows)} utterances, {sum(float(r['duration']) for r in rows) / 3600:.1f} h")
        if split in train_splits:
            merged.extend(rows)
        else:
            _write_csv(save_folder / f"{split}.csv", rows)
    _write_csv(save_folder / "train.csv", merged)


def _split_rows(split_dir):
    for trans in sorted(split_dir.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            if not line.strip():
                continue
            utt_id, _, words = line.partition(" ")
            audio = trans.parent / f"{utt_id}.flac"
            info = sf.info(str(audio))
            yield {
                "ID": utt_id,
                "duration": f"{info.frames / info.samplerate:.3f}",
                "wav": str(audio),
                "spk_id": utt_id.split("-")[0],
                "wrd": words.strip().upper(),
            }


def _write_csv(path, rows):
    """Write through a temporary file so an interrupted run leaves no partial manifest."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
