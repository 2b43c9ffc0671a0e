# The two commands of a fresh machine (README): each installs what it needs into a
# local virtual environment, once, then runs. GPU users install into their own
# environment instead (README: Training on GPUs).
#
#   make demo    # the demo: a small WavLM fine-tuned by 2 CPU gloo processes
#   make test    # the tests (CI: .ci/run)

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install

demo: $(STAMP)
	PYTHON=$(VENV)/bin/python ./launch_ddp.sh

# Two pytest workers, each taking whole test modules (shared trained runs stay in one;
# tests/conftest.py joins the modules of its one 2-rank spawn into one).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --durations=30

install: $(STAMP)

# torch and torchaudio pinned to the pair that works together on CPU (README).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q torch==2.14.1 torchaudio==2.11.0
	$(VENV)/bin/python -m pip install -q -e ".[test,lm,datasets,slurm]"
	touch $(STAMP)
