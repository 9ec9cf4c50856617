"""The chain kernel alone (``kcprnn/_cpu/native_chain.cpp``): one forward and one backward of a
format's chain on one row, called through ``run_forward`` / ``run_backward`` without autograd,
medians in microseconds and the forward's multiply-adds per second. Formats at rank 4 (40 x 2,048
and 512 x 2,048, an LSTM cell's matrices at hidden 512) and KCP at the cells' default budgets
(40 -> 512 LSTM, GRU and Elman cells, CP ranks 65-321), its chain spelled out here so that the
script also runs on a tree whose ``KCPMatrix`` has none. To compare two versions of the kernel,
run it in each tree (``PYTHONPATH=<tree>/src``) in alternating processes.

Usage::

    python benchmarks/bench_chain_kernel.py [--reps 2000] [--formats tt,tr,cp,tucker,bt,ht,kcp]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import kcprnn
from kcprnn._cpu.native_chain import chain_layout, pointers, run_backward, run_forward
from kcprnn.formats import make_matrix
from kcprnn.formats._chain import ChainSpec, best_plan


def _kcp_spec(m) -> ChainSpec:
    d, n = range(len(m.in_splits)), range(m.num_factors)
    return ChainSpec(
        tuple(f"i{e}_{f}" for e in d for f in n),
        tuple(m.in_splits[e][f] for e in d for f in n),
        tuple(
            (tuple(m.factors[f][e].shape), ("p", f"r{f}", f"j{e}_{f}", f"i{e}_{f}"))
            for f in n
            for e in d
        ),
        tuple(f"j{e}_{f}" for e in d for f in n),
    )


def _cases(formats: list[str]):
    torch.manual_seed(0)
    for fmt in formats:
        if fmt == "kcp":
            for kind in ("LSTMCell", "GRUCell", "RNNCell"):
                cell = getattr(kcprnn, kind)(40, 512, format="kcp", hidden_format="kcp")
                for name in ("weight_ih", "weight_hh"):
                    m = getattr(cell, name)
                    tensors = [m.factors[f][e] for f in range(m.num_factors)
                               for e in range(len(m.in_splits))]  # fmt: skip
                    label = f"kcp {kind} {name} R={m.ranks[0]}"
                    yield label, m.in_features, best_plan(_kcp_spec(m)), tensors
            continue
        for n_in in (40, 512):
            extra = {"blocks": 2} if fmt == "bt" else {}
            m = make_matrix(fmt, n_in, 2048, rank=4, **extra)
            yield f"{fmt} {n_in}x2048 rank 4", n_in, m._chain_plan(), m.chain_tensors()


def _median_us(fn, reps: int) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _time(plan, n_in: int, given, reps: int) -> tuple[float, float]:
    """Medians of the kernel's forward and backward (every gradient) on one row, in us."""
    tensors = [given[i].detach().contiguous() for i in plan.order]
    layout = chain_layout(plan, 1)
    x = torch.randn(1, n_in)
    addresses = pointers(tensors)
    out, ws = run_forward(plan, layout, x, addresses, None)
    grad = torch.randn_like(out)
    grads = [torch.empty_like(t) for t in tensors]
    grad_x = torch.empty_like(x)
    fwd = _median_us(lambda: run_forward(plan, layout, x, addresses, None), reps)
    bwd = _median_us(
        lambda: run_backward(plan, layout, ws, grad, x, addresses, grads, grad_x), reps
    )
    return fwd, bwd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--formats", default="tt,tr,cp,tucker,bt,ht,kcp")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"kcprnn at {kcprnn.__file__}; torch {torch.__version__}, {platform.processor()}")
    print("| chain | MACs | forward (us) | backward (us) | forward GMAC/s |")
    print("|---|---:|---:|---:|---:|")
    for label, n_in, plan, given in _cases(args.formats.split(",")):
        fwd, bwd = _time(plan, n_in, given, args.reps)
        macs = plan.macs(1)
        print(f"| {label} | {macs:,} | {fwd:.1f} | {bwd:.1f} | {macs / fwd / 1e3:.2f} |")


if __name__ == "__main__":
    main()
