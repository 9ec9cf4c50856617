"""Our formats against the peer libraries at the UCF11 size: tednet (TT, TR, BT, CP layers and
TT/TR/BT/CP/Tucker-2 LSTMs) and tensorly-torch (CP, Tucker, BlockTT FactorizedLinear with
opt_einsum), each peer at the rank whose parameter count is closest to ours; plus nn.Linear,
nn.LSTM, the input read, and peak memory (one subprocess per case on CPU).

    bash benchmarks/setup_peers.sh              # once: creates .venv-peers
    .venv-peers/bin/python benchmarks/bench_peers.py [extra `kcprnn bench` options]

Writes benchmarks/results/peers/bench.json. Same as
``kcprnn bench --points ucf11,lstm --peers required --out benchmarks/results/peers``.
"""

import sys
from pathlib import Path

from kcprnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "peers"
    sys.exit(
        main(["--points", "ucf11,lstm", "--peers", "required", "--out", str(out), *sys.argv[1:]])
    )
