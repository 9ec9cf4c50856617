"""Batch-first input at the speech size: ``torch.nn.LSTM`` against kcprnn's LSTMs.

The experiments' models are batch-first, the regime suite's input time-major. A bidirectional
LSTM (T = 300, batch 16, hidden 512) over ``--input`` features: ``torch.nn``, kcprnn dense,
KCP for both matrices (default size) and TT for both (rank 4), forward without gradients and
forward+backward of ``output.sum()``, medians over ``--rounds`` interleaved rounds, and each
module's speed-up over ``torch.nn`` in the same process. Run it on two checkouts (``PYTHONPATH``
pointing at each ``src``) in alternating processes to compare code versions: the absolute times
move between processes more than the ratios do.

Usage::

    python benchmarks/ab_batch_first.py [--threads 2] [--input 40] [--layout batch|time]
        [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn

STEPS, BATCH, HIDDEN = 300, 16, 512


def models(input_size: int, batch_first: bool) -> dict[str, torch.nn.Module]:
    options = {"batch_first": batch_first, "bidirectional": True}
    rank4 = {"rank": 4, "hidden_options": {"rank": 4}}
    return {
        "torch.nn": torch.nn.LSTM(input_size, HIDDEN, **options),
        "dense": kcprnn.LSTM(input_size, HIDDEN, **options),
        "kcp-both": kcprnn.LSTM(input_size, HIDDEN, format="kcp", hidden_format="kcp", **options),
        "tt-both": kcprnn.LSTM(
            input_size, HIDDEN, format="tt", hidden_format="tt", **rank4, **options
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", type=int, default=40)
    parser.add_argument("--layout", choices=["batch", "time"], default="batch")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch_first = args.layout == "batch"
    shape = (BATCH, STEPS, args.input) if batch_first else (STEPS, BATCH, args.input)
    x = torch.randn(*shape)
    cases = models(args.input, batch_first)

    def forward(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(x)

    def train(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(x)[0].sum().backward()

    times: dict[tuple[str, str], list[float]] = {}
    for m in cases.values():
        for fn in (forward, train):
            fn(m)
            fn(m)
    for _ in range(args.rounds):
        for name, m in cases.items():
            for fn in (forward, train):
                start = time.perf_counter()
                fn(m)
                times.setdefault((name, fn.__name__), []).append(time.perf_counter() - start)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    for name in cases:
        row = [f"{args.threads} thr, input {args.input}, {args.layout}-major, {name:9s}"]
        for kind in ("forward", "train"):
            ratio = ms[("torch.nn", kind)] / ms[(name, kind)]
            row.append(f"{kind} {ms[(name, kind)]:8.1f} ms ({ratio:.2f}x)")
        print("  ".join(row))


if __name__ == "__main__":
    main()
