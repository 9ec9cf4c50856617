"""Does ``auto`` pick the fastest route for a recurrent layer with a Kronecker-sum ``W_hh``?

``--collect OUT.json`` times every route of one-layer LSTM, GRU and Elman modules with KCP or
CP for both matrices, at rank 4 as the suite builds them or (``kcp-default``) KCP at the
modules' default budget, or (``dense``) dense ones, at the speech, spikes and batch-1 sizes
(``--modes`` and ``--sizes`` pick a subset): torch's kernel on the rebuilt
weights, the compiled dense loop and the compiled structured loop, in inference (eval,
``no_grad``) and training (forward, ``sum``, backward), medians of ``--reps`` calls after one
warm-up. ``--evaluate IN.json`` prices the same
layers with the cost model (``--set field=value`` overrides fields) and prints, per layer and
phase, the route chosen, the fastest measured and the regret (the chosen route's time over the
fastest's), then the sum of the chosen times over the sum of the fastest.

Usage::

    python benchmarks/bench_layer_routes.py --collect routes.json [--threads 1] [--reps 4]
        [--formats dense,cp] [--modes GRU] [--sizes 4,5]
    python benchmarks/bench_layer_routes.py --evaluate routes.json [--set rnn_native_traffic=0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch

import kcprnn
from kcprnn.rnn import plan

ROUTES = ("torch", "dense", "structured")
# (input, hidden, steps, batch, bidirectional): the speech and spikes points, batch 1 and 64,
# hidden 128 (the spike stand-in's size, whose W_hh products run on torch.mm), and inputs of
# 128-700 at hidden 128 and 256 (where torch's LSTM training slows with the input's width)
SIZES = [
    (40, 256, 300, 16, True),
    (40, 512, 300, 16, True),
    (123, 256, 300, 16, True),
    (123, 512, 300, 16, True),
    (700, 256, 100, 32, False),
    (700, 256, 250, 32, False),
    (40, 512, 1000, 1, False),
    (40, 256, 1000, 1, False),
    (40, 256, 300, 64, True),
    (40, 128, 100, 16, False),
    (700, 128, 100, 16, False),
    (40, 128, 300, 16, True),
    (128, 128, 100, 16, False),
    (300, 128, 100, 16, False),
    (700, 128, 100, 32, False),
    (256, 256, 100, 16, False),
    (700, 256, 100, 16, False),
]


FORMATS = ("cp", "kcp", "kcp-default", "dense")
MODES = ("LSTM", "GRU", "RNN")


def build(mode: str, size: tuple, fmt: str) -> torch.nn.Module:
    """The module of ``mode`` at ``size`` with ``fmt`` for both matrices: rank 4 as the suite
    builds it, or (``"kcp-default"``) KCP at the modules' default budget."""
    torch.manual_seed(0)
    inputs, hidden, _, _, bi = size
    cls = getattr(kcprnn, mode)
    if fmt == "dense":
        return cls(inputs, hidden, bidirectional=bi, format="dense", hidden_format="dense")
    if fmt == "kcp-default":
        return cls(inputs, hidden, bidirectional=bi, format="kcp", hidden_format="kcp")
    return cls(inputs, hidden, bidirectional=bi, format=fmt, hidden_format=fmt, rank=4,
               hidden_options={"rank": 4})  # fmt: skip


def call(m: torch.nn.Module, x: torch.Tensor, training: bool) -> None:
    """One inference forward (eval, ``no_grad``) or one training step (forward, ``sum``,
    backward, the previous gradients cleared first)."""
    if training:
        m.train()
        for p in m.parameters():
            p.grad = None
        m(x)[0].sum().backward()
    else:
        m.eval()
        with torch.no_grad():
            m(x)


def collect(
    path: str, reps: int, formats: tuple[str, ...], modes: tuple[str, ...], sizes: list[tuple]
) -> None:
    records = []
    for mode in modes:
        for size in sizes:
            for fmt in formats:
                m = build(mode, size, fmt)
                x = torch.randn(size[2], size[3], size[0])  # (t, b, i)
                times = {}
                cells = [m.cell(0, d) for d in range(2 if size[4] else 1)]
                for phase in ("infer", "train"):
                    offered = plan.layer_costs(
                        cells, size[2] * size[3], size[2], True, phase == "train"
                    )
                    for route in (r for r in ROUTES if r in offered):
                        m.recurrence = route
                        call(m, x, phase == "train")  # warm-up
                        ts = []
                        for _ in range(reps):
                            t0 = time.perf_counter()
                            call(m, x, phase == "train")
                            ts.append(time.perf_counter() - t0)
                        times[f"{phase}/{route}"] = statistics.median(ts) * 1e3
                records.append({"mode": mode, "size": list(size), "format": fmt, "ms": times})
                print(mode, size, fmt, {k: round(v, 1) for k, v in times.items()}, flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": reps}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".")
    with os.fdopen(fd, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    os.replace(tmp, path)


def evaluate(path: str, overrides: dict[str, str]) -> None:
    with open(path) as f:
        records = json.load(f)["records"]
    base = plan.default_cost_model()
    cm = dataclasses.replace(
        base, **{k: type(getattr(base, k))(float(v)) for k, v in overrides.items()}
    )
    chosen_total = best_total = 0.0
    for r in records:
        size = tuple(r["size"])
        m = build(r["mode"], size, r["format"])
        cells = [m.cell(0, d) for d in range(2 if size[4] else 1)]
        for phase in ("infer", "train"):
            costs = plan.layer_costs(cells, size[2] * size[3], size[2], True, phase == "train", cm)
            times = {k: r["ms"][f"{phase}/{k}"] for k in costs}
            chosen, best = min(costs, key=costs.__getitem__), min(times, key=times.__getitem__)
            regret = times[chosen] / times[best]
            chosen_total += times[chosen]
            best_total += times[best]
            flag = "!!" if regret >= 1.03 else "  "
            routes = " ".join(f"{k}={times[k]:.0f}ms/{costs[k] / 1e6:.0f}M" for k in costs)
            print(f"{flag} {r['mode']:4s} {size} {r['format']:3s} {phase}: chose {chosen:10s} "
                  f"fastest {best:10s} regret {regret:.2f}  {routes}")  # fmt: skip
    print(f"chosen over fastest, summed: {chosen_total / best_total:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", metavar="OUT")
    parser.add_argument("--evaluate", metavar="IN")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="subset of " + ",".join(FORMATS)
    )
    parser.add_argument("--modes", default=",".join(MODES), help="subset of " + ",".join(MODES))
    parser.add_argument("--sizes", default="", help="indices into SIZES (default: all)")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.collect:
        sizes = [SIZES[int(k)] for k in args.sizes.split(",") if k] or SIZES
        formats, modes = tuple(args.formats.split(",")), tuple(args.modes.split(","))
        collect(args.collect, args.reps, formats, modes, sizes)
    if args.evaluate:
        evaluate(args.evaluate, dict(item.split("=", 1) for item in args.set))
    if not (args.collect or args.evaluate):
        parser.error("give --collect OUT.json and/or --evaluate IN.json")


if __name__ == "__main__":
    main()
