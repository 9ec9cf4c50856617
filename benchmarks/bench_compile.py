"""``torch.compile`` (default backend, inductor) on the paper's UCF11 layer: compile time, and
eager against compiled forward and forward+backward.

The layer: ``kcprnn.LSTM(57600, 256, batch_first=True, format="kcp")`` (57,600 inputs, 1,024 gate
rows), rank 2, in the interleaved layout of the paper (``in [[2,4],[4,5],[4,5],[3,6]]``,
``out [[4,4],[2,2],[2,2],[2,2]]``) and the blocked one (each Kronecker factor owns whole modes,
``kcprnn.benchmarking.blocked_split``); a batch of 16 clips of 6 frames.

Each (layout, threads) case runs in a fresh subprocess with inductor's caches off, so that the
compile times are cold: the first compiled call under ``no_grad`` (the inference graph), then
the first forward+backward (the training graphs). Then the four timed functions (eager and
compiled, forward under ``no_grad`` and forward+backward of ``output.sum()``) are warmed up and
their repetitions interleaved: one call of each per round, in an order that runs through all 24
permutations of the four (``--order balanced``, the default), so that every call follows every
other equally often (use a multiple of 24 rounds for exact balance). The state a call leaves
behind (caches, the allocator) changes the next call's time; a fixed cyclic order (``--order
cyclic``, the order rotated every round, which keeps each call's predecessor: the compiled
training step always right after the eager one) biases the paired differences by that. With
``--block K`` each function runs ``K`` times in a row at its turn and the first call of each
block (the one that follows another function) is not recorded: the steady state of a program
that calls one model over and over, where each call finds its own code and data as its previous
call left them; with one call per turn (the default) every call follows another function's. The
medians and minimums of the wall time are reported, and the medians of the process CPU time
(``time.process_time``: the time the process ran, which a loaded machine inflates far less than
the wall time) with the median over rounds of each compiled call's CPU time minus the same
round's eager call's. Run it under ``nice`` on a shared machine.

``--split`` also times the operator bodies of every training step (CPU time; compiled: the
forward and backward bodies of ``kcprnn::layer_kcp``; eager: the forward and backward of the KCP
walk's and of the LSTM recurrence's ``autograd.Function``) and reports the medians of the
bodies' time and of the rest of the step (module Python, autograd engine, dynamo, AOT
autograd and inductor's runtime, the graph's own kernels) with their paired compiled - eager
medians. The timers add a few microseconds per body (four bodies an eager training step, two a
compiled one), so keep the headline numbers from a run without it.

Usage::

    nice python benchmarks/bench_compile.py [--threads 1 2] [--reps 30] [--block K] [--out DIR]
        [--split]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

LAYOUTS = {
    "interleaved": {
        "in_modes": [[2, 4], [4, 5], [4, 5], [3, 6]],
        "out_modes": [[4, 4], [2, 2], [2, 2], [2, 2]],
    },
    "blocked": {
        "in_modes": [[8, 1], [20, 1], [1, 20], [1, 18]],
        "out_modes": [[8, 2], [4, 1], [4, 1], [4, 1]],
    },
}
BATCH, FRAMES, INPUT, HIDDEN, RANK = 16, 6, 57_600, 256, 2


BODIES = {
    "compiled": [("kcprnn._compile_kcp", "_kcp_forward"), ("kcprnn._compile_kcp", "_kcp_backward")],
    "eager": [
        ("kcprnn.formats.kcp.backward", "SequentialProduct.forward"),
        ("kcprnn.formats.kcp.backward", "SequentialProduct.backward"),
        ("kcprnn.rnn.fused", "_LSTMSequence.forward"),
        ("kcprnn.rnn.fused", "_LSTMSequence.backward"),
    ],
}


def time_bodies(spent: dict[str, float]) -> None:
    """Wrap the operator bodies of :data:`BODIES` so that every call adds its process CPU time
    to ``spent[name]`` (``--split``)."""
    import importlib

    for entries in BODIES.values():
        for module_name, qualname in entries:
            owner = importlib.import_module(module_name)
            *outer, name = qualname.split(".")
            for part in outer:
                owner = getattr(owner, part)
            body = getattr(owner, name)

            def timed(*args, _body=body, _name=qualname):
                start = time.process_time()
                try:
                    return _body(*args)
                finally:
                    spent[_name] = spent.get(_name, 0.0) + time.process_time() - start

            setattr(owner, name, staticmethod(timed) if outer else timed)


def split_report(cpu: dict[str, list[float]], bodies: dict[str, list[dict[str, float]]]) -> dict:
    """``--split``: the medians (ms) of the training step's bodies' CPU time and of the rest of
    the step, eager and compiled, with their paired compiled - eager medians."""
    row: dict = {}
    for mode in ("eager", "compiled"):
        key = f"{mode}_train"
        inside = [sum(b.values()) for b in bodies[key]]
        row[f"{mode}_bodies_ms"] = round(1e3 * statistics.median(inside), 3)
        row[f"{mode}_outside_ms"] = round(
            1e3 * statistics.median(t - b for t, b in zip(cpu[key], inside, strict=True)), 3
        )
        names = sorted({n for b in bodies[key] for n in b})
        row[f"{mode}_each_ms"] = {
            n: round(1e3 * statistics.median(b.get(n, 0.0) for b in bodies[key]), 3) for n in names
        }
    inside_c = [sum(b.values()) for b in bodies["compiled_train"]]
    inside_e = [sum(b.values()) for b in bodies["eager_train"]]
    rounds = list(zip(cpu["compiled_train"], inside_c, cpu["eager_train"], inside_e, strict=True))
    row["paired_bodies_ms"] = round(1e3 * statistics.median(c - e for _, c, _, e in rounds), 3)
    row["paired_outside_ms"] = round(
        1e3 * statistics.median((tc - c) - (te - e) for tc, c, te, e in rounds), 3
    )
    return row


def run_case(
    layout: str,
    threads: int,
    reps: int,
    split: bool = False,
    order_kind: str = "balanced",
    block: int = 1,
) -> dict:
    """One case in this process (a fresh one: see :func:`main`)."""
    import torch

    import kcprnn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", rank=RANK, **LAYOUTS[layout])
    x = torch.randn(BATCH, FRAMES, INPUT)
    compiled = torch.compile(model)

    def forward(m):
        def run():
            with torch.no_grad():
                return m(x)[0]

        return run

    def train(m):
        def run():
            model.zero_grad(set_to_none=True)
            out = m(x)[0]
            out.sum().backward()
            return out

        return run

    start = time.perf_counter()
    out_c = forward(compiled)()
    compile_forward = time.perf_counter() - start
    start = time.perf_counter()
    train(compiled)()
    compile_train = time.perf_counter() - start
    grads_c = [p.grad.clone() for p in model.parameters()]
    out_e = forward(model)()
    train(model)()
    grads_e = [p.grad.clone() for p in model.parameters()]
    err_out = (out_c - out_e).abs().max().item()
    err_grad = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(grads_c, grads_e, strict=True)
    )

    funcs = {
        "eager_forward": forward(model),
        "compiled_forward": forward(compiled),
        "eager_train": train(model),
        "compiled_train": train(compiled),
    }
    times: dict[str, list[float]] = {k: [] for k in funcs}
    cpu: dict[str, list[float]] = {k: [] for k in funcs}
    bodies: dict[str, list[dict[str, float]]] = {k: [] for k in funcs}
    spent: dict[str, float] = {}
    if split:
        time_bodies(spent)
    names = list(funcs)
    orders = list(itertools.permutations(names))
    for _ in range(3):
        for k in names:
            funcs[k]()
    for r in range(reps):
        if order_kind == "cyclic":
            order = names[r % len(names) :] + names[: r % len(names)]
        else:
            order = list(orders[r % len(orders)])
        for k in order:
            for i in range(block):
                spent.clear()
                start, start_cpu = time.perf_counter(), time.process_time()
                funcs[k]()
                cpu_time, wall = time.process_time() - start_cpu, time.perf_counter() - start
                if block > 1 and i == 0:  # follows another function's call: not recorded
                    continue
                cpu[k].append(cpu_time)
                times[k].append(wall)
                bodies[k].append(dict(spent))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    mins = {k: 1e3 * min(v) for k, v in times.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    # paired: each round's compiled call against the same round's eager call
    paired = {
        kind: 1e3
        * statistics.median(
            c - e for c, e in zip(cpu[f"compiled_{kind}"], cpu[f"eager_{kind}"], strict=True)
        )
        for kind in ("forward", "train")
    }
    result = {
        "layout": layout,
        "threads": threads,
        "compile_forward_s": round(compile_forward, 2),
        "compile_train_s": round(compile_train, 2),
        "max_abs_error_output": err_out,
        "max_rel_error_grads": err_grad,
        "median_ms": {k: round(v, 3) for k, v in ms.items()},
        "min_ms": {k: round(v, 3) for k, v in mins.items()},
        "compiled_over_eager_forward": round(ms["compiled_forward"] / ms["eager_forward"], 3),
        "compiled_over_eager_train": round(ms["compiled_train"] / ms["eager_train"], 3),
        "cpu_median_ms": {k: round(v, 3) for k, v in cpu_ms.items()},
        "cpu_compiled_minus_eager_ms": {k: round(v, 3) for k, v in paired.items()},
        "cpu_compiled_over_eager_train": round(cpu_ms["compiled_train"] / cpu_ms["eager_train"], 3),
        "order": order_kind,
        "block": block,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if split:
        result["split"] = split_report(cpu, bodies)
    return result


def versions() -> dict:
    import torch

    import kcprnn

    return {
        "torch": torch.__version__,
        "kcprnn": getattr(kcprnn, "__version__", "?"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "?",
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    parser.add_argument(
        "--split", action="store_true", help="also time the operator bodies (see above)"
    )
    parser.add_argument(
        "--order",
        choices=["balanced", "cyclic"],
        default="balanced",
        help="the calls' order in each round (see above)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive calls of each function per round; the first of each block is not "
        "recorded (see above)",
    )
    parser.add_argument("--case", nargs=2, metavar=("LAYOUT", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        result = run_case(
            args.case[0], int(args.case[1]), args.reps, args.split, args.order, args.block
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    results = []
    for threads in args.threads:
        for layout in args.layouts:
            cmd = [sys.executable, __file__, "--case", layout, str(threads)]
            cmd += ["--reps", str(args.reps), "--order", args.order, "--block", str(args.block)]
            cmd += ["--split"] if args.split else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"case {layout}/{threads} failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "setup": {
            "batch": BATCH,
            "frames": FRAMES,
            "input": INPUT,
            "hidden": HIDDEN,
            "rank": RANK,
            "reps": args.reps,
            "split": args.split,
            "order": args.order,
            "block": args.block,
        },
        "results": results,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.out / "results.json")


if __name__ == "__main__":
    main()
