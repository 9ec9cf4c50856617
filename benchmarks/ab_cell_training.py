"""Cells in training against ``torch.nn``'s: one step from a random state and its backward
(``step``: the regime suite's protocol), and a loop of ``--steps`` steps from zeros with one
backward of the summed outputs (``loop``: how a sequence trains on a cell), gradients set to
``None`` before each. kcprnn's cells at rank 4 for the compressed matrices (``W_ih`` alone, or
both) and at the library's default budgets; each case interleaved with ``torch.nn``'s cell
round by round; medians (ms) and ``torch.nn``'s time over kcprnn's (above 1, kcprnn is faster).
Run it on two checkouts to compare them.

Usage::

    python benchmarks/ab_cell_training.py [--size 40x512] [--steps 100] [--batch 1]
        [--rounds 7] [--threads 1] [--modes LSTM,GRU] [--cases "tt both,ht W_ih"]
        [--protocols step,loop]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import kcprnn

# label -> options of kcprnn's cell: "F W_ih" (W_ih in format F at rank 4, W_hh dense) and
# "F both" for every format, plus the library's defaults
CASES: dict[str, dict[str, object]] = {"default": {}, "default both": {"hidden_format": "kcp"}}
for _f in ("kcp", "tt", "tr", "cp", "tucker", "bt", "ht"):
    CASES[f"{_f} W_ih"] = {"format": _f, "rank": 4}
    CASES[f"{_f} both"] = {
        **CASES[f"{_f} W_ih"],
        "hidden_format": _f,
        "hidden_options": {"rank": 4},
    }
DEFAULT_CASES = "default,kcp W_ih,tt W_ih,ht W_ih,kcp both,default both"


def _runner(cell: nn.Module, mode: str, x: torch.Tensor, hidden: int) -> dict[str, Callable]:
    steps, batch = x.shape[:2]
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(batch, hidden, generator=gen)
    c0 = torch.randn(batch, hidden, generator=gen)

    def state(h: torch.Tensor) -> object:
        return (h, c0 if h is h0 else torch.zeros_like(h)) if mode == "LSTM" else h

    def step() -> None:
        cell.zero_grad(set_to_none=True)
        out = cell(x[0], state(h0))
        (out[0] + out[1] if mode == "LSTM" else out).sum().backward()

    def loop() -> None:
        cell.zero_grad(set_to_none=True)
        s = state(torch.zeros(batch, hidden))
        loss = x.new_zeros(())
        for t in range(steps):
            s = cell(x[t], s)
            loss = loss + (s[0] if mode == "LSTM" else s).sum()
        loss.backward()

    return {"step": step, "loop": loop}


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="LSTM,GRU")
    parser.add_argument(
        "--cases", default=DEFAULT_CASES, help=f"comma-separated, of: {', '.join(CASES)}"
    )
    parser.add_argument("--protocols", default="step,loop", help="step, loop or both")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    protocols = [
        (p, args.step_rounds if p == "step" else args.rounds) for p in args.protocols.split(",")
    ]
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, "
        f"batch {args.batch}, loop of {args.steps} steps; medians in ms, torch.nn / kcprnn"
    )
    print("| cell | case | step: torch.nn | kcprnn | ratio | loop: torch.nn | kcprnn | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    x = torch.randn(args.steps, args.batch, n_in, generator=torch.Generator().manual_seed(0))
    for mode in args.modes.split(","):
        for label in cases:
            options = CASES[label]
            torch.manual_seed(0)
            ref = getattr(nn, f"{mode}Cell")(n_in, hidden)
            ours = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **options)
            run = {"torch": _runner(ref, mode, x, hidden), "kcprnn": _runner(ours, mode, x, hidden)}
            med: dict[tuple[str, str], float] = {}
            for protocol, rounds in protocols:
                times: dict[str, list[float]] = {"torch": [], "kcprnn": []}
                for r in range(rounds + 3):
                    for side in ("torch", "kcprnn"):
                        t = _time(run[side][protocol])
                        if r >= 3:  # warm-up
                            times[side].append(t)
                for side, values in times.items():
                    med[side, protocol] = statistics.median(values) * 1e3
            cells = []
            for protocol in ("step", "loop"):
                if (t := med.get(("torch", protocol))) is None:
                    cells += ["", "", ""]
                    continue
                k = med["kcprnn", protocol]
                cells += [f"{t:.3f}", f"{k:.3f}", f"{t / k:.2f}"]
            print(f"| {mode}Cell | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
