"""Tables, log-log slopes and PNG plots from the suite's point dicts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = [
    "SWEEP_AXES",
    "fit_loglog_slope",
    "format_markdown",
    "format_point_table",
    "plot_sweeps",
    "sweep_series",
]

SWEEP_AXES = {
    "rank": "rank",
    "rows": "rows (batch x frames)",
    "input": "input features",
    "T": "sequence length T",
    "hidden": "hidden size",
}
"""Sweep name -> the label of its x axis."""

_SWEEP_SHORT = {"T": "T", "hidden": "H"}


def fit_loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (``t ~ x**slope``); needs 2+ points."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two or more (x, y) pairs, got {len(xs)} x and {len(ys)} y")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("log-log fit needs positive x and y")
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("log-log fit needs at least two distinct x values")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx


def sweep_series(points: list[dict[str, Any]], sweep: str, mode: str) -> dict[str, dict[str, Any]]:
    """``series -> {"x": [...], "ms": [...], "slope": s, "local_slopes": [...]}`` for one sweep.

    ``mode`` is ``"forward"`` or ``"forward_backward"`` (median ms), or ``"macs"`` (the counted
    forward multiply-accumulates, stored under ``"ms"`` too): the arithmetic's own slope, which
    does not depend on how quiet the machine was."""
    series: dict[str, dict[str, list[float]]] = {}
    for pt in points:
        if pt["sweep"] != sweep:
            continue
        for c in pt["cases"]:
            if mode == "macs":
                if c["status"] != "ok" or not c.get("macs"):
                    continue
                value = float(c["macs"])
            elif c["status"] != "ok" or mode not in c:
                continue
            else:
                value = float(c[mode]["median_ms"])
            s = series.setdefault(c["series"], {"x": [], "ms": []})
            s["x"].append(float(pt["x"]))
            s["ms"].append(value)
    out: dict[str, dict[str, Any]] = {}
    for name, s in series.items():
        order = sorted(range(len(s["x"])), key=lambda i: s["x"][i])
        xs, ys = [s["x"][i] for i in order], [s["ms"][i] for i in order]
        entry: dict[str, Any] = {"x": xs, "ms": ys}
        if len(set(xs)) >= 2:
            entry["slope"] = fit_loglog_slope(xs, ys)
            entry["local_slopes"] = [
                math.log(ys[i + 1] / ys[i]) / math.log(xs[i + 1] / xs[i])
                for i in range(len(xs) - 1)
            ]
        out[name] = entry
    return out


def plot_sweeps(points: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, str]:
    """One PNG per sweep present (forward and forward+backward panels); returns ``sweep -> path``.

    Written atomically (temporary file, then ``os.replace``)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for sweep, xlabel in SWEEP_AXES.items():
        if not any(pt["sweep"] == sweep for pt in points):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=80, sharey=False)
        for ax, mode in zip(axes, ("forward", "forward_backward"), strict=True):
            cmap = plt.get_cmap("tab20")  # 20 listed colours, cmap(k) is the k-th
            for k, (name, s) in enumerate(sorted(sweep_series(points, sweep, mode).items())):
                label = f"{name} ({s['slope']:+.2f})" if "slope" in s else name
                style = "--" if name.startswith(("tednet", "tltorch")) else "-"
                if name.startswith(("torch", "input")):
                    style = ":"
                ax.plot(
                    s["x"],
                    s["ms"],
                    style,
                    marker="o",
                    markersize=3,
                    label=label,
                    color=cmap(k % 20),
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median ms")
            ax.set_title(f"{mode.replace('_', '+')} vs {sweep} (log-log slope)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=5, loc="best", framealpha=0.6)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"sweep_{sweep}.png"
        tmp = path.with_suffix(".png.tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written[sweep] = str(path)
    return written


def _fmt_int(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def format_point_table(point: dict[str, Any]) -> str:
    """Plain-text table of one point: weight params, multiply-accumulates (``flops()``: the
    layer's own count; "MACs seen": matrix products counted by ``FlopCounterMode``), median
    forward and forward+backward ms, speedups over the dense baseline, forward time over the
    input read, and peak extra memory of forward+backward."""
    head = (
        f"{'case':<44} {'params':>11} {'flops()':>13} {'MACs seen':>13} {'fwd ms':>9} "
        f"{'f+b ms':>9} {'dense/fwd':>9} {'dense/f+b':>9} {'fwd/read':>8} {'mem f+b MiB':>11}"
    )
    lines = [f"== {point['name']} ==", head, "-" * len(head)]
    roof = point.get("roofline")
    if roof is not None:  # a regime point: "dense" is torch.nn's module
        lines.insert(
            1,
            f"roofline: input read {roof['read_ms']:.3g} ms, GEMM peak "
            f"{roof['gemm_peak_gmacs']:.1f} GMAC/s; dense = torch.nn's module",
        )
    for c in point["cases"]:
        if c["status"] != "ok":
            lines.append(f"{c['label']:<44} ERROR {c['error'][:100]}")
            continue
        r = c.get("ratios", {})
        fwd = c.get("forward", {}).get("median_ms")
        fb = c.get("forward_backward", {}).get("median_ms")
        mem = c.get("memory", {})
        mem_s = "-"
        if "forward_backward_bytes" in mem or "forward_bytes" in mem:
            peak = mem.get("forward_backward_bytes", mem.get("forward_bytes", 0))
            mem_s = f"{peak / 2**20:.1f}"
        elif "error" in mem:
            mem_s = "err"

        name = c["label"]
        if c.get("algorithm") == "auto" and "resolved_algorithm" in c:
            name += f" ({c['resolved_algorithm']})"

        def ratio(key: str, r: dict[str, float] = r) -> str:
            return f"{r[key]:.2f}" if key in r else "-"

        lines.append(
            f"{name[:44]:<44} {_fmt_int(c.get('params')):>11} {_fmt_int(c.get('model_macs')):>13} "
            f"{_fmt_int(c.get('macs')):>13} "
            f"{'-' if fwd is None else f'{fwd:.3f}':>9} {'-' if fb is None else f'{fb:.3f}':>9} "
            f"{ratio('speedup_vs_dense_forward'):>9} "
            f"{ratio('speedup_vs_dense_forward_backward'):>9} "
            f"{ratio('forward_over_read'):>8} {mem_s:>11}"
        )
    return "\n".join(lines)


def format_markdown(points: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """Markdown tables of the non-sweep points, under a line naming the versions and machine."""
    v = env["versions"]
    lines = [
        f"torch {v['torch']}, {env['threads']} threads, {env['device']} "
        f"({env.get('gpu', env['cpu'])}); "
        f"tednet {v.get('tednet')}, tensorly-torch {v.get('tensorly-torch')}, "
        f"opt-einsum {v.get('opt-einsum')}; {env['time_utc']}",
        "",
    ]
    for pt in points:
        if pt["sweep"] is not None:
            continue
        if "regime" in pt:
            lines += [format_regime_table(pt), ""]
            continue
        lines += [
            f"**{pt['name']}**",
            "",
            "| case | params | MACs | fwd ms | fwd+bwd ms | dense / fwd | dense / fwd+bwd "
            "| fwd / read | peak MiB (fwd+bwd) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in pt["cases"]:
            if c["status"] != "ok":
                lines.append(f"| {c['label']} | error: {c['error'][:80]} | | | | | | | |")
                continue
            r = c.get("ratios", {})
            name = c["label"]
            if c.get("algorithm") == "auto" and "resolved_algorithm" in c:
                name += f" (-> {c['resolved_algorithm']})"
            mem = c.get("memory", {})
            peak = mem.get("forward_backward_bytes", mem.get("forward_bytes"))

            def cell(key: str, r: dict[str, float] = r) -> str:
                return f"{r[key]:.2f}" if key in r else ""

            fwd = c.get("forward", {}).get("median_ms")
            fb = c.get("forward_backward", {}).get("median_ms")
            lines.append(
                f"| {name} | {_fmt_int(c.get('params'))} | {_fmt_int(c.get('macs'))} | "
                f"{'' if fwd is None else f'{fwd:.2f}'} | {'' if fb is None else f'{fb:.2f}'} | "
                f"{cell('speedup_vs_dense_forward')} | "
                f"{cell('speedup_vs_dense_forward_backward')} | "
                f"{cell('forward_over_read')} | {'' if peak is None else f'{peak / 2**20:.1f}'} |"
            )
        lines.append("")
    for sweep in ("T", "hidden"):
        if any(pt["sweep"] == sweep and "regime" in pt for pt in points):
            lines += [format_sweep_table(points, sweep), ""]
    return "\n".join(lines) + "\n"


def _ms(case: dict[str, Any], mode: str) -> str:
    v = case.get(mode, {}).get("median_ms")
    return "" if v is None else f"{v:.3g}"


def _matrices(case: dict[str, Any]) -> str:
    from .regimes import matrices_of

    return matrices_of(case) if case["impl"] in ("kcprnn", "torch") else ""


def format_regime_table(point: dict[str, Any]) -> str:
    """Markdown table of one regime point: per case the compressed matrices, parameters, counted
    MACs, median forward and forward+backward ms, ``torch.nn``'s time over the case's
    ("x torch"), the time over the case's roofline and the peak extra MiB of forward+backward;
    under a line giving the input read and the GEMM peak of the run."""
    roof = point.get("roofline")
    head = f"**{point['name']}**"
    if roof is not None:
        head += (
            f" (input read {roof['read_ms']:.3g} ms; GEMM peak "
            f"{roof['gemm_peak_gmacs']:.1f} GMAC/s from {roof['gemm_n']}^3 in "
            f"{roof['gemm_ms']:.3g} ms)"
        )
    lines = [
        head,
        "",
        "| case | compressed | params | MACs | fwd ms | fwd+bwd ms | x torch fwd "
        "| x torch fwd+bwd | fwd / roofline | fwd+bwd / roofline | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in point["cases"]:
        if c["impl"] in ("read", "gemm"):
            continue
        if c["status"] != "ok":
            lines.append(f"| {c['label']} | error: {c['error'][:80]} |" + " |" * 9)
            continue
        r = c.get("ratios", {})

        def cell(key: str, r: dict[str, float] = r) -> str:
            return f"{r[key]:.2f}" if key in r else ""

        mem = c.get("memory", {})
        peak = mem.get("forward_backward_bytes", mem.get("forward_bytes"))
        torch_fwd = "1" if c["impl"] == "torch" else cell("speedup_vs_dense_forward")
        torch_fb = "1" if c["impl"] == "torch" else cell("speedup_vs_dense_forward_backward")
        lines.append(
            f"| {c['label']} | {_matrices(c)} | {_fmt_int(c.get('params'))} | "
            f"{_fmt_int(c.get('macs'))} | {_ms(c, 'forward')} | {_ms(c, 'forward_backward')} | "
            f"{torch_fwd} | {torch_fb} | {cell('forward_over_roofline')} | "
            f"{cell('forward_backward_over_roofline')} | "
            f"{'' if peak is None else f'{peak / 2**20:.1f}'} |"
        )
    return "\n".join(lines)


def format_sweep_table(points: list[dict[str, Any]], sweep: str) -> str:
    """Markdown table of a regime sweep: one row per series, per swept value the forward and
    forward+backward ms and, beside them, ``torch.nn``'s time over the series'."""
    pts = sorted((p for p in points if p["sweep"] == sweep), key=lambda p: float(p["x"]))
    head = f"**time against {SWEEP_AXES[sweep]}** (ms fwd / fwd+bwd, x torch fwd / fwd+bwd)"
    xs = [f"{_SWEEP_SHORT[sweep]}={int(p['x'])}" for p in pts]
    lines = [head, "", "| series | " + " | ".join(xs) + " |", "|---|" + "---:|" * len(xs)]
    series: list[str] = []
    for p in pts:
        for c in p["cases"]:
            if c["impl"] not in ("read", "gemm") and c["series"] not in series:
                series.append(c["series"])
    for name in series:
        cells = []
        for p in pts:
            c = next((q for q in p["cases"] if q["series"] == name), None)
            if c is None or c["status"] != "ok":
                cells.append("" if c is None else "error")
                continue
            r = c.get("ratios", {})
            speed, speed_fb = (
                f"{r[k]:.2f}" if k in r else "1"
                for k in ("speedup_vs_dense_forward", "speedup_vs_dense_forward_backward")
            )
            cells.append(
                f"{_ms(c, 'forward')} / {_ms(c, 'forward_backward')} ({speed} / {speed_fb})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
