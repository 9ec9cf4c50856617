"""A KCP Kronecker factor built from its CP factors, ``A_p = Σ_r ⊗_d F[d][p, r]``: the products
of all the modes per rank summed over the rank (the reference) against
:func:`kcprnn.formats.kcp.algebra.factor_dense` (two groups of modes, the rank summed by one
GEMM), forward+backward, at the shapes of the default KCP matrices of a speech LSTM
(``LSTMCell(40, 512)``: ranks 203 and 321); then the training step of the default KCP
bidirectional LSTM at 40 -> 256 and 40 -> 512 (T = 100, batch 16), which builds such factors
once per call: run it on two checkouts to compare them.

Usage::

    python benchmarks/ab_factor_dense.py [--threads 1] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn
from kcprnn.formats.kcp.algebra import factor_dense, kron_pairs

SHAPES = {
    "W_hh factor 0 (R 203)": [(1, 203, 4, 8), (1, 203, 8, 4), (1, 203, 8, 1), (1, 203, 4, 1)],
    "W_ih factor 0 (R 321)": [(1, 321, 4, 5), (1, 321, 8, 2), (1, 321, 8, 1), (1, 321, 4, 1)],
}


def per_rank(factor: list[torch.Tensor]) -> torch.Tensor:
    t = factor[0]  # (p, r, g, f)
    for f in factor[1:]:
        t = kron_pairs(t, f)
    return t.sum(1)  # (p, g, f)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.reps}")
    for name, shapes in SHAPES.items():
        factor = [torch.randn(*s, requires_grad=True) for s in shapes]
        ref = median_ms(lambda f=factor: per_rank(f).sum().backward(), args.reps)
        new = median_ms(lambda f=factor: factor_dense(f).sum().backward(), args.reps)
        print(f"{name}: per rank {ref:.2f} ms, factor_dense {new:.2f} ms ({ref / new:.1f}x)")
    x = torch.randn(16, 100, 40)
    for hidden in (256, 512):
        model = kcprnn.LSTM(
            40, hidden, batch_first=True, bidirectional=True, format="kcp", hidden_format="kcp"
        )
        step = median_ms(lambda m=model: m(x)[0].sum().backward(), args.reps)
        print(f"default KCP biLSTM 40 -> {hidden}, T = 100, batch 16: training step {step:.2f} ms")


if __name__ == "__main__":
    main()
