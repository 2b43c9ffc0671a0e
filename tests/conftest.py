"""Shared fixtures: a tiny WavLM saved locally with save_pretrained (no download)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY_CONFIG, save_tiny_wavlm  # noqa: E402

# Scripts the tests start (launch_ddp.sh) run the interpreter that runs the tests,
# also when its environment is not activated.
os.environ.setdefault("PYTHON", sys.executable)
# Under pytest-xdist (make test: two workers on two cores) every process computes on
# one thread: more threads than cores make PyTorch's thread pools wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
# HF datasets' Arrow cache (parquet input) in a temporary folder, not the user's,
# removed when the tests end.
_HF_CACHE = tempfile.TemporaryDirectory(prefix="hf-datasets-cache-")
os.environ["HF_DATASETS_CACHE"] = _HF_CACHE.name


@pytest.fixture(scope="session")
def tiny_wavlm_dir(tmp_path_factory):
    """A randomly initialised tiny WavLM in the save_pretrained layout."""
    return save_tiny_wavlm(tmp_path_factory.mktemp("models") / "tiny-wavlm")


@pytest.fixture(scope="session")
def tiny_config():
    return dict(TINY_CONFIG)


# Modules that train through launch_ddp.sh first: `make test` spreads whole modules
# over two pytest workers (pytest-xdist, --dist loadscope), and the long ones must
# not be left for the end, when one worker would wait alone for them.
LONG_MODULES = ["test_exact_resume.py", "test_world_size.py", "test_last_mile.py", "test_restarts.py", "test_launch.py", "test_wrapper.py",
                "test_layerdrop_ddp.py", "test_large_recipe.py", "test_families.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
