"""A KCP cell's lone training step on a few rows, three ways interleaved call by call in one
process: ``torch.nn``'s cell, kcprnn's cell with each KCP matrix whose factor matrices are too
large to build in the step's node entering it as its chain of contractions
(``KCPMatrix.chain_for``, ``kcprnn.rnn._cell_train.ChainOperand``), and kcprnn's cell without
the chain (``chain_for`` turned off: the factor matrices built in a node of their own at every
step, the route before). Protocol of the regime suite's streaming points: one step from a
random state and ``sum().backward()``, gradients set to ``None`` before each; medians in us and
``torch.nn``'s time over each.

Usage::

    python benchmarks/ab_kcp_chain_step.py [--size 40x512] [--rounds 300] [--threads 1]
        [--modes LSTM,GRU,RNN] [--ranks default,16,64] [--matrices both,ih]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from ab_chain_cell_step import step_and_backward  # the same protocol (benchmarks/)
from torch import nn

import kcprnn
from kcprnn.formats.kcp.module import KCPMatrix


def _cell(mode: str, n_in: int, hidden: int, rank: str, matrices: str) -> nn.Module:
    options: dict[str, Any] = {} if rank == "default" else {"rank": int(rank)}
    kind = {"LSTM": kcprnn.LSTMCell, "GRU": kcprnn.GRUCell, "RNN": kcprnn.RNNCell}[mode]
    hidden_format = "kcp" if matrices == "both" else "dense"
    extra = {"hidden_options": dict(options)} if matrices == "both" else {}
    return kind(n_in, hidden, format="kcp", hidden_format=hidden_format, **options, **extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="LSTM,GRU,RNN")
    parser.add_argument("--ranks", default="default,16,64")
    parser.add_argument("--matrices", default="both,ih")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    own_chain = KCPMatrix.chain_for
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, batch 1, "
        f"{args.rounds} interleaved rounds; medians in us (torch.nn over each)"
    )
    print("| cell | KCP matrices | rank | torch.nn | chain | no chain | chain's gain |")
    print("|---|---|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, n_in, generator=gen), torch.randn(1, hidden, generator=gen)
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        ref = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN": nn.RNNCell}[mode](n_in, hidden)
        for matrices in args.matrices.split(","):
            for rank in args.ranks.split(","):
                torch.manual_seed(0)
                new, old = _cell(mode, n_in, hidden, rank, matrices), None
                old = _cell(mode, n_in, hidden, rank, matrices)
                old.load_state_dict(new.state_dict())
                runs = {
                    "torch": step_and_backward(ref, mode, x, h),
                    "chain": step_and_backward(new, mode, x, h),
                    "none": step_and_backward(old, mode, x, h),
                }
                times: dict[str, list[float]] = {k: [] for k in runs}
                for r in range(args.rounds + 20):
                    for name, run in runs.items():
                        KCPMatrix.chain_for = (  # type: ignore[method-assign]
                            own_chain if name != "none" else lambda self, rows, training=None: None
                        )
                        t0 = time.perf_counter()
                        run()
                        if r >= 20:
                            times[name].append(time.perf_counter() - t0)
                KCPMatrix.chain_for = own_chain  # type: ignore[method-assign]
                med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
                ranks = new.weight_ih.ranks
                print(
                    f"| {mode}Cell | {matrices} | {rank} {ranks} | {med['torch']:.0f} "
                    f"| {med['chain']:.0f} ({med['torch'] / med['chain']:.2f}) "
                    f"| {med['none']:.0f} ({med['torch'] / med['none']:.2f}) "
                    f"| {med['none'] / med['chain']:.2f} |"
                )


if __name__ == "__main__":
    main()
