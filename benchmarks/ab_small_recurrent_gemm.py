"""A/B of the dense recurrent loop's per-step product for small ``W_hh``: oneDNN's packed
inner product against torch.mm, on whole layers where the compiled dense loop runs.

Runs the ``dense`` route of one-layer LSTM, GRU and Elman modules (dense weights) at hidden
sizes 128 and 256, batches 16 and 32, 100 steps, inference (eval, ``no_grad``) and training
(forward, ``sum``, backward), with ``torch.nn``'s module on the same input as the reference;
medians of ``--reps`` rounds after two warm-ups, all variants interleaved
(:func:`~kcprnn.benchmarking.timing.time_interleaved`).
``--small-mm 0`` turns the small-product path off (every product packed, the former rule).

Usage::

    python benchmarks/ab_small_recurrent_gemm.py [--threads 1] [--reps 9]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

import kcprnn
from kcprnn._cpu import native_dense
from kcprnn.benchmarking.timing import time_interleaved

SIZES = [(40, 128, 100, 16), (40, 128, 100, 32), (700, 128, 100, 16), (40, 256, 100, 16)]


def run(m: torch.nn.Module, x: torch.Tensor, training: bool, small_mm: int) -> None:
    """One call of ``m`` on ``x`` (with a backward when ``training``), products of at most
    ``small_mm`` weight elements on torch.mm (:data:`~kcprnn._cpu.native_dense.SMALL_MM_ELEMENTS`;
    the dense loop reads it when it starts a sequence)."""
    native_dense.SMALL_MM_ELEMENTS = small_mm
    if training:
        for p in m.parameters():
            p.grad = None
        m(x)[0].sum().backward()
    else:
        with torch.no_grad():
            m(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limit = native_dense.SMALL_MM_ELEMENTS
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms, medians of {args.reps}")
    print("mode  (in, hidden, T, B)  phase | torch.nn | packed | small mm | packed/small mm")
    for mode in ("LSTM", "GRU", "RNN"):
        for size in SIZES:
            inputs, hidden, steps, batch = size
            torch.manual_seed(0)
            ours = getattr(kcprnn, mode)(inputs, hidden, format="dense", hidden_format="dense")
            ours.recurrence = "dense"
            ref = getattr(torch.nn, mode)(inputs, hidden)
            x = torch.randn(steps, batch, inputs)
            for phase in ("infer", "train"):
                training = phase == "train"
                ours.train(training)
                ref.train(training)
                stats = time_interleaved(
                    [
                        partial(run, ref, x, training, limit),
                        partial(run, ours, x, training, 0),  # every product packed
                        partial(run, ours, x, training, limit),
                    ],
                    device=x.device,
                    rounds=args.reps,
                    warmup=2,
                )
                native_dense.SMALL_MM_ELEMENTS = limit
                med = dict(
                    zip(
                        ("torch.nn", "packed", "small mm"),
                        [t.median_s * 1e3 for t in stats],
                        strict=True,
                    )
                )
                print(
                    f"{mode:4s} {size} {phase:5s} | {med['torch.nn']:8.2f} | {med['packed']:6.2f}"
                    f" | {med['small mm']:8.2f} | {med['packed'] / med['small mm']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
