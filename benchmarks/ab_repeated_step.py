"""A lone training step that repeats the last one (``kcprnn.rnn._cell_repeat.repeated_step``)
against the same step through the full path (the repeat turned off), interleaved call by call
in one process: the cell's forward alone in a tight loop (the step's backward marked done by
hand, so every call is a lone step), and the step with its backward. Medians in us, and the
full path's time over the repeat's.

Usage::

    python benchmarks/ab_repeated_step.py [--size 40x512] [--formats tt,kcp] [--rounds 2000]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn
from kcprnn.rnn import cells


def _off(*args: object) -> None:
    return None


def _runs(cell: torch.nn.Module, mode: str, x: torch.Tensor, state: object) -> tuple:
    """The two protocols on ``cell``: its forward alone and its step with the backward."""

    def forward() -> None:
        cell(x, state)
        cell._kept["marks"][1]["pending"] = False  # as if its backward had run

    def step() -> None:
        cell.zero_grad(set_to_none=True)
        out = cell(x, state)
        (out[0] + out[1] if mode == "LSTM" else out).sum().backward()

    return forward, step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--formats", default="tt,kcp")
    parser.add_argument("--modes", default="LSTM,GRU,RNN")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    repeat = cells.repeated_step
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, batch 1, "
        f"both matrices rank 4, {args.rounds} interleaved rounds; medians in us"
    )
    print("| cell | format | forward: full | repeated | ratio | step: full | repeated | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, n_in, generator=gen), torch.randn(1, hidden, generator=gen)
    for mode in args.modes.split(","):
        for fmt in args.formats.split(","):
            torch.manual_seed(0)
            options = {
                "format": fmt,
                "rank": 4,
                "hidden_format": fmt,
                "hidden_options": {"rank": 4},
            }
            cell = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **options)
            state = (h, torch.randn_like(h)) if mode == "LSTM" else h

            forward, step = _runs(cell, mode, x, state)
            cells_out = [mode + "Cell", fmt]
            for run, rounds in ((forward, args.rounds), (step, args.rounds // 4)):
                times: dict[str, list[float]] = {"full": [], "repeated": []}
                for r in range(rounds + 20):
                    for side in times:
                        cells.repeated_step = repeat if side == "repeated" else _off  # type: ignore[assignment]
                        start = time.perf_counter()
                        run()
                        if r >= 20:
                            times[side].append(time.perf_counter() - start)
                cells.repeated_step = repeat
                full, rep = (statistics.median(times[k]) * 1e6 for k in ("full", "repeated"))
                cells_out += [f"{full:.0f}", f"{rep:.0f}", f"{full / rep:.2f}"]
            print("| " + " | ".join(cells_out) + " |", flush=True)


if __name__ == "__main__":
    main()
