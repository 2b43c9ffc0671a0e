"""What a run reports: the epoch line (with train_log, the history, its plot and
TensorBoard), the test line(s) and wer_test.txt, one train_steps.csv row per
optimizer step, and the statistics gathered from every rank that these need.

The main process writes every file, and every rank calls each report: a write
that fails there (a full disk) becomes the same one-line error on every rank,
through one broadcast that every rank reaches (on_main_process), instead of a
traceback on the main process while the others wait in their next collective.
"""

import csv
import errno
import os
import resource
from contextlib import contextmanager
from pathlib import Path

import torch
from wavlm_ddp.distributed import on_main_process
from wavlm_ddp.preflight import ConfigError
from wavlm_ddp.training.curves import append_history, plot_history


class WriteFailed(ConfigError):
    """A file write of the main process failed; the message is the line every rank raises
    (distributed.on_main_process)."""


@contextmanager
def writing(path):
    """Turn an OSError of the writes inside (ENOSPC, a quota, an I/O error) into
    WriteFailed, naming `path` and the fix for that error."""
    try:
        yield
    except OSError as error:
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free space" if full else "make it writable"
        raise WriteFailed(
            f"could not write {path} ({error.strerror or error}); the checkpoints saved so far are intact: {fix} "
            "(or set another --output_folder), then rerun the same command to resume from the last checkpoint"
        ) from error


@contextmanager
def appending(path):
    """`writing(path)` for a file that grows by appends: what a failed append wrote is
    cut off again (part of a line would merge with the line that the rerun appends)."""
    path = Path(path)
    with writing(path):
        size = path.stat().st_size if path.exists() else 0
        try:
            yield
        except OSError:
            _cut_back(path, size)
            raise


def global_sum(value):
    """`value` summed over all ranks."""
    if not torch.distributed.is_initialized():
        return value
    total = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(total, value)
    return sum(total)


def peak_memory_gib(device_type):
    """Peak GPU memory of this process on CUDA, else its peak resident memory."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gather_eval_stats(metrics, loss_sum, count):
    """Merge the error-rate statistics of every rank into `metrics` (in place: the
    evaluation was sharded) and return the per-utterance mean loss over all ranks."""
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        local = [(m.ids, m.scores) for m in metrics] + [(loss_sum, count)]
        torch.distributed.all_gather_object(gathered, local)
        for i, metric in enumerate(metrics):
            metric.ids = [x for rank in gathered for x in rank[i][0]]
            metric.scores = [x for rank in gathered for x in rank[i][1]]
        loss_sum = sum(rank[-1][0] for rank in gathered)
        count = sum(rank[-1][1] for rank in gathered)
    return loss_sum / max(count, 1)


def append_step_row(path, step, epoch, optimizers, encoder_frozen, loss, fingerprint=0):
    """One row of `train_steps_file`: the step the schedules used, its learning
    rates, whether the encoder trained, rank 0's loss, and the fingerprint of the
    step's global batch (the sum of its utterance IDs' CRC-32, NonFiniteGuard.agree:
    equal rows, equal utterances, on any world size); the header first. Every rank
    calls it, the main process writes (one broadcast of a few bytes a step)."""
    path = Path(path)

    def write():
        with appending(path):
            new = not path.exists() or path.stat().st_size == 0  # an empty file: a first row that failed
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "epoch", *(f"lr_{n}" for n in optimizers), "encoder_frozen",
                                     "loss_rank0", "batch_ids_crc_sum"])
                writer.writerow([step, epoch, *(f"{o.param_groups[0]['lr']:.6e}" for o in optimizers.values()),
                                 int(encoder_frozen), f"{float(loss):.4f}", fingerprint])

    on_main_process(write)


def _cut_back(path, size):
    """Truncate `path` to `size` bytes where it is a regular file, as far as possible."""
    try:
        if path.is_file():
            os.truncate(path, size)
    except OSError:
        pass


def report_epoch(brain, epoch, stats, lrs):
    """The epoch line, train_log, the history and its plot, and TensorBoard. Every
    rank calls it, the main process writes (on_main_process)."""
    train = brain.train_stats
    hparams = brain.hparams
    lr_text = ", ".join(f"{name[3:]} {lr:.1e}" for name, lr in lrs.items())
    record = {"epoch": epoch, "train_loss": train["loss"], **{f"valid_{k}": v for k, v in stats.items()},
              **lrs, "audio_s_per_s": train["audio_s_per_s"], "peak_mem_GiB": train["peak_mem_GiB"]}
    output = Path(hparams.output_folder)

    def write():
        print(f"epoch {epoch}: train loss {train['loss']}, valid loss {stats['loss']}, valid CER "
              f"{stats['CER']} %, WER {stats['WER']} %, lr {lr_text}, {train['audio_s_per_s']} audio-s/s, "
              f"peak mem {train['peak_mem_GiB']} GiB (optimizer step {brain.optimizer_step})", flush=True)
        with appending(hparams.train_logger.save_file):
            hparams.train_logger.log_stats(stats_meta={"epoch": epoch, **lrs}, train_stats=train,
                                           valid_stats=stats)
        with writing(output / "history.json"):
            history = append_history(output / "history.json", record)
        with writing(output / "training_curves.png"):
            plot_history(history, output / "training_curves.png")
        if hparams.use_tensorboard:
            with writing(hparams.tensorboard_folder):
                # SummaryWriter itself, with the epoch as the step: SpeechBrain's TensorboardLogger counts
                # from 1 in each process, so a resumed run would log its epochs over the first ones.
                for group, values in (("train", train), ("valid", stats)):
                    for name, value in values.items():
                        brain.tensorboard.add_scalar(f"{name}/{group}", value, epoch)
                for name, lr in lrs.items():
                    brain.tensorboard.add_scalar(name, lr, epoch)
                brain.tensorboard.flush()  # the event writer's thread raises its write errors here

    on_main_process(write)


def report_test(brain, stats):
    """The test line(s): greedy, and the test_search decoding when it is a beam
    search, with its decoding time; wer_test.txt holds the best decoding's details.
    Every rank calls it (the decoding time is summed over ranks); the main process
    writes (on_main_process)."""
    details = brain.wer_metric
    name = getattr(brain, "test_set", "test")  # "test", or one of the more_test_sets
    wer_file = Path(brain.hparams.test_wer_file)
    if name != "test":
        wer_file = wer_file.with_name(f"wer_{name}.txt")
    line = f"{name} WER {stats['WER']} %, CER {stats['CER']} %, greedy"
    if brain.searching:
        decoder = brain.test_decoder
        decode_seconds, audio = global_sum(brain.decode_seconds), global_sum(brain.test_audio_seconds)
        stats.update({"search_WER": round(brain.search_wer.summarize("error_rate"), 2),
                      "search_CER": round(brain.search_cer.summarize("error_rate"), 2),
                      "decode_seconds": round(decode_seconds, 2)})
        words, oov = global_sum(brain.test_words), global_sum(brain.test_oov)
        stats["OOV_percent"] = round(100 * oov / max(words, 1), 2)
        lm = "LM " + Path(decoder.lm_path).name if decoder.lm_path else "no LM"
        line += (f"\n{name} WER {stats['search_WER']} %, CER {stats['search_CER']} %, beam search "
                 f"{decoder.beam_size} + {lm} (lm_weight {decoder.lm_weight:g}, word_score "
                 f"{decoder.word_score:g}; {stats['OOV_percent']:g} % of the {name} words are not in its "
                 f"lexicon): decoding {decode_seconds:.2f} s for {audio:.0f} s of "
                 f"audio (real-time factor {decode_seconds / max(audio, 1e-9):.4f})")
        details = brain.search_wer

    def write():
        with appending(brain.hparams.train_logger.save_file):
            brain.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": brain.hparams.epoch_counter.current, "test set": name}, test_stats=stats
            )
        with writing(wer_file):
            with open(wer_file, "w") as w:
                details.write_stats(w)
        print(f"{line}\ndetails in {wer_file}", flush=True)

    on_main_process(write)
    brain.test_stats = stats
