"""One cell step without gradients, kcprnn's against ``torch.nn``'s, in a loop over one cell
(its weights stay in cache, unlike ``bench_streaming.py``, which cycles through many cells).

For each mode and weight format: ``--rounds`` rounds, each timing 20 calls of ``torch.nn``'s
cell and then 20 of kcprnn's (both matrices in the format at rank 4; ``dense``: kcprnn's dense
cell), from the same state at batch 1. Prints the medians and the median of the per-round
ratios (``torch.nn``'s time over kcprnn's: above 1, kcprnn is faster).

Usage::

    python benchmarks/ab_cell_step.py [--size 40x512] [--rounds 80] [--threads 1]
        [--modes LSTM,GRU,RNN] [--formats dense,tt,tr,ht,bt,tucker,cp,kcp]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn


def one(mode: str, fmt: str, n_in: int, hidden: int, rounds: int) -> str:
    torch.manual_seed(0)
    kw: dict = {"format": fmt, "hidden_format": fmt}
    if fmt != "dense":
        kw.update(rank=4, hidden_options={"rank": 4})
    ours = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **kw).eval()
    ref = getattr(torch.nn, f"{mode}Cell")(n_in, hidden).eval()
    x = torch.randn(1, n_in)
    h = torch.randn(1, hidden)
    hx = (h, torch.randn(1, hidden)) if mode == "LSTM" else h

    def block(cell: torch.nn.Module) -> float:
        start = time.perf_counter()
        for _ in range(20):
            cell(x, hx)
        return (time.perf_counter() - start) / 20

    with torch.no_grad():
        for _ in range(20):
            ours(x, hx)
            ref(x, hx)
        a, b = [], []
        for _ in range(rounds):
            a.append(block(ref))
            b.append(block(ours))
    ratio = statistics.median([p / q for p, q in zip(a, b, strict=True)])
    return (
        f"{mode}Cell {fmt:7s} torch.nn {statistics.median(a) * 1e6:8.1f} us  "
        f"kcprnn {statistics.median(b) * 1e6:8.1f} us  torch/kcprnn {ratio:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="40x512", help="INPUTxHIDDEN")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="LSTM,GRU,RNN")
    ap.add_argument("--formats", default="dense,tt,tr,ht,bt,tucker,cp,kcp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_in, hidden = (int(v) for v in args.size.split("x"))
    print(f"torch {torch.__version__}, {args.threads} thread(s), size {n_in} -> {hidden}")
    for mode in args.modes.split(","):
        for fmt in args.formats.split(","):
            print(one(mode, fmt, n_in, hidden, args.rounds), flush=True)


if __name__ == "__main__":
    main()
