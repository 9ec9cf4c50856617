"""``torch.compile`` (default backend) against eager for whole recurrent modules at the speech
and spike sizes, in every format: is the compiled module ever slower?

Each case is one module (``LSTM``, ``GRU`` or ``RNN``; bidirectional, batch-first) with
``format`` for ``W_ih`` and ``hidden_format`` for ``W_hh`` (rank 4, modes chosen by the
library), compiled once (the compile time of its inference and training graphs is reported),
then timed in rounds that interleave the two: per round, eager and compiled forward under
``no_grad`` and eager and compiled forward+backward of ``output.sum()``, the order of eager and
compiled swapped every round. Medians over rounds of the wall time, ms, and compiled over
eager; the compiled output's largest difference from eager's and the largest relative
difference of a parameter's gradient are recorded too. One process, ``torch._dynamo.reset()``
between cases.

Usage::

    python benchmarks/bench_compile_modules.py [--threads 1] [--rounds 15]
        [--input 40] [--hidden 256] [--steps 100] [--batch 16] [--out DIR]
        [--cases LSTM:dense:dense LSTM:kcp:kcp ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import kcprnn

CASES = [
    "LSTM:dense:dense",
    "LSTM:kcp:dense",
    "LSTM:kcp:kcp",
    "LSTM:tt:tt",
    "LSTM:tr:tr",
    "LSTM:bt:bt",
    "LSTM:ht:ht",
    "LSTM:cp:cp",
    "LSTM:tucker:tucker",
    "GRU:dense:dense",
    "GRU:kcp:kcp",
    "GRU:tt:tt",
    "RNN:kcp:kcp",
]


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(case: str, args: argparse.Namespace) -> dict:
    mode, fmt, hidden_fmt = case.split(":")
    torch.manual_seed(0)
    torch._dynamo.reset()
    cls = getattr(kcprnn, mode)
    options = {} if fmt == "dense" and hidden_fmt == "dense" else {"rank": 4}
    model = cls(
        args.input,
        args.hidden,
        batch_first=True,
        bidirectional=True,
        format=fmt,
        hidden_format=hidden_fmt,
        **options,
    )
    x = torch.randn(args.batch, args.steps, args.input)
    compiled = torch.compile(model)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        got = compiled(x)[0]
    model.train()
    compiled(x)[0].sum().backward()
    compile_s = time.perf_counter() - start
    with torch.no_grad():  # the compiled module computes what eager does
        output_error = (got - model.eval()(x)[0]).abs().max().item()
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        fn(x)[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    grad_error = max(
        ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        for a, b in zip(grads[1], grads[0], strict=True)
    )

    def forward(fn):
        model.eval()
        with torch.no_grad():
            fn(x)

    def train(fn):
        model.train()
        fn(x)[0].sum().backward()

    times: dict[str, list[float]] = {k: [] for k in ("fe", "fc", "te", "tc")}
    for fn in (model, compiled):  # warm-up
        forward(fn)
        train(fn)
    for r in range(args.rounds):
        order = [("e", model), ("c", compiled)]
        if r % 2:
            order.reverse()
        for kind, step in (("f", forward), ("t", train)):
            for tag, fn in order:
                times[kind + tag].append(once(lambda fn=fn, step=step: step(fn)))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "case": case,
        "compile_s": round(compile_s, 1),
        "max_abs_error_output": output_error,
        "max_rel_error_grads": grad_error,
        "forward_ms": {"eager": round(med["fe"], 3), "compiled": round(med["fc"], 3)},
        "train_ms": {"eager": round(med["te"], 3), "compiled": round(med["tc"], 3)},
        "forward_ratio": round(med["fc"] / med["fe"], 3),
        "train_ratio": round(med["tc"] / med["te"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--input", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "size": f"{args.input} -> {args.hidden}, T = {args.steps}, batch {args.batch}",
        "rounds": args.rounds,
    }
    print(json.dumps(setup))
    print(
        "| module: W_ih / W_hh | compile s | forward ms, eager / compiled | ratio "
        "| forward+backward ms, eager / compiled | ratio | error: output / gradients |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for case in args.cases:
        found = run_case(case, args)
        results.append(found)
        f, t = found["forward_ms"], found["train_ms"]
        print(
            f"| {case.replace(':', ' ', 1).replace(':', ' / ')} | {found['compile_s']} "
            f"| {f['eager']:.2f} / {f['compiled']:.2f} | {found['forward_ratio']:.3f} "
            f"| {t['eager']:.2f} / {t['compiled']:.2f} | {found['train_ratio']:.3f} "
            f"| {found['max_abs_error_output']:.1e} / {found['max_rel_error_grads']:.1e} |",
            flush=True,
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"setup": setup, "results": results}, indent=1)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(data)
        tmp.replace(args.out / "results.json")


if __name__ == "__main__":
    main()
