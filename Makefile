# `make demo` runs the main job on its embedded default; `make test` sets up, lints, type-checks
# and runs the whole suite (what CI runs); `make test-fast` is the edit-test loop (no subprocess
# or multi-process tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv lint test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch when the machine has it; any torch >= 2.6 otherwise
	$(PY) -m pip install -q "$(TORCH_PIN)" || $(PY) -m pip install -q "torch>=2.6"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

test: lint
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow and not slurm"

demo: venv
	$(PY) -m launch.demo

clean:
	rm -rf $(VENV)
