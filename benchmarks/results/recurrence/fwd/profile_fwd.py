"""Breakdown of one forward call of the speech biLSTM (KCP W_ih and W_hh, rank 1, 2 factors)
at 1 thread: torch.profiler table, plus perf_counter timings of the pieces.

    PYTHONPATH=src python benchmarks/results/recurrence/fwd/profile_fwd.py [--reps 5] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import kcprnn

KCP = {"rank": 1, "num_factors": 2}


def model(steps=300, batch=16, inputs=40, hidden=512):
    torch.manual_seed(0)
    ours = kcprnn.LSTM(
        inputs,
        hidden,
        bidirectional=True,
        format="kcp",
        hidden_format="kcp",
        hidden_options=dict(KCP),
        **KCP,
    )
    return ours, nn.LSTM(inputs, hidden, bidirectional=True), torch.randn(steps, batch, inputs)


def med(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ours, ref, x = model()
    print("routes", [c.weight_hh.__class__.__name__ for c in ours.cells])

    def fo():
        ours(x)

    def fr():
        ref(x)

    def fbo():
        for p in ours.parameters():
            p.grad = None
        ours(x)[0].sum().backward()

    def fbr():
        for p in ref.parameters():
            p.grad = None
        ref(x)[0].sum().backward()

    fo(), fr()
    res = {"ours": [], "torch": [], "ours_fb": [], "torch_fb": []}
    for _ in range(args.reps):
        for k, f in (("ours", fo), ("torch", fr), ("ours_fb", fbo), ("torch_fb", fbr)):
            t0 = time.perf_counter()
            f()
            res[k].append((time.perf_counter() - t0) * 1e3)
    m = {k: statistics.median(v) for k, v in res.items()}
    print(
        f"fwd ours {m['ours']:.1f} torch {m['torch']:.1f} ratio {m['ours'] / m['torch']:.3f} | "
        f"fwd+bwd ours {m['ours_fb']:.1f} torch {m['torch_fb']:.1f} "
        f"ratio {m['ours_fb'] / m['torch_fb']:.3f}"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fo()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
