"""Interleaved A/B of the `dense` route's compiled loop (oneDNN products on a packed ``W_hh``,
compiled gate steps) against ``torch.nn`` and against torch's kernel on the same module
(``recurrence="torch"``), for unidirectional dense modules over a grid of sizes, and the route
``auto`` takes at each: the measurements behind the cost model's ``rnn_dense_*`` fields and the
16-rows-per-step threshold.

    python benchmarks/ab_dense_loop.py [--modes LSTM,GRU,RNN] [--threads 1] [--reps 5]
        [--sizes I:H:B:T,...]

Prints one line per mode and size: kcprnn's median time over ``torch.nn``'s (the median of the
per-round ratios) for the forward under ``no_grad`` (``infer``) and the forward+backward
(``train``), with the route forced to ``torch`` and to ``dense``, then ``auto``'s choice.
"""

import argparse
import statistics
import time

import torch

import kcprnn
from kcprnn.rnn.plan import layer_costs

SIZES = [  # (input, hidden, batch, steps)
    (8, 32, 4, 50),
    (16, 64, 8, 100),
    (64, 128, 16, 200),
    (40, 128, 64, 100),
    (40, 512, 1, 100),
    (40, 256, 16, 300),
    (123, 256, 16, 300),
    (700, 256, 32, 100),
    (700, 256, 16, 250),
    (40, 512, 16, 300),
    (512, 256, 16, 300),  # the upper layers of a three-layer bidirectional speech LSTM
    (1024, 512, 16, 300),
]


def _timed(module: torch.nn.Module, x: torch.Tensor, kind: str) -> float:
    start = time.perf_counter()
    with torch.set_grad_enabled(kind == "train"):
        out, _ = module(x)
    if kind == "train":
        out.sum().backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="LSTM,GRU,RNN")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="", help="I:H:B:T,... instead of the built-in grid")
    args = ap.parse_args()
    sizes = SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} threads {args.threads} reps {args.reps}", flush=True)
    for mode in args.modes.split(","):
        for i, h, b, t in sizes:
            x = torch.randn(t, b, i)
            ref = getattr(torch.nn, mode)(i, h)
            ours = {}
            for route in ("torch", "dense"):
                ours[route] = getattr(kcprnn, mode)(i, h, format="dense")
                ours[route].recurrence = route
            cells = [ours["dense"].cell(0)]
            chosen = []
            line = []
            for kind in ("infer", "train"):
                costs = layer_costs(cells, b * t, t, True, kind == "train")
                chosen.append(min(costs, key=lambda r: costs[r]))
                for m in (ref, *ours.values()):
                    _timed(m, x, kind)  # warm
                for route, m in ours.items():
                    ratios = []
                    for _ in range(args.reps):
                        a = _timed(ref, x, kind)
                        ratios.append(_timed(m, x, kind) / a)
                    line.append(f"{kind} {route} {statistics.median(ratios):.2f}")
            print(
                f"{mode} i={i} h={h} b={b} T={t}: " + "  ".join(line),
                f" auto: infer {chosen[0]}, train {chosen[1]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
