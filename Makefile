# Set-up and entry points. `make demo` and `make test` work from a fresh clone (they create .venv).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt -e '.[test]'
	touch $@

.PHONY: install demo test test-all bench gpu-check
install: $(VENV)/.installed

## The main job: synthetic nuScenes -> short CPU training of the tiny config -> official evaluation.
demo: install
	$(PY) train/demo.py

## The default test suite (without the tests marked slow).
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

## Everything, including tests marked slow.
test-all: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m ''

bench: install
	$(PY) -m pytest bench -q --benchmark-only -m '' -o python_files='bench_*.py test_*.py'

## The prepared device check (its time budget and protocol: docs/benchmarks.md). Run it with a Python that has
## CUDA torch and this package installed (`pip install -e .`), not the CPU .venv.
gpu-check:
	python bench/gpu_check.py --out bench/results
