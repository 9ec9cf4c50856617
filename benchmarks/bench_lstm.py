"""One LSTM training step at the UCF11 size: torch.nn.LSTM against kcprnn.LSTM in every format.

The step (the paper's UCF11 model, docs/experiments.md): batch 16, 6 frames of 57,600 features
(160x120 RGB), hidden 256, a linear head over 11 classes on the last hidden state,
cross-entropy, forward and backward. The input-to-hidden matrix is tensorized as in the papers,
in ``8x20x20x18`` and out ``16x4x4x4``
(``hidden_modes=[4,4,4,4]``, the 4 gates folded into the first mode), ranks 4; KCP uses nested
modes ``in [[2,4],[4,5],[4,5],[3,6]]``, ``out [[4,4],[2,2],[2,2],[2,2]]``, and ``kcp-blocked``
gives each factor whole modes, ``in [[8,1],[20,1],[1,20],[1,18]]``, ``out [[8,2],[4,1],[4,1],
[4,1]]``.

Timing: every case is warmed up, then the repetitions are interleaved (one step of each case per
round, the order rotated every round) and the median is reported with its ratio to
``torch.nn.LSTM`` from the same run. Peak memory: on CUDA ``max_memory_allocated`` above what was
allocated before the model was built; on CPU the growth of the peak RSS (``ru_maxrss``) of a fresh
subprocess per case, over its RSS after the input batch was made.

On a shared machine, multi-threaded CPU timings suffer when a worker thread is descheduled (every
parallel region waits for it): the ``min`` columns and ``--threads 1`` are the robust readings
there; the medians are the numbers for a quiet machine.

Usage::

    python benchmarks/bench_lstm.py [--device cpu] [--quick] [--threads 2] [--out bench.json]
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
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
from torch import nn

import kcprnn

BATCH, FRAMES, INPUT, HIDDEN, CLASSES = 16, 6, 57_600, 256, 11
IN_MODES, HIDDEN_MODES = [8, 20, 20, 18], [4, 4, 4, 4]
RANK = 4
# Options per format (the paper's tensorization, ranks ~4); a format not listed gets rank=4.
FORMAT_OPTIONS: dict[str, dict] = {
    "dense": {},
    "kcp": {
        "in_modes": [[2, 4], [4, 5], [4, 5], [3, 6]],
        "out_modes": [[4, 4], [2, 2], [2, 2], [2, 2]],
        "rank": RANK,
    },
    "bt": {"rank": RANK, "blocks": 2},
    # KCP's fast layout: each Kronecker factor owns whole modes (kcprnn.benchmarking.blocked_split)
    "kcp-blocked": {
        "in_modes": [[8, 1], [20, 1], [1, 20], [1, 18]],
        "out_modes": [[8, 2], [4, 1], [4, 1], [4, 1]],
        "rank": RANK,
    },
}
TORCH_CASE = "torch.nn.LSTM"


def case_names() -> list[str]:
    names = sorted([*kcprnn.FORMATS, "kcp-blocked"])
    return [TORCH_CASE] + [f"kcprnn.LSTM[{name}]" for name in names]


def build(case: str, device: torch.device) -> nn.Module:
    """The recurrent module of ``case`` on ``device`` (float32)."""
    if case == TORCH_CASE:
        return nn.LSTM(INPUT, HIDDEN, batch_first=True, device=device)
    name = case[len("kcprnn.LSTM[") : -1]
    opts = FORMAT_OPTIONS.get(name, {"rank": RANK})
    opts = {"in_modes": IN_MODES, "hidden_modes": HIDDEN_MODES, **opts}
    fmt = name.split("-")[0]  # "kcp-blocked" is the kcp format in another layout
    return kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format=fmt, device=device, **opts)


class Step:
    """One training step of ``rnn`` + a linear head on a fixed batch."""

    def __init__(self, rnn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.rnn = rnn
        self.head = nn.Linear(HIDDEN, CLASSES, device=x.device)
        self.x, self.y = x, y
        self.params = [*rnn.parameters(), *self.head.parameters()]

    def __call__(self) -> float:
        for p in self.params:
            p.grad = None
        _, (h_n, _) = self.rnn(self.x)  # (1, b, h)
        loss = F.cross_entropy(self.head(h_n[-1]), self.y)
        loss.backward()
        return loss.item()  # synchronizes on CUDA


def make_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, FRAMES, INPUT, generator=g).to(device)  # (b, t, i) pixels in [0, 1)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)  # (b,)
    return x, y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> float:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``); returns the current RSS in
    MB. Elsewhere the peak is ``ru_maxrss``, which a subprocess inherits from its parent."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    current = _status_mb("VmRSS")
    return current if current is not None else peak_rss()


def peak_rss() -> float:
    """Peak resident set size in MB: ``VmHWM`` (per exec'd image), else ``ru_maxrss``."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(case: str, device: torch.device, steps: int) -> dict:
    """Run in a fresh process: peak RSS growth of building ``case`` and training ``steps``."""
    x, y = make_batch(device)
    base = reset_peak_rss()
    step = Step(build(case, device), x, y)
    for _ in range(steps):
        step()
    peak = peak_rss()
    return {"peak_rss_mb": peak, "base_rss_mb": base, "peak_mem_mb": peak - base}


def cpu_memory(case: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        case,
        "--device",
        "cpu",
        "--threads",
        str(args.threads),
        "--steps",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"memory_error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "kcprnn": kcprnn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    x, y = make_batch(device)
    cases, results = {}, {}
    for case in case_names():
        if args.formats and case != TORCH_CASE and not any(f"[{f}]" in case for f in args.formats):
            continue
        try:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            step = Step(build(case, device), x, y)
            for _ in range(args.warmup):
                step()
            sync(device)
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            results[case] = {"error": f"{type(err).__name__}: {err}"}
            continue
        info = {}
        if device.type == "cuda":
            info["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        rnn = step.rnn
        if isinstance(rnn, nn.LSTM):
            info["params"] = sum(p.numel() for p in rnn.parameters())
            info["input_params"] = rnn.weight_ih_l0.numel()
        else:
            s = kcprnn.summary(rnn, batch_size=BATCH, seq_len=FRAMES)
            info["params"] = s.params
            info["input_params"] = s.input_params
            info["macs_per_step"] = s.macs_per_step
        info["input_compression"] = INPUT * 4 * HIDDEN / info["input_params"]
        info["times_ms"] = []
        cases[case], results[case] = step, info

    names = list(cases)
    for r in range(args.reps):  # interleaved, order rotated every round
        k = r % len(names)
        for case in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            cases[case]()
            sync(device)
            results[case]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    for case in names:
        results[case]["median_ms"] = statistics.median(results[case]["times_ms"])
        results[case]["min_ms"] = min(results[case]["times_ms"])
    ref = results.get(TORCH_CASE, {})
    for case in names:
        if ref:  # median over median (the reported ratio); min over min (robust to load spikes)
            results[case]["speedup_vs_torch"] = ref["median_ms"] / results[case]["median_ms"]
            results[case]["speedup_vs_torch_min"] = ref["min_ms"] / results[case]["min_ms"]
    del cases  # free the models before the memory subprocesses run
    if device.type == "cpu" and args.memory:
        for case in names:
            results[case].update(cpu_memory(case, args))
    return {
        "benchmark": "lstm_train_step",
        "shape": {
            "batch": BATCH,
            "frames": FRAMES,
            "input": INPUT,
            "hidden": HIDDEN,
            "classes": CLASSES,
            "in_modes": IN_MODES,
            "hidden_modes": HIDDEN_MODES,
            "format_options": FORMAT_OPTIONS,
            "default_rank": RANK,
        },
        "reps": args.reps,
        "warmup": args.warmup,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(device),
        "results": results,
    }


def table(report: dict) -> str:
    head = (
        "case",
        "median ms",
        "x torch",
        "min ms",
        "x torch (min)",
        "peak MB",
        "params",
        "W_ih ratio",
    )
    rows = []
    for case, r in report["results"].items():
        if "error" in r:
            rows.append((case, "-", "-", "-", "-", "-", "-", r["error"][:60]))
            continue
        mem = r.get("peak_mem_mb")
        rows.append(
            (
                case,
                f"{r['median_ms']:.2f}",
                f"{r.get('speedup_vs_torch', 0):.1f}",
                f"{r['min_ms']:.2f}",
                f"{r.get('speedup_vs_torch_min', 0):.1f}",
                "-" if mem is None else f"{mem:.0f}",
                f"{r['params']:,}",
                f"{r['input_compression']:,.0f}x",
            )
        )
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    lines = [
        "  ".join(
            v.ljust(w) if c == 0 else v.rjust(w)
            for c, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    v = report["versions"]
    lines.append(
        f"torch {v['torch']}, kcprnn {v['kcprnn']}, {v['device']}, {v['threads']} "
        f"threads, {report['reps']} interleaved reps (median), batch {BATCH}, "
        f"{FRAMES} frames, {INPUT:,} -> {HIDDEN}"
    )
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    """Atomic write: temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (3, warm-up 1)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 9)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--formats", nargs="*", default=None, help="only these kcprnn formats")
    p.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the per-case peak-RSS subprocesses (CPU)",
    )
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, torch.device(args.device), args.steps)))
        return
    args.reps = args.reps or (3 if args.quick else 9)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    report = run(args)
    print(table(report))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
