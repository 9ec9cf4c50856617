"""Streaming inference at batch 1: torch.nn's cells and layers against kcprnn's with KCP weights.

Cases, without gradients, on ``--threads`` threads (default 1):

- ``cell``: one step of an ``LSTMCell``, ``GRUCell`` and ``RNNCell`` (tanh) at the speech size
  (40 -> 512) and the video size (57,600 -> 256), kcprnn with its weights ``dense``, ``W_ih``
  in KCP (``kcp-ih``, default size), both in KCP at the default size (``kcp-both``) and at rank
  1 (``kcp-r1``), both in TT, TR, HT, BT, Tucker or CP at rank 4 (``tt-both``, ...), against
  the ``torch.nn`` cell of the same mode and size;
- ``sequence``: ``LSTM``, ``GRU`` and ``RNN`` (tanh) over ``--steps`` (default 1,000) steps at
  batch 1, speech size, the same formats (routes ``auto``), against ``torch.nn``.

Every case is built and warmed up; the repetitions of one group (a mode and size) are
interleaved, one timed block per case per round (about 0.3 ms of calls, or one call: short
blocks are seldom cut by the scheduler on a shared machine), and each case reports the median
time of its blocks and its speed-up over torch.nn (torch's median over kcprnn's). The route
each kcprnn case took (``dense``: torch's fused cell on the kept dense weights; ``native``: the
compiled step; ``ops``: torch ops), the versions, the CPU and the load average before and
after are recorded.

Usage::

    python benchmarks/bench_streaming.py [--threads 1] [--rounds 41] [--steps 1000]
        [--cases cell,sequence] [--sizes speech,video] [--out DIR]

Writes ``bench.json`` and ``console.txt`` under ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

import kcprnn

SIZES = {"speech": (40, 512), "video": (57_600, 256)}
FORMATS = {
    "dense": {"format": "dense"},
    "kcp-ih": {"format": "kcp"},
    "kcp-both": {"format": "kcp", "hidden_format": "kcp"},
    "kcp-r1": {"format": "kcp", "hidden_format": "kcp", "rank": 1, "hidden_options": {"rank": 1}},
}
# the other formats, both matrices at rank 4 (the regime suite's size)
FORMATS.update(
    {
        f"{f}-both": {"format": f, "hidden_format": f, "rank": 4, "hidden_options": {"rank": 4}}
        for f in ("tt", "tr", "ht", "bt", "tucker", "cp")
    }
)
MODES = ("LSTM", "GRU", "RNN")


def _route(cell) -> str:
    """Which step a kcprnn cell takes at one row without gradients."""
    if cell._use_dense(1):
        return "dense"
    return "native" if getattr(cell, "_native_cache", None) is not None else "ops"


def _block(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _interleave(cases: dict[str, Callable[[], object]], rounds: int, budget: float) -> dict:
    """Median seconds per call of every case, the blocks of one round run one per case, the
    order rotated every round; each block takes about ``budget`` seconds (at least 1 call)."""
    calls = {}
    for name, fn in cases.items():
        fn()
        fn()
        once = _block(fn, 1)
        calls[name] = max(1, int(budget / max(once, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_block(cases[name], calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def cell_group(mode: str, size: str, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    n_in, hidden = SIZES[size]
    x = torch.randn(1, n_in)
    state = (torch.randn(1, hidden), torch.randn(1, hidden))
    hx = state if mode == "LSTM" else state[0]
    torch_cell = getattr(nn, f"{mode}Cell")(n_in, hidden)
    cells = {"torch.nn": torch_cell}
    for name, options in FORMATS.items():
        cells[name] = getattr(kcprnn, f"{mode}Cell")(n_in, hidden, **options)
    cases = {name: (lambda c=c: c(x, hx)) for name, c in cells.items()}
    with torch.no_grad():
        medians = _interleave(cases, rounds, 3e-4)
        routes = {name: _route(c) for name, c in cells.items() if name != "torch.nn"}
    base = medians["torch.nn"]
    return [
        {
            "case": "cell",
            "mode": mode,
            "size": size,
            "weights": name,
            "us": round(t * 1e6, 2),
            "speedup": round(base / t, 2),
            "route": routes.get(name, ""),
        }
        for name, t in medians.items()
    ]


def sequence_group(mode: str, steps: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    n_in, hidden = SIZES["speech"]
    x = torch.randn(steps, 1, n_in)
    layers = {"torch.nn": getattr(nn, mode)(n_in, hidden)}
    for name, options in FORMATS.items():
        layers[name] = getattr(kcprnn, mode)(n_in, hidden, **options)
    cases = {name: (lambda m=m: m(x)) for name, m in layers.items()}
    with torch.no_grad():
        medians = _interleave(cases, rounds, 0.0)
    routes = {}
    for name, m in layers.items():
        if name != "torch.nn":
            cell = m.cell(0)
            model = cell.weight_hh.planning_model()
            costs = kcprnn.rnn.plan.layer_costs([cell], steps, steps, True, False, model)
            routes[name] = min(costs, key=lambda r: costs[r])
    base = medians["torch.nn"]
    return [
        {
            "case": "sequence",
            "mode": mode,
            "size": f"speech T={steps}",
            "weights": name,
            "ms": round(t * 1e3, 2),
            "speedup": round(base / t, 2),
            "route": routes.get(name, ""),
        }
        for name, t in medians.items()
    ]


def _environment(threads: int) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(kcprnn.__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "kcprnn": getattr(kcprnn, "__version__", ""),
        "commit": commit,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "native": kcprnn._cpu.native.info(),
    }


def _write(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--cases", default="cell,sequence")
    ap.add_argument("--sizes", default="speech,video")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = _environment(args.threads)
    env["load_before"] = os.getloadavg()
    rows: list[dict] = []
    lines: list[str] = []
    modes = args.modes.split(",")
    for case in args.cases.split(","):
        for mode in modes:
            if case == "cell":
                groups = [cell_group(mode, size, args.rounds) for size in args.sizes.split(",")]
            else:
                groups = [sequence_group(mode, args.steps, max(3, args.rounds // 8))]
            for group in groups:
                for row in group:
                    unit = "us" if "us" in row else "ms"
                    line = (
                        f"{row['case']:8} {row['size']:16} {row['mode']:4} {row['weights']:9} "
                        f"{row[unit]:>10.2f} {unit}  x{row['speedup']:<7} {row['route']}"
                    )
                    print(line, flush=True)
                    lines.append(line)
                rows += group
    env["load_after"] = os.getloadavg()
    lines.append(f"load average before {env['load_before']}, after {env['load_after']}")
    print(lines[-1])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        _write(args.out / "bench.json", json.dumps({"environment": env, "rows": rows}, indent=1))
        _write(args.out / "console.txt", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
