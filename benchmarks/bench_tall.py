"""Tall-skinny products ``x @ w.T`` (many rows, a few outputs): MKL, oneDNN and kcprnn's kernel.

The first contraction of a factorized layer multiplies a ``(rows, f)`` view of the input by a
small ``(g, f)`` matrix. This script times, over a sweep of shapes and output counts, torch's
``F.linear`` (MKL), oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``, where
present) and the compiled kernel (``kcprnn._cpu.native``, output allocation included), with
interleaved repetitions; it prints medians in microseconds and the kernel's time over the best
of the other two. The numbers set the kernel's range in the cost model
(``CostModel.native_max_out``, ``native_long_row``, ``native_min_size``, used by
``kcprnn._cpu.ops``) and its ``native_gain`` / ``native_gain_wide``.

With ``--grad`` it times the weight gradient ``grad.T @ x`` (``(g, m) @ (m, f)``) instead: one
GEMM (MKL), the blocked sum of partial products torch-side (``ops.blocked_weight_grad``) and the
compiled kernel (``native.tall_weight_grad``).

Usage::

    python benchmarks/bench_tall.py [--grad] [--threads 2] [--reps 60]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from kcprnn._cpu import native as _native
from kcprnn._cpu import ops as _ops

SHAPES = [(15360, 360), (1536, 3600), (96, 57600), (61440, 90), (960, 64), (1536, 20), (192, 8)]
OUTS = [1, 2, 4, 8, 16, 32]


def time_point(x: torch.Tensor, g: int, reps: int, grad: bool) -> dict[str, float]:
    """Median microseconds of each implementation, repetitions interleaved: ``x @ w.T`` for a
    ``(g, f)`` weight, or with ``grad`` the weight gradient ``dy.T @ x`` for a ``(m, g)`` dy."""
    rows, f = x.shape
    if grad:
        dy = torch.randn(rows, g)  # (m, g)
        cases = {
            "one GEMM": lambda: dy.t().mm(x),
            "blocked": lambda: _ops.blocked_weight_grad(dy, x),
            "kernel": lambda: _native.tall_weight_grad(dy, x),
        }
    else:
        w = torch.randn(g, f)  # (g, f)
        cases = {
            "MKL": lambda: F.linear(x, w),
            "kernel": lambda: _native.tall_matmul(x[None], w, x.new_empty(1, rows, g)),
        }
        onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if onednn is not None:
            cases["oneDNN"] = lambda: onednn(x, w, None, "none", [], "")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--grad", action="store_true", help="time the weight gradient instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = _native.info()
    if not info["available"]:
        raise SystemExit(f"the compiled kernel is unavailable: {info['error']}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, kernel {info['isa']}-bit vectors; "
        f"median us of {args.reps} interleaved repetitions"
    )
    names = ["one GEMM", "blocked", "kernel"] if args.grad else ["MKL", "oneDNN", "kernel"]
    print(f"{'grad.T @ x' if args.grad else 'x @ w.T'}:")
    print(
        f"{'rows':>6} {'f':>6} {'g':>3} "
        + " ".join(f"{n:>9}" for n in names)
        + f" {'kernel/best':>11}"
    )
    for rows, f in SHAPES:
        x = torch.randn(rows, f)  # (m, f)
        for g in OUTS:
            us = time_point(x, g, args.reps, args.grad)
            best = min(v for name, v in us.items() if name != "kernel")
            print(
                f"{rows:>6} {f:>6} {g:>3} "
                + " ".join(f"{us.get(n, float('nan')):>9.1f}" for n in names)
                + f" {us['kernel'] / best:>11.2f}"
            )


if __name__ == "__main__":
    main()
