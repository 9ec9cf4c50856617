"""Streaming training of a cell with its optimizer: one step from a random state,
``sum().backward()`` and ``Adam.step()``, gradients set to ``None`` by the optimizer before each,
for ``torch.nn``'s cell and kcprnn's cells, with torch's default Adam (on the CPU a loop of about
ten operators per parameter tensor) and with ``Adam(fused=True)`` (one kernel over all of them).
A compressed cell has many small tensors (a KCP matrix 8, each with a few hundred entries) where
``torch.nn``'s has four large ones. Interleaved call by call in one process; medians in us and
``torch.nn``'s time (default Adam) over each.

Usage::

    python benchmarks/bench_cell_optimizer.py [--size 40x512] [--rounds 200] [--threads 1]
        [--modes LSTM,GRU,RNN]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import kcprnn

# (label, format of W_ih, of W_hh, rank or None for the modules' default budget)
MODELS = [
    ("KCP W_ih, default budget", "kcp", "dense", None),
    ("KCP both, default budget", "kcp", "kcp", None),
    ("KCP both, rank 16", "kcp", "kcp", 16),
    ("TT both, rank 4", "tt", "tt", 4),
]


def _cell(mode: str, n_in: int, hidden: int, ih: str, hh: str, rank: int | None) -> nn.Module:
    options: dict[str, Any] = {} if rank is None else {"rank": rank}
    extra = {"hidden_options": dict(options)} if hh != "dense" else {}
    kind = getattr(kcprnn, f"{mode}Cell")
    return kind(n_in, hidden, format=ih, hidden_format=hh, **options, **extra)


def _train_step(cell: nn.Module, mode: str, fused: bool, n_in: int, hidden: int) -> Callable:
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, n_in, generator=gen), torch.randn(1, hidden, generator=gen)
    state = (h, torch.randn(1, hidden, generator=gen)) if mode == "LSTM" else h
    optimizer = torch.optim.Adam(cell.parameters(), lr=1e-5, fused=fused or None)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = cell(x, state)
        (out[0] + out[1] if mode == "LSTM" else out).sum().backward()
        optimizer.step()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="LSTM,GRU,RNN")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, batch 1, "
        f"{args.rounds} interleaved rounds; medians in us (torch.nn with default Adam over each)"
    )
    print("| cell | model | tensors | default Adam | `Adam(fused=True)` |")
    print("|---|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        cells = {"torch.nn": getattr(nn, f"{mode}Cell")(n_in, hidden)}
        for label, ih, hh, rank in MODELS:
            torch.manual_seed(0)
            cells[label] = _cell(mode, n_in, hidden, ih, hh, rank)
        runs = {
            (name, fused): _train_step(copy.deepcopy(c), mode, fused, n_in, hidden)
            for name, c in cells.items()
            for fused in (False, True)
        }
        times: dict[Any, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds + 20):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                if r >= 20:  # warm-up
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        base = med[("torch.nn", False)]
        for name, c in cells.items():
            tensors = len(list(c.parameters()))
            cols = " | ".join(f"{med[name, f]:.0f} ({base / med[name, f]:.2f})" for f in (0, 1))
            print(f"| {mode}Cell | {name} | {tensors} | {cols} |", flush=True)


if __name__ == "__main__":
    main()
