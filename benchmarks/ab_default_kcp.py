"""KCP at the modules' default budget for both matrices against ``torch.nn`` at the speech size.

``kcprnn.<MODE>(I, H, bidirectional=True, format="kcp", hidden_format="kcp")`` (no other
option: what a new user builds) and the same ``torch.nn`` module, T=300, batch 16, one thread:
the inference forward (eval, ``no_grad``) and one training step (forward, ``sum``, backward),
interleaved, medians of ``--reps`` calls after one warm-up. Run it on two checkouts (``PYTHONPATH``)
in alternating processes to compare code versions.

Usage::

    python benchmarks/ab_default_kcp.py LSTM 40 512 [--tag now] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["LSTM", "GRU", "RNN"])
    parser.add_argument("inputs", type=int)
    parser.add_argument("hidden", type=int)
    parser.add_argument("--tag", default="")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = getattr(kcprnn, args.mode)(
        args.inputs, args.hidden, bidirectional=True, format="kcp", hidden_format="kcp"
    )
    ref = getattr(torch.nn, args.mode)(args.inputs, args.hidden, bidirectional=True)
    x = torch.randn(300, 16, args.inputs)  # (t, b, i)

    def forward(m: torch.nn.Module) -> None:
        m.eval()
        with torch.no_grad():
            m(x)

    def training(m: torch.nn.Module) -> None:
        m.train()
        for p in m.parameters():
            p.grad = None
        m(x)[0].sum().backward()

    cells = []
    for name, run in (("forward", forward), ("forward+backward", training)):
        run(ours)
        run(ref)
        a, b = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            run(ours)
            a.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(ref)
            b.append(time.perf_counter() - t0)
        ms, ref_ms = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        cells.append(f"{name} {ms:.0f} ms, torch.nn {ref_ms:.0f} ms ({ref_ms / ms:.2f}x)")
    print(args.tag, args.mode, f"{args.inputs} -> {args.hidden}", "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
