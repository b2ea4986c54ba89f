# Two commands set everything up on a fresh machine:
#   make demo   - train, checkpoint, damage and verify (creates .venv first)
#   make test   - lint, type-check and run the test suite (creates .venv first)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 first and alone, as requirements-dev.txt pins it: resolved together with the rest,
	# pip may take the multi-GB CUDA build of that version instead of the CPU wheel on disk
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check torchkeep tests benchmarks examples
	$(VENV)/bin/ruff format --check torchkeep tests benchmarks examples
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_save_load.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-run
