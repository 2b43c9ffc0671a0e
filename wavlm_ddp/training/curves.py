"""Per-epoch history of a run, and its plot (main process only).

The history lives in `<output_folder>/history.json`, one record per epoch, so a
resumed run keeps the curves of the epochs before the restart. Both files are
written beside and renamed over the old ones: a write that fails leaves them as
they were.
"""

import json
from pathlib import Path


def append_history(path, record):
    """Add (or replace, when an epoch is repeated after a restart) one epoch's record."""
    path = Path(path)
    try:
        history = json.loads(path.read_text()) if path.exists() else []
    except ValueError:  # emptied or cut by a crash: kept aside, and the history starts again from here
        path.replace(path.with_suffix(".json.unreadable"))
        history = []
    history = [r for r in history if r["epoch"] != record["epoch"]] + [record]
    history.sort(key=lambda r: r["epoch"])
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(history, indent=1))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # what a failed write (a full disk) left; the history stays as it was
    return history


def plot_history(history, png_path):
    """Train and valid loss, valid WER / CER, and the learning rates per epoch.
    Drawn on a bare Figure (no pyplot, no display backend: training nodes have none),
    imported here: only the main process draws, once per epoch."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(13, 3.6))
    loss_ax, wer_ax, lr_ax = fig.subplots(1, 3)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    loss_ax.plot(epochs, [r["valid_loss"] for r in history], "o-", label="valid")
    loss_ax.set(title="CTC loss", xlabel="epoch")
    loss_ax.legend()
    wer_ax.plot(epochs, [r["valid_WER"] for r in history], "o-", label="WER")
    wer_ax.plot(epochs, [r["valid_CER"] for r in history], "o-", label="CER")
    wer_ax.set(title="valid error rate (%)", xlabel="epoch")
    wer_ax.legend()
    for name in sorted({k for r in history for k in r if k.startswith("lr_")}):
        lr_ax.plot(epochs, [r.get(name) for r in history], "o-", label=name[3:])
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    lr_ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(png_path)
    finally:
        tmp.unlink(missing_ok=True)  # what a failed write (a full disk) left; the plot stays as it was
