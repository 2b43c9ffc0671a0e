"""The Brain's training step on one process: head warm-up with a frozen encoder,
the learning-rate schedule, and a skipped non-finite step."""

import functools

import pytest
import speechbrain as sb
import torch

from wavlm_ddp.faults.checkpoints import SafeCheckpointer
from wavlm_ddp.training.schedule import TrainingPlan, learning_rate
from train import ASR
from wavlm_wrapper import SpeechEncoder

LR = {"peak": 0.01, "warmup": 0.2, "hold": 0.0, "final_ratio": 0.1, "decay": "cosine"}


@pytest.fixture
def brain(tiny_wavlm_dir, tmp_path):
    wavlm = SpeechEncoder(str(tiny_wavlm_dir), freeze="cnn", hidden_dropout=0.0, attention_dropout=0.0)
    head = sb.nnet.linear.Linear(input_size=wavlm.output_size, n_neurons=6)
    hparams = {
        "freeze_encoder": 0.2, "train_steps_file": tmp_path / "steps.csv", "log_softmax": sb.nnet.activations.Softmax(apply_log=True),
        "blank_index": 0, "lr": {"wavlm": LR, "head": LR}, "layerdrop_check_interval": 0,
        "sample_rate": 16000, "fused_optimizer": False, "use_tensorboard": False,
        "wavlm_opt_class": functools.partial(torch.optim.SGD, lr=LR["peak"]),
        "head_opt_class": functools.partial(torch.optim.SGD, lr=LR["peak"]),
        "epoch_counter": sb.utils.epoch_loop.EpochCounter(1),
    }
    asr = ASR(modules={"wavlm": wavlm, "ctc_head": head}, hparams=hparams,
              run_opts={"device": "cpu", "max_grad_norm": 5.0, "nonfinite_patience": 1},
              checkpointer=SafeCheckpointer(tmp_path))
    asr.plan = TrainingPlan(world_size=1, accumulation=1, per_rank_seconds=1.0, global_seconds=1.0,
                            steps_per_epoch=[10], mean_step_seconds=1.0)
    asr.on_fit_start()
    asr.on_stage_start(sb.Stage.TRAIN, epoch=1)
    return asr


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = [{"id": f"u{i}", "sig": torch.randn(6400, generator=gen), "wrd": "A B",
                 "tokens": torch.randint(1, 6, (4,), generator=gen)} for i in range(2)]
    return sb.dataio.batch.PaddedBatch(examples)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def changed(before, module):
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p)}


def test_the_encoder_stays_frozen_while_the_head_warms_up(brain):
    encoder, head = snapshot(brain.modules.wavlm), snapshot(brain.modules.ctc_head)
    for step in range(2):
        brain.step += 1
        brain.fit_batch(make_batch(step))
    assert changed(encoder, brain.modules.wavlm) == set()
    assert changed(head, brain.modules.ctc_head) == set(head)
    brain.step += 1
    brain.fit_batch(make_batch(2))
    assert changed(encoder, brain.modules.wavlm)  # step 3: the encoder trains too
    assert brain.optimizer_step == 3


def test_the_learning_rate_follows_warmup_then_annealing(brain):
    seen = []
    for step in range(4):
        brain.step += 1
        brain.fit_batch(make_batch(step))
        seen.append(brain.optimizers_dict["head"].param_groups[0]["lr"])
    assert seen == [learning_rate(s, 10, **LR) for s in range(4)]
    assert seen[0] < seen[1] == LR["peak"] > seen[3]
    assert learning_rate(10, 10, **LR) == pytest.approx(LR["peak"] * LR["final_ratio"])


def test_a_nonfinite_loss_skips_the_update(brain, monkeypatch):
    head = snapshot(brain.modules.ctc_head)
    original = brain.compute_objectives
    monkeypatch.setattr(brain, "compute_objectives", lambda *a: original(*a) * float("nan"))
    brain.step += 1
    brain.fit_batch(make_batch())
    assert changed(head, brain.modules.ctc_head) == set()
    assert brain.optimizer_step == 0 and brain.nonfinite.skipped_total == 1
