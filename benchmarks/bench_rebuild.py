"""Dense rebuild of every format's speech-LSTM weights: ``to_dense`` forward and forward+backward.

The torch route of the TT, TR, BT, HT, CP and Tucker recurrent modules runs torch's fused LSTM
kernel on weights rebuilt dense once per call (``kcprnn.rnn.plan.dense_weight``), so that rebuild
is their whole overhead over ``torch.nn.LSTM``. This script takes the exact matrices the speech
models use, the cells' ``weight_ih`` / ``weight_hh`` of
``kcprnn.LSTM(input, hidden, format=F, hidden_format=F, bidirectional=True)`` for input 40 and
123 and hidden 512 and 256, and times per matrix, in float32 on one thread:

- ``fwd``: ``dense_weight(matrix)`` under ``torch.no_grad()``;
- ``fwd+bwd``: ``dense_weight(matrix)``, ``(W * G).sum().backward()`` with a fixed random ``G``
  (the gradients reach every factor), parameter grads reset to ``None`` outside the timing;
- ``write W``: ``torch.empty(J, I).fill_(1.0)``, the floor of producing ``W`` at all.

Every case of one repetition runs back to back and the repetitions are interleaved (rep 1 of
every case, then rep 2, ...), so load from other jobs on a shared machine hits all cases alike;
the table reports medians. KCP (rebuilt by ``kcprnn.rnn.kron.rebuild``, not ``to_dense``) is
listed for reference.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_rebuild.py [--reps N] [--out DIR]

Writes ``DIR/rebuild.json`` (default ``benchmarks/results/rebuild/latest``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kcprnn
from kcprnn.rnn.plan import dense_weight

FORMATS = ("tt", "tr", "bt", "ht", "cp", "tucker", "kcp")
INPUTS = (40, 123)
HIDDENS = (512, 256)


def cases() -> list[dict]:
    """One entry per distinct (format, role, shape): the LSTM's first cell's matrices."""
    found: dict[tuple[str, str, int, int], dict] = {}
    for fmt in FORMATS:
        for hidden in HIDDENS:
            for inp in INPUTS:
                torch.manual_seed(0)
                lstm = kcprnn.LSTM(inp, hidden, format=fmt, hidden_format=fmt, bidirectional=True)
                cell = lstm.cells[0]
                for role in ("weight_ih", "weight_hh"):
                    m = getattr(cell, role)
                    key = (fmt, role, m.out_features, m.in_features)
                    if key in found:
                        continue
                    g = torch.Generator().manual_seed(1)
                    found[key] = {
                        "format": fmt,
                        "role": role,
                        "shape": [m.out_features, m.in_features],
                        "matrix": m,
                        "grad_out": torch.randn(m.out_features, m.in_features, generator=g),
                        "macs": int(m.reconstruction_macs()),
                        "params": int(m.num_params),
                        "repr": m.extra_repr(),
                    }
    return list(found.values())


def time_forward(case: dict) -> float:
    m = case["matrix"]
    with torch.no_grad():
        t0 = time.perf_counter()
        dense_weight(m)
        return time.perf_counter() - t0


def time_backward(case: dict) -> float:
    m, g = case["matrix"], case["grad_out"]
    for p in m.parameters():
        p.grad = None
    t0 = time.perf_counter()
    (dense_weight(m) * g).sum().backward()
    return time.perf_counter() - t0


def time_write(case: dict) -> float:
    j, i = case["shape"]
    t0 = time.perf_counter()
    torch.empty(j, i).fill_(1.0)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "rebuild" / "latest",
    )
    parser.add_argument("--formats", nargs="*", default=list(FORMATS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    all_cases = [c for c in cases() if c["format"] in args.formats]
    timers = {"fwd": time_forward, "fwdbwd": time_backward, "write": time_write}
    samples = {(id(c), k): [] for c in all_cases for k in timers}
    load_before = os.getloadavg()
    for rep in range(args.warmup + args.reps):
        for case in all_cases:
            for name, timer in timers.items():
                t = timer(case)
                if rep >= args.warmup:
                    samples[(id(case), name)].append(t)
    load_after = os.getloadavg()
    rows = []
    header = (
        f"{'format':7} {'role':9} {'shape':>10} {'MACs':>11} {'fwd ms':>8} {'f+b ms':>8} "
        f"{'write ms':>8} {'fwd/write':>9}"
    )
    print(header)
    print("-" * len(header))
    for case in all_cases:
        med = {k: statistics.median(samples[(id(case), k)]) * 1e3 for k in timers}
        q = {
            k: statistics.quantiles(samples[(id(case), k)], n=4) if args.reps >= 4 else None
            for k in timers
        }
        row = {
            "format": case["format"],
            "role": case["role"],
            "shape": case["shape"],
            "macs": case["macs"],
            "params": case["params"],
            "repr": case["repr"],
            "fwd_ms": med["fwd"],
            "fwdbwd_ms": med["fwdbwd"],
            "write_ms": med["write"],
            "quartiles_ms": {
                k: None if v is None else [x * 1e3 for x in (v[0], v[2])] for k, v in q.items()
            },
        }
        rows.append(row)
        shape = "x".join(map(str, case["shape"]))
        print(
            f"{case['format']:7} {case['role']:9} {shape:>10} {case['macs']:>11,} "
            f"{med['fwd']:8.3f} {med['fwdbwd']:8.3f} {med['write']:8.3f} "
            f"{med['fwd'] / med['write']:9.1f}"
        )
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "dtype": "float32",
        "rows": rows,
    }
    print(f"torch {torch.__version__}, 1 thread, load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out / "rebuild.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
