"""A cell step in training with TT, TR, CP, Tucker, BT or HT matrices, three ways interleaved
call by call in one process: ``torch.nn``'s cell, kcprnn's cell with the whole step as one
node (each matrix's chain inside it: ``kcprnn.rnn._cell_train.ChainOperand``), and kcprnn's
cell with one chain node per matrix and the gate arithmetic on torch operations (the route
before the step node, forced by turning ``kcprnn.rnn._cell_step._chained`` off). Protocol of
the regime suite's streaming points: one step from a random state and ``sum().backward()``,
gradients set to ``None`` before each; medians in us and ``torch.nn``'s time over each.

Usage::

    python benchmarks/ab_chain_cell_step.py [--size 40x512] [--rounds 300] [--threads 1]
        [--modes LSTM,GRU,RNN] [--formats tt,tr,cp,tucker,bt,ht] [--rank 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import kcprnn
from kcprnn.rnn import _cell_step


def step_and_backward(
    cell: nn.Module, mode: str, x: torch.Tensor, h: torch.Tensor
) -> Callable[[], None]:
    """One step of ``cell`` from ``h`` (and a random cell state for an LSTM) and
    ``sum().backward()``, gradients set to ``None`` first: the suite's streaming protocol."""
    state = (h, torch.randn_like(h)) if mode == "LSTM" else h

    def run() -> None:
        cell.zero_grad(set_to_none=True)
        out = cell(x, state)
        (out[0] + out[1] if mode == "LSTM" else out).sum().backward()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="LSTM,GRU,RNN")
    parser.add_argument("--formats", default="tt,tr,cp,tucker,bt,ht")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    chained = _cell_step._chained
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, batch 1, "
        f"rank {args.rank}, {args.rounds} interleaved rounds; medians in us (torch.nn over each)"
    )
    print("| cell | matrices | torch.nn | one node | chain nodes | one node over chain nodes |")
    print("|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, n_in, generator=gen), torch.randn(1, hidden, generator=gen)
    for mode in args.modes.split(","):
        for fmt in args.formats.split(","):
            for both in (True, False):
                torch.manual_seed(0)
                options: dict[str, object] = {"format": fmt, "rank": args.rank}
                if both:
                    options.update(hidden_format=fmt, hidden_options={"rank": args.rank})
                ours = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **options)
                apart = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **options)
                apart.load_state_dict(ours.state_dict())  # what it keeps between calls its own
                ref = getattr(nn, f"{mode}Cell")(n_in, hidden)
                runs = {
                    "torch": step_and_backward(ref, mode, x, h),
                    "node": step_and_backward(ours, mode, x, h),
                    "nodes": step_and_backward(apart, mode, x, h),
                }
                times: dict[str, list[float]] = {k: [] for k in runs}
                for r in range(args.rounds + 20):
                    for side, run in runs.items():
                        _cell_step._chained = chained if side != "nodes" else _off
                        start = time.perf_counter()
                        run()
                        if r >= 20:  # warm-up
                            times[side].append(time.perf_counter() - start)
                _cell_step._chained = chained
                med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                t = med["torch"]
                print(
                    f"| {mode}Cell | {fmt} {'both' if both else 'W_ih'} | {t:.0f} | "
                    f"{med['node']:.0f} ({t / med['node']:.2f}) | "
                    f"{med['nodes']:.0f} ({t / med['nodes']:.2f}) | "
                    f"{med['nodes'] / med['node']:.2f} |",
                    flush=True,
                )


def _off(matrix: object, rows: int) -> bool:
    return False


if __name__ == "__main__":
    main()
