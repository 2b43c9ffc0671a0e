"""The project as a maintainer and an installer see it: one package, commands by
name with exit statuses, and a wheel that transcribes without the checkout."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import torch

from wavlm_ddp import build_lm, export_hf, transcribe, tune_decoding
from wavlm_ddp.inference import TrainedModel

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("tests/data/run_2026-11-30")  # its YAML names its paths relative to the project root
AUDIO = ROOT / "recipes" / "demo_data" / "audio" / "test-0000.ogg"
LOGITS = """import torch
from wavlm_ddp.inference import open_model
model = open_model("{run}")
signal = model.load("{audio}")[None]
torch.save(model.logits(signal, torch.ones(1)), "{out}")
"""
COMMANDS = {"transcribe": transcribe, "tune-decoding": tune_decoding, "export-hf": export_hf, "build-lm": build_lm}


def test_the_top_level_holds_the_recipe_and_the_library_is_one_package():
    python_files = sorted(path.name for path in ROOT.glob("*.py"))
    assert python_files == ["train.py", "wavlm_wrapper.py"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "py-modules" not in pyproject and 'include = ["wavlm_ddp*"]' in pyproject
    for name in COMMANDS:
        module = name.replace("-", "_")
        assert f'wavlm-ddp-{name} = "wavlm_ddp.{module}:cli"' in pyproject


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_turns_a_missing_input_into_one_error_line_and_its_exit_status(name, tmp_path, capsys):
    missing = tmp_path / "missing"
    argv = {"transcribe": [str(missing), str(AUDIO)], "tune-decoding": [str(missing)],
            "export-hf": [str(missing), str(tmp_path / "out")],
            "build-lm": [str(missing), "--output", str(tmp_path / "lm.arpa")]}[name]
    status = COMMANDS[name].cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == (1 if name == "build-lm" else 2)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "lm.arpa").exists()


def test_the_wheel_installed_in_a_fresh_venv_transcribes_the_saved_run_without_the_checkout(tmp_path, monkeypatch):
    """The wheel is built from the package and pyproject alone, installed into a new
    venv that borrows the test environment's dependencies (a plain path: its editable
    install of this checkout stays inactive), and run from a folder holding only a
    copy of the saved run: the console script transcribes it, and the installed
    library computes the checkout's logits."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "wavlm_ddp", source / "wavlm_ddp", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("wavlm_ddp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    shutil.copytree(ROOT / RUN, work / RUN)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(python), "-c", "import wavlm_ddp, sys; print(wavlm_ddp.__file__); "
                            "print(any(p.rstrip('/') == %r for p in sys.path))" % str(ROOT)],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert where == [str(Path(site) / "wavlm_ddp" / "__init__.py"), "False"]
    script = subprocess.run([str(venv / "bin" / "wavlm-ddp-transcribe"), str(RUN), str(AUDIO)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert script.returncode == 0, script.stderr[-3000:]
    assert script.stdout.split("\t")[0] == str(AUDIO)
    # The saved run is one epoch of a tiny model (its transcripts are empty): the
    # installed code is compared with the checkout's by the logits it computes.
    logits_file = tmp_path / "logits.pt"
    module = subprocess.run([str(python), "-c", LOGITS.format(run=RUN, audio=AUDIO, out=logits_file)], cwd=work,
                            env=env, capture_output=True, text=True, timeout=600)
    assert module.returncode == 0, module.stderr[-3000:]
    monkeypatch.chdir(ROOT)
    model = TrainedModel(RUN)
    signal = model.load(AUDIO)[None]
    torch.testing.assert_close(torch.load(logits_file), model.logits(signal, torch.ones(1)), rtol=1e-5, atol=1e-5)
