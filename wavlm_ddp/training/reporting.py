"""What a run reports: the epoch line (with the history, its plot and TensorBoard),
the test line(s) and wer_test.txt, one train_steps.csv row per optimizer step, and
the statistics gathered from every rank that these need."""

import csv
import resource
from pathlib import Path

import torch
from speechbrain.utils.distributed import if_main_process

from wavlm_ddp.training.curves import append_history, plot_history


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


def append_step_row(path, step, epoch, optimizers, encoder_frozen, loss):
    """One row of `train_steps_file`: the step the schedules used, its learning
    rates, whether the encoder trained, rank 0's loss (the header first)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "epoch", *(f"lr_{n}" for n in optimizers), "encoder_frozen", "loss_rank0"])
        writer.writerow([step, epoch, *(f"{o.param_groups[0]['lr']:.6e}" for o in optimizers.values()),
                         int(encoder_frozen), f"{float(loss):.4f}"])


def report_epoch(brain, epoch, stats, lrs):
    """The epoch line, the history and its plot, and TensorBoard (main process)."""
    train = brain.train_stats
    lr_text = ", ".join(f"{name[3:]} {lr:.1e}" for name, lr in lrs.items())
    print(f"epoch {epoch}: train loss {train['loss']}, valid loss {stats['loss']}, valid CER "
          f"{stats['CER']} %, WER {stats['WER']} %, lr {lr_text}, {train['audio_s_per_s']} audio-s/s, "
          f"peak mem {train['peak_mem_GiB']} GiB (optimizer step {brain.optimizer_step})", flush=True)
    record = {"epoch": epoch, "train_loss": train["loss"], **{f"valid_{k}": v for k, v in stats.items()},
              **lrs, "audio_s_per_s": train["audio_s_per_s"], "peak_mem_GiB": train["peak_mem_GiB"]}
    output = Path(brain.hparams.output_folder)
    history = append_history(output / "history.json", record)
    plot_history(history, output / "training_curves.png")
    if brain.hparams.use_tensorboard:
        brain.tensorboard.log_stats({"epoch": epoch, **lrs}, train_stats=train, valid_stats=stats)


def report_test(brain, stats):
    """The test line(s): greedy, and the test_search decoding when it is a beam
    search, with its decoding time; wer_test.txt holds the best decoding's details.
    Every rank calls it (the decoding time is summed over ranks)."""
    details = brain.wer_metric
    line = f"test WER {stats['WER']} %, CER {stats['CER']} %, greedy"
    if brain.searching:
        decoder = brain.test_decoder
        decode_seconds, audio = global_sum(brain.decode_seconds), global_sum(brain.test_audio_seconds)
        stats.update({"search_WER": round(brain.search_wer.summarize("error_rate"), 2),
                      "search_CER": round(brain.search_cer.summarize("error_rate"), 2),
                      "decode_seconds": round(decode_seconds, 2)})
        lm = "LM " + Path(decoder.lm_path).name if decoder.lm_path else "no LM"
        line += (f"\ntest WER {stats['search_WER']} %, CER {stats['search_CER']} %, beam search "
                 f"{decoder.beam_size} + {lm} (lm_weight {decoder.lm_weight:g}, word_score "
                 f"{decoder.word_score:g}): decoding {decode_seconds:.2f} s for {audio:.0f} s of "
                 f"audio (real-time factor {decode_seconds / max(audio, 1e-9):.4f})")
        details = brain.search_wer
    brain.hparams.train_logger.log_stats(
        stats_meta={"Epoch loaded": brain.hparams.epoch_counter.current}, test_stats=stats
    )
    if if_main_process():
        with open(brain.hparams.test_wer_file, "w") as w:
            details.write_stats(w)
        print(f"{line}\ndetails in {brain.hparams.test_wer_file}", flush=True)
    brain.test_stats = stats
