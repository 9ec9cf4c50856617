# kcprnn: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kcprnn-installed

.PHONY: setup demo test example bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch's CPU build first: any other version pulls a multi-GB CUDA build here.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,experiments]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/kcprnn demo

example: setup
	$(VENV)/bin/kcprnn example

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_formats.py

clean:
	rm -rf $(VENV) .pytest_cache
