"""Dense rebuild of every format's speech-LSTM weights: ``to_dense`` forward and forward+backward.

The torch route of the TT, TR, BT, HT, CP and Tucker recurrent modules runs torch's fused LSTM
kernel on weights rebuilt dense once per call (``kcprnn.rnn.plan.dense_weight``), so that rebuild
is their whole overhead over ``torch.nn.LSTM``. This script takes the exact matrices the speech
models use, the cells' ``weight_ih`` / ``weight_hh`` of
``kcprnn.LSTM(input, hidden, format=F, hidden_format=F, bidirectional=True)`` for input 40 and
123 and hidden 512 and 256, and times per matrix, in float32 on one thread:

- ``fwd``: ``dense_weight(matrix)`` under ``torch.no_grad()``;
- ``fwd+bwd``: ``dense_weight(matrix).backward(G)`` with a fixed random ``G`` (the gradients
  reach every factor), parameter grads reset to ``None`` outside the timing;
- ``write W``: ``torch.empty(J, I).fill_(1.0)``, the floor of producing ``W`` at all;

each as wall time, CPU time of the thread (robust to preemption on a shared machine) and minor
page faults. Every case of one repetition runs back to back and the repetitions are interleaved
(rep 1 of every case, then rep 2, ...), so load from other jobs hits all cases alike; the table
reports medians. KCP (rebuilt by ``kcprnn.rnn.kron.rebuild``, not ``to_dense``) is listed for
reference. With ``--baseline-src DIR`` the script alternates child processes on ``DIR`` (another
checkout's ``src``) and on the current sources for ``--rounds`` rounds and prints both.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_rebuild.py [--reps N] [--out DIR]
        [--baseline-src OTHER/src --rounds R] [--formats tt cp ...]

Writes ``DIR/rebuild.json`` (default ``benchmarks/results/rebuild/latest``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
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


def _clock() -> tuple[float, float, float]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return time.perf_counter(), time.thread_time(), float(faults)


def _since(start: tuple[float, float, float]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of this thread and minor page faults since ``start``."""
    now = _clock()
    return now[0] - start[0], now[1] - start[1], now[2] - start[2]


def time_forward(case: dict) -> tuple[float, float, float]:
    m = case["matrix"]
    with torch.no_grad():
        t0 = _clock()
        dense_weight(m)
        return _since(t0)


def time_backward(case: dict) -> tuple[float, float]:
    m, g = case["matrix"], case["grad_out"]
    for p in m.parameters():
        p.grad = None
    t0 = _clock()
    dense_weight(m).backward(g)
    return _since(t0)


def time_write(case: dict) -> tuple[float, float, float]:
    j, i = case["shape"]
    t0 = _clock()
    torch.empty(j, i).fill_(1.0)
    return _since(t0)


def measure(formats: list[str], reps: int, warmup: int) -> list[dict]:
    """Interleaved repetitions of every case: per case its description and, per timer, the
    samples ``[[wall_s, cpu_s], ...]``."""
    torch.set_num_threads(1)
    all_cases = [c for c in cases() if c["format"] in formats]
    timers = {"fwd": time_forward, "fwdbwd": time_backward, "write": time_write}
    samples: dict[tuple[int, str], list[tuple[float, float, float]]] = {
        (id(c), k): [] for c in all_cases for k in timers
    }
    for rep in range(warmup + reps):
        for case in all_cases:
            for name, timer in timers.items():
                t = timer(case)
                if rep >= warmup:
                    samples[(id(case), name)].append(t)
    keep = ("format", "role", "shape", "macs", "params", "repr")
    return [
        {
            **{k: case[k] for k in keep},
            "samples": {k: samples[(id(case), k)] for k in timers},
        }
        for case in all_cases
    ]


def _key(row: dict) -> tuple:
    return row["format"], row["role"], tuple(row["shape"])


def _medians(samples: dict[str, list]) -> dict[str, float]:
    """Per timer, the median wall and CPU (thread) time in ms."""
    out = {}
    for k, v in samples.items():
        out[f"{k}_ms"] = statistics.median(x[0] for x in v) * 1e3
        out[f"{k}_cpu_ms"] = statistics.median(x[1] for x in v) * 1e3
        out[f"{k}_faults"] = statistics.median(x[2] for x in v)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def paired(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Rounds alternating a child process on ``--baseline-src`` and one on this checkout's
    sources (``PYTHONPATH``), ``--reps`` repetitions each; the samples of all rounds merged."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    sources = {"baseline": args.baseline_src, "current": os.environ.get("PYTHONPATH") or here}
    merged: dict[str, dict[tuple, dict]] = {name: {} for name in sources}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, src in sources.items():
                raw = Path(tmp) / f"{name}.json"
                command = [sys.executable, __file__, "--raw", str(raw), "--reps", str(args.reps)]
                command += ["--warmup", str(args.warmup), "--formats", *args.formats]
                env = {**os.environ, "PYTHONPATH": src}
                subprocess.run(command, env=env, check=True)
                for row in json.loads(raw.read_text()):
                    have = merged[name].setdefault(_key(row), {**row, "samples": {}})
                    for k, v in row["samples"].items():
                        have["samples"].setdefault(k, []).extend(v)
    return {name: list(rows.values()) for name, rows in merged.items()}


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
    parser.add_argument(
        "--baseline-src",
        help="a kcprnn source folder to compare with: rounds alternate a child process on it "
        "and one on the current sources",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --baseline-src")
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)  # child: raw samples
    args = parser.parse_args(argv)
    if args.raw is not None:
        _write_json(args.raw, measure(args.formats, args.reps, args.warmup))  # type: ignore[arg-type]
        return 0
    load_before = os.getloadavg()
    if args.baseline_src:
        runs = paired(args)
    else:
        runs = {"current": measure(args.formats, args.reps, args.warmup)}
    load_after = os.getloadavg()
    tables = {}
    for name, rows in runs.items():
        tables[name] = []
        for row in rows:
            samples = row.pop("samples")
            tables[name].append({**row, **_medians(samples), "n": len(samples["fwd"])})
    current = {_key(r): r for r in tables["current"]}
    base = {_key(r): r for r in tables.get("baseline", [])}
    header = (
        f"{'format':7} {'role':9} {'shape':>10} {'MACs':>11} {'fwd ms':>7} {'f+b ms':>7} "
        f"{'fwd cpu':>7} {'f+b cpu':>7} {'write':>6} {'faults':>6}"
    )
    if base:
        header += f"  {'base fwd':>8} {'base f+b':>8} {'faults':>6} {'base MACs':>11}  (cpu ms)"
    print(header)
    print("-" * len(header))
    for key, r in current.items():
        line = (
            f"{r['format']:7} {r['role']:9} {'x'.join(map(str, r['shape'])):>10} "
            f"{r['macs']:>11,} {r['fwd_ms']:7.3f} {r['fwdbwd_ms']:7.3f} {r['fwd_cpu_ms']:7.3f} "
            f"{r['fwdbwd_cpu_ms']:7.3f} {r['write_ms']:6.3f} {r['fwdbwd_faults']:6.0f}"
        )
        if key in base:
            b = base[key]
            line += f"  {b['fwd_cpu_ms']:8.3f} {b['fwdbwd_cpu_ms']:8.3f} {b['fwdbwd_faults']:6.0f}"
            line += f" {b['macs']:>11,}"
        print(line)
    result = {
        "torch": torch.__version__,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "reps": args.reps,
        "rounds": args.rounds if args.baseline_src else 1,
        "warmup": args.warmup,
        "baseline_src": args.baseline_src,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "dtype": "float32",
        "rows": tables["current"],
        "baseline_rows": tables.get("baseline"),
    }
    print(
        f"torch {torch.__version__}, 1 thread, load (1/5/15 min) "
        f"{' '.join(f'{x:.2f}' for x in load_before)} -> "
        f"{' '.join(f'{x:.2f}' for x in load_after)}"
    )
    _write_json(args.out / "rebuild.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
