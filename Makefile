# Set-up and entry points. Every install step the project needs lives here (CI runs `make test` via .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# One venv holds Airflow and the trainer, so the example DAG can train locally. Exact CPU pins come from
# ci/constraints-cpu.txt; PyPI's torchvision does not load beside the CPU torch and unsloth runs without it
# (FACTS.md), so it is removed after the install.
$(VENV)/.installed: pyproject.toml ci/constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c ci/constraints-cpu.txt -e '.[unsloth,dev]'
	$(PY) -m pip uninstall -q -y torchvision
	touch $@

# The main job: a real LoRA fine-tune of SmolLM2-135M-Instruct on CPU, with before/after answers.
demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
