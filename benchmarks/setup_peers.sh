#!/usr/bin/env bash
# Create .venv-peers: torch 2.13.0 + the peer libraries (tednet, tensorly-torch) + kcprnn (editable).
# The peers are benchmark-only; kcprnn never depends on them at runtime.
# Usage: bash benchmarks/setup_peers.sh [python]   (then: .venv-peers/bin/kcprnn bench --peers ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
VENV=.venv-peers
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --upgrade pip >/dev/null
# torch first, pinned, so nothing below replaces it (the peers declare loose torch requirements).
"$PIP" install "torch==2.13.0"
# Versions that worked together (docs/peers.md): tednet 0.1.3, tensorly-torch 0.5.0,
# tensorly 0.10.0, opt-einsum 3.4.0. tltorch needs `packaging` but does not declare it; without
# opt_einsum its einsum path falls off a cliff (seconds and tens of GB), so it is required here.
"$PIP" install "torch==2.13.0" "tednet==0.1.3" "tensorly-torch==0.5.0" "tensorly==0.10.0" \
    packaging "opt-einsum==3.4.0" numpy matplotlib
"$PIP" install -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
for name in ("torch", "tednet", "tensorly-torch", "tensorly", "opt-einsum", "kcprnn"):
    print(f"{name:16s} {md.version(name)}")
PY
