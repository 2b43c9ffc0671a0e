"""What train.py refuses before anything trains, decided in this process with
`train.run` (the command's own entry: exit status 2 and one `error:` line) and
`--check_only` (launch_ddp.sh's check): settings, manifests, the output folder.
One test per path still starts the real command (test_launch.py, test_world_size.py)."""

from pathlib import Path

import pytest

from helpers import run_train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_data"


@pytest.fixture
def check(tmp_path, capsys):
    """train.py's command in this process: (exit status, stdout, stderr)."""
    return lambda *args: run_train(capsys, *args, f"--wavlm_source={tmp_path / 'wavlm-small'}", "--noprogressbar")


def error_line(code, err):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layerdrop=1.5"], "error: layerdrop=1.5 is outside [0, 1)"),
        (["--precision=fp16"], "error: precision=fp16 needs a CUDA GPU"),
        (["--data_folder=/no/such/place"], "error: data_folder=/no/such/place does not exist"),
        (["--layerdorp=0.5"], "error: --layerdorp is not a key of " + str(ROOT / "hparams" / "demo.yaml")
         + ": did you mean --layerdrop?"),
        (["hparams/no_such.yaml"], "error: the hparams file hparams/no_such.yaml does not exist"),
        (["--number_of_epochs=0"], "error: number_of_epochs=0 is not an integer >= 1: set --number_of_epochs="),
        (["--dynamic_batch_sampler={max_batch_length: 0}"],
         "error: dynamic_batch_sampler.max_batch_length=0 is not a number > 0: set --dynamic_batch_sampler="),
        (["--compile_cnn=True"], "error: compile_cnn compiles the frozen CNN (no backward), but freeze='none'"),
        (["--cuda_graphs=True"], "error: cuda_graphs=True needs a CUDA GPU (device is cpu): set --cuda_graphs=False"),
        (["--compile"], "error: --compile makes SpeechBrain compile whole modules, outside the recipe's checks"),
        (["--triton_block=48"], "error: triton_block=48 is not a power of two >= 16"),
    ],
)
def test_invalid_hparams_stop_at_start_with_one_line_and_write_nothing(tmp_path, check, args, message):
    out = tmp_path / "out"
    code, _, err = check(*args, f"--output_folder={out}")
    assert error_line(code, err).startswith(message)
    assert not out.exists()


def test_bad_manifest_rows_stop_the_run_or_are_left_out_when_asked(tmp_path, check):
    rows = (DEMO / "train.csv").read_text().splitlines()
    broken = tmp_path / "train.csv"
    broken.write_text("\n".join(rows + ["ghost-0001,1.5,$data_root/audio/ghost.ogg,x,SIX RED CAT SEES THE DOG"]) + "\n")
    out = tmp_path / "out"
    code, _, err = check(f"--train_csv={broken}", f"--output_folder={out}")
    assert error_line(code, err) == f"{broken}:{len(rows) + 1} (ghost-0001): missing file: " \
                                    "recipes/demo_data/audio/ghost.ogg"
    assert "--skip_invalid=True" in err
    assert not out.exists()

    code, stdout, err = check(f"--train_csv={broken}", f"--output_folder={out}", "--skip_invalid=True",
                              "--check_only", "--world_size=2")
    assert code == 0, err[-3000:]
    assert "skip_invalid: 1 utterance(s) left out: {'missing file': 1}" in stdout
    assert "checks passed for world size 2" in stdout


@pytest.mark.parametrize(
    "duration,message",
    [("abc", "duration 'abc' is not a number of seconds > 0"),
     ("samples", "durations must be in seconds, this looks like samples")],
    ids=["not-a-number", "samples"],
)
def test_a_bad_duration_column_stops_the_check_naming_the_row_and_writes_nothing(tmp_path, check, duration,
                                                                                  message):
    rows = (DEMO / "train.csv").read_text().splitlines()
    fields = rows[1].split(",")
    fields[1] = str(round(float(fields[1]) * 16000)) if duration == "samples" else duration
    broken = tmp_path / "train.csv"
    broken.write_text("\n".join([rows[0], ",".join(fields)] + rows[2:]) + "\n")
    out = tmp_path / "out"
    code, _, err = check(f"--train_csv={broken}", f"--output_folder={out}", "--check_only", "--world_size=2")
    error_line(code, err)
    assert f"{broken}:2 ({fields[0]}): " in err and message in err
    assert "could not convert string to float" not in err
    assert not out.exists()


def test_a_split_left_empty_stops_the_run_naming_it_before_anything_is_written(tmp_path, check):
    empty = tmp_path / "valid.csv"
    empty.write_text((DEMO / "valid.csv").read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    code, _, err = check(f"--valid_csv={empty}", f"--output_folder={out}", "--check_only", "--world_size=2")
    assert error_line(code, err) == (f"error: the valid split is empty: {empty} has no rows: fix the manifest "
                                     "or the settings named there")
    assert not out.exists()


def test_a_second_run_with_another_configuration_in_the_same_folder_is_refused(tmp_path, check):
    out = tmp_path / "out"
    code, _, err = check(f"--output_folder={out}", "--check_only")
    assert code == 0 and (out / "hyperparams.yaml").exists(), err[-3000:]
    code, _, err = check(f"--output_folder={out}", "--layerdrop=0.3", "--check_only")
    line = error_line(code, err)
    assert "changed: layerdrop" in line and "--resume=True" in line
    code, _, err = check(f"--output_folder={out}", "--layerdrop=0.3", "--overwrite=True", "--check_only")
    assert code == 0, err[-3000:]
    assert "layerdrop: 0.3" in (out / "hyperparams.yaml").read_text()
    (out / "save" / "trained-before.txt").write_text("a file of the earlier run")
    code, _, err = check(f"--output_folder={out}", "--layerdrop=0.3", "--overwrite=True", "--check_only")
    assert code == 0 and not (out / "save" / "trained-before.txt").exists(), err[-3000:]  # the same config: overwritten


def test_max_duration_leaves_longer_training_utterances_out_with_one_line_and_the_run_proceeds(tmp_path, check):
    code, stdout, err = check("--max_duration=1.5", "--check_only", "--world_size=2",
                              f"--output_folder={tmp_path / 'out'}")
    assert code == 0, err[-3000:]
    assert ("max_duration=1.5 s: left out 760 of 800 training utterances (0.40 h of 0.42 h, 96.1 % of the audio) "
            "longer than it") in stdout
    assert "bad row" not in stdout + err
    assert "checks passed for world size 2" in stdout


def plan_line(text):
    lines = [line for line in text.splitlines() if "global batch: world size" in line]
    assert len(lines) == 1, text[-3000:]
    return lines[0][lines[0].index("global batch:"):]


def test_debug_runs_plan_the_same_global_batch_and_steps_on_one_and_two_ranks(tmp_path, check):
    plans = []
    for world_size in (1, 2):
        code, stdout, err = check("--debug", "--check_only", f"--world_size={world_size}",
                                  f"--output_folder={tmp_path / str(world_size)}")
        assert code == 0, err[-3000:]
        plans.append(plan_line(stdout))
    assert "accumulation 2 = 24 s" in plans[0] and "accumulation 1 = 24 s" in plans[1]
    assert plans[0].split(" = ")[1] == plans[1].split(" = ")[1]
    assert plans[0].endswith("2 optimizer steps per epoch x 2 epochs = 4 optimizer steps")


def test_cuda_graphs_with_gradient_accumulation_stop_the_check_before_the_output_folder_is_touched(tmp_path, check):
    """One process accumulates the demo's 24 s global batch over 2 micro-batches, which
    CUDA graphs cannot: refused, and an earlier run that --overwrite=True would delete is
    kept; two ranks need no accumulation and pass. --device=cuda:0 passes the device
    check on this CPU machine (nothing of --check_only uses the device)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "hyperparams.yaml").write_text("layerdrop: 0.3\n")
    graphed = ("--device=cuda:0", "--cuda_graphs=True", "--compile_layers=True", "--pad_frames_to=64", "--layerdrop=0",
               "--check_only")
    code, _, err = check(*graphed, "--world_size=1", "--overwrite=True", f"--output_folder={out}")
    assert error_line(code, err).startswith("error: cuda_graphs cannot accumulate gradients (each replay of a "
                                            "recorded backward overwrites the last one's), and this run accumulates "
                                            "2 micro-batches (global_batch_seconds 24 over 1 rank)")
    assert (out / "hyperparams.yaml").read_text() == "layerdrop: 0.3\n"
    code, stdout, err = check(*graphed, "--world_size=2", f"--output_folder={tmp_path / 'two'}")
    assert code == 0, err[-3000:]
    assert "accumulation 1 = 24 s" in plan_line(stdout)


def test_layerdrop_with_find_unused_parameters_false_stops_the_check_of_a_ddp_launch(tmp_path, check):
    """launch_ddp.sh's check (world size 2) refuses it before any worker starts; one
    process (nothing to reduce) accepts it."""
    args = ("--layerdrop=0.5", "--find_unused_parameters=False", "--check_only")
    code, stdout, err = check(*args, "--world_size=2", f"--output_folder={tmp_path / 'two'}")
    line = error_line(code, err)
    assert "layerdrop=0.5 skips encoder layers" in line and "--find_unused_parameters=True" in line
    assert not (tmp_path / "two").exists()
    code, stdout, err = check(*args, "--world_size=1", f"--output_folder={tmp_path / 'one'}")
    assert code == 0, err[-3000:]
