"""The recurrence-bound regimes: torch.nn against kcprnn in every weight format, forward and
forward+backward, on the CPU.

Regimes:

- ``speech``: bidirectional LSTM (and GRU, Elman RNN), T=300 frames, batch 16, 40 features per
  frame, hidden 512 (TIMIT/TED-LIUM-like acoustic models); kcprnn with ``W_ih`` in ``format``
  and ``W_hh`` in ``hidden_format``, the formats' default options except KCP's, which are
  given explicitly (:data:`KCP_OPTIONS`: rank 1, 2 factors) so that a change of the default
  does not change what is measured.
- ``spikes``: unidirectional LSTM, T=250 time bins, batch 16, 700 input channels (SHD), hidden
  256.
- ``streaming``: one ``LSTMCell`` step at batch 1 without gradients, at the speech size
  (40 -> 512, KCP weights) and the video size (57,600 -> 256, KCP ``W_ih`` with
  ``in_modes=[8, 20, 20, 18]``, dense ``W_hh``), against ``torch.nn.LSTMCell``.

Timing: every case is built and warmed up, then the repetitions are interleaved (one call of
each case per round, the order rotated every round) and the median per case is reported with its
ratio to the torch.nn case of the same regime. ``fwd``: the module's forward with gradients
enabled (what training pays before the backward); ``fwd+bwd``: forward, a sum of the output,
backward. The route each kcprnn layer took (``recurrence="auto"``) is recorded; a format pair
written ``kcp/kcp@torch`` forces that route instead. Whether the compiled CPU kernels were
available (``kcprnn build``; ``KCPRNN_NATIVE=0`` disables them) is recorded with the results.

Usage::

    python benchmarks/bench_recurrence.py [--threads 2] [--reps 5]
        [--regimes speech,spikes,streaming] [--modes LSTM,GRU,RNN] [--formats kcp/kcp,...]
        [--out benchmarks/results/recurrence]

Writes ``bench.json`` (every case: route, median and min ms, ratio to torch.nn),
``bench.csv`` (the same, one row per case and timing) and ``console.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

import kcprnn

try:  # absent from kcprnn versions without routes (the script then runs them as they are)
    from kcprnn.rnn import plan
except ImportError:  # pragma: no cover - older kcprnn
    plan = None

SPEECH = {"steps": 300, "batch": 16, "input": 40, "hidden": 512}
SPIKES = {"steps": 250, "batch": 16, "input": 700, "hidden": 256}
# (format of W_ih, format of W_hh); the hidden format names the case
SPEECH_FORMATS = [
    ("dense", "dense"),
    ("kcp", "dense"),
    ("kcp", "kcp"),
    ("tt", "tt"),
    ("tr", "tr"),
    ("bt", "bt"),
    ("ht", "ht"),
    ("cp", "cp"),
    ("tucker", "tucker"),
]
OTHER_MODES = SPEECH_FORMATS  # GRU and RNN, speech size
KCP_OPTIONS = {"rank": 1, "num_factors": 2}
SPIKE_FORMATS = [("dense", "dense"), ("kcp", "dense"), ("kcp", "kcp"), ("tt", "tt")]


def _routes(model: nn.Module, rows: int, steps: int) -> list[str]:
    """The route ``auto`` takes in every layer of ``model`` (training)."""
    if plan is None:
        return []
    out = []
    for layer in range(model.num_layers):
        cells = [model.cell(layer, d) for d in range(model.num_directions)]
        out.append(plan.choose_route("auto", cells, rows, steps, True, True))
    return out


def sequence_cases(regime: str, cfg: dict, mode: str, formats, bidirectional: bool):
    """``(name, module, input, route)`` of one regime and recurrent kind."""
    torch_cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[mode]
    ours_cls = {"LSTM": kcprnn.LSTM, "GRU": kcprnn.GRU, "RNN": kcprnn.RNN}[mode]
    x = torch.randn(cfg["steps"], cfg["batch"], cfg["input"])
    size = (cfg["input"], cfg["hidden"])
    cases = [(f"{regime}/{mode}/torch.nn", torch_cls(*size, bidirectional=bidirectional), x, "")]
    for pair in formats:
        fmt, hfmt, forced = pair if len(pair) == 3 else (*pair, "")
        model = ours_cls(
            *size,
            bidirectional=bidirectional,
            format=fmt,
            hidden_format=hfmt,
            **_options(fmt, hfmt),
        )
        if forced:
            model.recurrence = forced
            route = forced
        else:
            route = ",".join(_routes(model, cfg["steps"] * cfg["batch"], cfg["steps"]))
        tag = f"@{forced}" if forced else ""
        cases.append((f"{regime}/{mode}/kcprnn[{fmt}/{hfmt}{tag}]", model, x, route))
    return cases


def _options(fmt: str, hfmt: str) -> dict:
    """KCP's options, explicit for whichever matrix is KCP (:data:`KCP_OPTIONS`)."""
    out: dict = dict(KCP_OPTIONS) if fmt == "kcp" else {}
    if hfmt == "kcp":
        out["hidden_options"] = dict(KCP_OPTIONS)
    return out


def streaming_cases():
    """One cell step at batch 1 without gradients: (name, module, input, route)."""
    out = []
    for size, name, opts in [
        ((40, 512), "speech", {"format": "kcp", "hidden_format": "kcp", **_options("kcp", "kcp")}),
        ((57_600, 256), "video", {"format": "kcp", "in_modes": [8, 20, 20, 18], **KCP_OPTIONS}),
    ]:
        x = torch.randn(1, size[0])
        out.append((f"streaming-{name}/LSTMCell/torch.nn", nn.LSTMCell(*size), x, ""))
        cell = kcprnn.LSTMCell(*size, **opts)
        with torch.no_grad():
            dense = getattr(cell, "_use_dense", None)
            route = "" if dense is None else "dense-cell" if dense(1) else "structured-cell"
        out.append((f"streaming-{name}/LSTMCell/kcprnn[kcp]", cell, x, route))
    return out


def fwd(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model(x)

    return run


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        out = model(x)[0]
        out.sum().backward()

    return run


def no_grad_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def interleaved(fns: dict[str, Callable[[], None]], reps: int, inner: int = 1) -> dict:
    """Median and min seconds per call of each function, repetitions interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--regimes", default="speech,spikes,streaming")
    ap.add_argument("--modes", default="LSTM,GRU,RNN", help="kinds run at the speech size")
    ap.add_argument(
        "--formats", default="", help="only these W_ih/W_hh pairs, e.g. dense/dense,kcp/kcp"
    )
    ap.add_argument("--out", default="benchmarks/results/recurrence")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    regimes = args.regimes.split(",")
    modes = args.modes.split(",")
    only = [pair for pair in args.formats.split(",") if pair]

    def chosen(formats: list[tuple[str, str]]) -> list[tuple[str, ...]]:
        """The pairs of ``formats`` named by ``--formats`` (all without it), plus the forced
        routes it names (``kcp/kcp@torch``)."""
        if not only:
            return list(formats)
        out: list[tuple[str, ...]] = []
        for pair in only:
            names, _, forced = pair.partition("@")
            fmt, hfmt = names.split("/")
            if (fmt, hfmt) in formats:
                out.append((fmt, hfmt, forced) if forced else (fmt, hfmt))
        return out

    groups: list[tuple[str, list, str]] = []  # (group, cases, kind of timing)
    if "speech" in regimes:
        for mode in modes:
            formats = chosen(SPEECH_FORMATS if mode == "LSTM" else OTHER_MODES)
            cases = sequence_cases("speech", SPEECH, mode, formats, True)
            groups.append((f"speech/{mode}", cases, "sequence"))
    if "spikes" in regimes:
        groups.append(
            (
                "spikes/LSTM",
                sequence_cases("spikes", SPIKES, "LSTM", chosen(SPIKE_FORMATS), False),
                "seq",
            )
        )
    if "streaming" in regimes:
        cases = streaming_cases()
        groups.append(("streaming-speech", cases[:2], "cell"))
        groups.append(("streaming-video", cases[2:], "cell"))
    lines: list[str] = []
    results = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    kernels = _kernels()
    load_before = os.getloadavg()
    say(
        f"# bench_recurrence {datetime.now(UTC).isoformat(timespec='seconds')} "
        f"torch {torch.__version__} kcprnn {getattr(kcprnn, '__version__', '?')} "
        f"threads {args.threads} reps {args.reps} "
        f"{platform.processor() or platform.machine()} compiled kernels: "
        f"{'yes' if kernels.get('available') else 'no'} load average "
        + " ".join(f"{v:.1f}" for v in load_before)
    )
    for group, cases, kind in groups:
        timings = {}
        if kind == "cell":
            fns = {name: no_grad_step(m, x) for name, m, x, _ in cases}
            timings["step"] = interleaved(fns, args.reps, inner=20)
        else:
            timings["fwd"] = interleaved({n: fwd(m, x) for n, m, x, _ in cases}, args.reps)
            timings["fwd+bwd"] = interleaved({n: fwd_bwd(m, x) for n, m, x, _ in cases}, args.reps)
        ref = cases[0][0]
        say(f"\n## {group}")
        say(
            f"{'case':44s} {'route':22s} "
            + " ".join(f"{k + ' ms':>12s} {'x torch':>8s}" for k in timings)
        )
        for name, _, _, route in cases:
            row = {"case": name, "group": group, "route": route}
            cols = []
            for k, t in timings.items():
                med, base = t[name]["median"], t[ref]["median"]
                row[k] = {"median_ms": med * 1e3, "min_ms": t[name]["min"] * 1e3}
                row[k]["ratio_to_torch"] = med / base
                cols.append(f"{med * 1e3:12.2f} {med / base:8.2f}")
            results.append(row)
            say(f"{name:44s} {route:22s} " + " ".join(cols))
    load_after = os.getloadavg()
    say("\n# load average at the end " + " ".join(f"{v:.1f}" for v in load_after))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "kcprnn": getattr(kcprnn, "__version__", "?"),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "kcp_options": KCP_OPTIONS,
        "torch": torch.__version__,
        "threads": args.threads,
        "reps": args.reps,
        "machine": platform.machine(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "kcprnn_kernels": kernels,
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "console.txt").write_text("\n".join(lines) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["group", "case", "route", "timing", "median_ms", "min_ms", "ratio_to_torch", "threads"]
        )
        for row in results:
            for timing in ("fwd", "fwd+bwd", "step"):
                if timing in row:
                    t = row[timing]
                    writer.writerow(
                        [
                            row["group"],
                            row["case"],
                            row["route"],
                            timing,
                            f"{t['median_ms']:.3f}",
                            f"{t['min_ms']:.3f}",
                            f"{t['ratio_to_torch']:.4f}",
                            args.threads,
                        ]
                    )


def _kernels() -> dict:
    """Whether kcprnn's compiled CPU kernels run in this process (building them if needed)."""
    try:
        from kcprnn._cpu import native
    except ImportError:  # pragma: no cover - kcprnn versions without the kernels
        return {"available": False, "error": "no kcprnn._cpu.native"}
    info = native.info()
    return {k: v for k, v in info.items() if k != "path"}


if __name__ == "__main__":
    main()
