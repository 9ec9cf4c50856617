"""KCP's factor matrix ``A_p = Σ_r ⊗_d F[d][p, r]`` built and back-propagated (forward+backward,
one gradient of the matrix) on the compiled kernel (:mod:`kcprnn._cpu.native_factor`) against
torch operations (:func:`kcprnn.formats.kcp.algebra.factor_dense_torch`), over factors from a
cell's few thousand entries to millions of multiply-adds, each shape's two cases interleaved
round by round; medians (us), the torch operations' time over the kernel's, and whether
:func:`~kcprnn._cpu.native_factor.applies` takes the shape (``work_limit``).

Usage::

    python benchmarks/bench_factor_dense.py [--threads 1] [--rounds 200]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kcprnn._cpu import native, native_factor
from kcprnn.formats.kcp.algebra import factor_dense_torch

SHAPES = [  # (rank, [(J_d, I_d), ...])
    (4, [(2, 1), (2, 1), (2, 1), (2, 1)]),  # LSTMCell(40, 512) KCP rank 4: W_ih factor 1
    (4, [(4, 5), (4, 2), (4, 2), (2, 2)]),  # ... W_ih factor 0
    (4, [(4, 4), (4, 2), (4, 2), (2, 2)]),  # ... W_hh factor 0
    (8, [(8, 8), (8, 8), (4, 4)]),
    (4, [(8, 8), (8, 8), (4, 4)]),
    (16, [(8, 8), (8, 8), (4, 4)]),
    (2, [(8, 15), (16, 16)]),
    (1, [(16, 15), (16, 16)]),
    (2, [(16, 15), (16, 16)]),
    (4, [(16, 15), (16, 16)]),
    (16, [(16, 15), (16, 16)]),
    (64, [(8, 6), (8, 6), (4, 5)]),
    (12, [(8, 8), (8, 8), (4, 4)]),
    (65, [(4, 8), (4, 4), (4, 1), (4, 1)]),  # RNNCell(40, 512)'s default KCP W_hh: factor 0
    (130, [(4, 8), (4, 4), (4, 1), (4, 1)]),
    (260, [(4, 8), (4, 4), (4, 1), (4, 1)]),
    (16, [(4, 4), (4, 4), (4, 4), (4, 4)]),
    (32, [(4, 4), (4, 4), (4, 4), (4, 4)]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the compiled kernels are not built: {native.info()}")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, "
        f"MAX_WORK {native_factor.MAX_WORK}"
    )
    print("| rank | modes (J_d, I_d) | P R J I | torch ops us | kernel us | ratio | applies |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for rank, modes in SHAPES:
        gen = torch.Generator().manual_seed(0)
        factor = [torch.randn(1, rank, j, i, generator=gen).requires_grad_() for j, i in modes]
        grad = torch.randn(1, math.prod(j for j, _ in modes), math.prod(i for _, i in modes))

        def on_torch(f: list[torch.Tensor] = factor, g: torch.Tensor = grad) -> None:
            torch.autograd.grad(factor_dense_torch(f), f, g)

        def on_kernel(f: list[torch.Tensor] = factor, g: torch.Tensor = grad) -> None:
            torch.autograd.grad(native_factor.factor_dense([f], factor_dense_torch)[0], f, g)

        times: dict[str, list[float]] = {"torch": [], "kernel": []}
        for fn in (on_torch, on_kernel):
            fn()  # warm
        for _ in range(args.rounds):
            for name, fn in (("torch", on_torch), ("kernel", on_kernel)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        t, k = (statistics.median(times[n]) * 1e6 for n in ("torch", "kernel"))
        work = rank * math.prod(j * i for j, i in modes)
        applies = native_factor.applies(factor)
        print(f"| {rank} | {modes} | {work:,} | {t:.0f} | {k:.0f} | {t / k:.2f} | {applies} |")


if __name__ == "__main__":
    main()
