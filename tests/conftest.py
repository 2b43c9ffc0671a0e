"""Shared fixtures: a tiny WavLM saved locally with save_pretrained (no download), and
the suite's 2-rank scenarios in one spawn; the order and grouping of modules for
`make test` (pytest-xdist --dist loadscope)."""

import importlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

# Inductor's CPU kernels as scalar C++ loops: the same graphs and lowering as with SIMD
# loops, compiled in two thirds of the time (the compile tests prove what inductor does to
# the layers, not how fast a CPU runs them; their float32 tolerance allows the other order
# of the sums, test_wrapper.COMPILED). Set before torch is imported.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")

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


# Modules whose 2-rank scenarios (each module's two_rank_plan) run in one spawn: one
# process group, one set of imports for all of them (two_rank_scenarios).
# test_layerdrop_ddp last: its last scenarios end in DDP's reduction error.
TWO_RANK_MODULES = ("test_fault_tolerance", "test_data_faults", "test_durable_checkpoints", "test_families",
                    "test_layerdrop_ddp")


@pytest.fixture(scope="session")
def two_rank_scenarios(tmp_path_factory, tiny_wavlm_dir):
    """{module name: (its base folder, {scenario: each rank's result})} of every
    TWO_RANK_MODULES module's two_rank_plan, run by ddp_worker.scenarios on 2 gloo ranks."""
    from ddp_worker import spawn_scenarios

    base = tmp_path_factory.mktemp("two_rank_scenarios")
    plans = {}
    for name in TWO_RANK_MODULES:
        (base / name).mkdir()
        plans[name] = importlib.import_module(name).two_rank_plan(base / name, tiny_wavlm_dir)
    runs = spawn_scenarios({f"{module}/{scenario}": spec for module, plan in plans.items()
                            for scenario, spec in plan.items()}, base / "ddp")
    return {module: (base / module, {scenario: runs[f"{module}/{scenario}"] for scenario in plan})
            for module, plan in plans.items()}


# Modules that train through launch_ddp.sh first: `make test` spreads whole modules over
# two pytest workers (pytest-xdist, --dist loadscope), and the long ones must not be
# left for the end, when one worker would wait alone for them.
LONG_MODULES = ["test_exact_resume.py", "test_world_size.py", "test_last_mile.py", "test_launch.py", "test_wrapper.py",
                "test_layerdrop_ddp.py", "test_large_recipe.py", "test_families.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, with the TWO_RANK_MODULES one scope (their shared spawn is made
    once, by the one worker that runs them; xdist's own loadgroup does not group here),
    handed out in the collection's order: xdist's default puts the scopes with the most
    tests first, which leaves the long launches for the end."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWithSharedRuns(LoadScopeScheduling):
        def __init__(self, config, log=None):
            config.option.loadscopereorder = False  # the collection's order (LONG_MODULES first), not the test count
            super().__init__(config, log)

        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return "two_rank_scenarios" if Path(module).stem in TWO_RANK_MODULES else module

    return ModulesWithSharedRuns(config, log)
