"""A cell's lone training step on both of its routes, interleaved call by call in one process:
``torch.nn``'s cell, kcprnn's cell as it chooses (``auto``), and kcprnn's cell forced onto
each route of :func:`kcprnn.rnn._cell_route.cell_uses_dense`: ``dense`` (its matrices rebuilt
dense under autograd and torch's fused cell) and ``structured`` (the compiled step on the
formats' products: a KCP matrix built in the step's node, as its chain, or from factor
matrices built in a node of their own). Protocol of the regime suite's streaming points: one
step from a random state and ``sum().backward()``, gradients set to ``None`` before each;
medians in us and ``torch.nn``'s time over each. Says which route ``auto`` took.

Usage::

    python benchmarks/ab_cell_train_route.py [--size 40x512] [--rounds 200] [--threads 1]
        [--modes LSTM,GRU,RNN] [--ranks default,16,64] [--matrices ih,both] [--batches 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from ab_chain_cell_step import step_and_backward  # the same protocol (benchmarks/)
from ab_kcp_chain_step import _cell  # the same cells
from torch import nn

from kcprnn.rnn import _cell_route


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="LSTM,GRU,RNN")
    parser.add_argument("--ranks", default="default,16,64")
    parser.add_argument("--matrices", default="ih,both")
    parser.add_argument("--batches", default="1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    own = _cell_route.cell_trains_dense
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, "
        f"{args.rounds} interleaved rounds; medians in us (torch.nn over each)"
    )
    print(
        "| cell | KCP matrices | rank | batch | torch.nn | auto | dense | structured | auto took |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for mode in args.modes.split(","):
        for matrices in args.matrices.split(","):
            for rank in args.ranks.split(","):
                for batch in map(int, args.batches.split(",")):
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(batch, n_in, generator=gen)
                    h = torch.randn(batch, hidden, generator=gen)
                    torch.manual_seed(0)
                    ref = getattr(nn, f"{mode}Cell")(n_in, hidden)
                    cells = [_cell(mode, n_in, hidden, rank, matrices) for _ in range(3)]
                    for c in cells[1:]:
                        c.load_state_dict(cells[0].state_dict())
                    with torch.enable_grad():
                        took = (
                            "dense"
                            if _cell_route.cell_uses_dense(cells[0], batch, True)
                            else "structured"
                        )
                    forced = {"auto": own, "dense": _always(True), "structured": _always(False)}
                    runs = {"torch": (step_and_backward(ref, mode, x, h), own)}
                    for (name, choice), cell in zip(forced.items(), cells, strict=True):
                        runs[name] = (step_and_backward(cell, mode, x, h), choice)
                    times: dict[str, list[float]] = {k: [] for k in runs}
                    for r in range(args.rounds + 20):
                        for name, (run, choice) in runs.items():
                            _cell_route.cell_trains_dense = choice  # type: ignore[assignment]
                            t0 = time.perf_counter()
                            run()
                            if r >= 20:  # warm-up
                                times[name].append(time.perf_counter() - t0)
                    _cell_route.cell_trains_dense = own  # type: ignore[assignment]
                    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                    t = med["torch"]
                    cols = " | ".join(f"{med[k]:.0f} ({t / med[k]:.2f})" for k in forced)
                    row = f"| {mode}Cell | {matrices} | {rank} | {batch} | {t:.0f} | {cols}"
                    print(f"{row} | {took} |", flush=True)


def _always(answer: bool) -> Any:
    return lambda *args, **kwargs: answer


if __name__ == "__main__":
    main()
