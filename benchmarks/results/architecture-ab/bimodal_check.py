"""Interleaved KCP layers (UCF11 size, no_grad), medians of 20 calls each; run it several times:
the sequential rows land at about 4 ms or about 7 ms per process, in either tree.

    PYTHONPATH=<tree>/src python benchmarks/results/architecture-ab/bimodal_check.py LABEL
"""

import sys
import time

import torch

import kcprnn


def layer(rank: int, algorithm: str) -> kcprnn.FactorizedLinear:
    return kcprnn.FactorizedLinear(
        57600,
        1024,
        format="kcp",
        rank=rank,
        algorithm=algorithm,
        in_modes=[[2, 4], [4, 5], [4, 5], [3, 6]],
        out_modes=[[4, 4], [2, 2], [2, 2], [2, 2]],
    )


torch.set_num_threads(2)
torch.manual_seed(0)
layers = [layer(2, "sequential"), layer(1, "parallel"), layer(4, "sequential")]
x = torch.randn(96, 57600)
times: list[list[float]] = [[] for _ in layers]
with torch.no_grad():
    for _ in range(20):
        for i, m in enumerate(layers):
            start = time.perf_counter()
            m(x)
            times[i].append(time.perf_counter() - start)
print(sys.argv[1] if len(sys.argv) > 1 else "", [round(sorted(t)[10] * 1e3, 3) for t in times])
