# `make demo` runs the main job on its embedded default; `make test` sets up and runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch when the machine has it; any torch >= 2.6 otherwise
	$(PY) -m pip install -q "$(TORCH_PIN)" || $(PY) -m pip install -q "torch>=2.6"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

demo: venv
	$(PY) -m launch.demo

clean:
	rm -rf $(VENV)
