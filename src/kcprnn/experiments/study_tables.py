"""Reading a ``kcprnn study`` folder's finished runs and writing its tables and plot
(:mod:`kcprnn.experiments.study` runs the grid).

A metric is higher-is-better (an accuracy) or lower-is-better (an error rate or a loss:
:func:`metric_goal`); the paired comparison's "best other format" is the one with the best mean by
that goal, and its differences are always ``KCP - other``, so for an error rate a negative
difference is KCP ahead.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .report import save_figure

__all__ = [
    "DEFAULT",
    "Budget",
    "PairedRow",
    "RunResult",
    "StudyRow",
    "aggregate",
    "budget_tag",
    "metric_goal",
    "paired",
    "read_runs",
    "write_outputs",
]

log = logging.getLogger(__name__)

DEFAULT = "default"
"""The budget that passes no rank: every format at the recurrent modules' default (1/32 of the
dense recurrent parameters for the pair, :func:`kcprnn.budget.split_budget`)."""

Budget = float | str | tuple[float, float]
"""A share of each matrix's dense parameters, :data:`DEFAULT`, or ``(W_ih share, W_hh share)``."""


def budget_tag(budget: Budget) -> str:
    """``"default"``, the budget as ``%g`` (``0.01``, ``0.002``, ``1e-05``), or a pair as
    ``ih0.25-hh0.02``."""
    if isinstance(budget, tuple):
        return f"ih{budget[0]:g}-hh{budget[1]:g}"
    return budget if isinstance(budget, str) else f"{budget:g}"


LOWER_IS_BETTER = ("_per", "_wer", "_cer", "_loss", "_error")
"""Name endings of the metrics that are better lower (``test_per``, ``dev_wer``, ``test_loss``)."""


def metric_goal(metric: str) -> str:
    """``"min"`` for an error rate or a loss (:data:`LOWER_IS_BETTER`), else ``"max"``."""
    return "min" if metric.endswith(LOWER_IS_BETTER) else "max"


# --- aggregation ---


@dataclass(frozen=True)
class RunResult:
    """What the aggregation reads from one run folder."""

    format: str
    budget: Budget
    seed: int
    metric: float
    recurrent_params: int
    recurrent_compression: float
    seconds_per_epoch: float


def _last_epoch(run: Path) -> dict[str, Any]:
    """The last record of ``run/metrics.jsonl`` (empty if there is none)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines and lines[-1].strip() else {}


def read_runs(out: Path, metric: str = "test_acc") -> list[RunResult]:
    """Every finished run under ``out/runs`` (its ``config.json`` and ``summary.json``); a
    metric the summary lacks is read from the last epoch of the run's ``metrics.jsonl`` (the
    speech runs' character error rates ``dev_cer``/``test_cer``)."""
    results = []
    for summary_path in sorted((out / "runs").glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        config = json.loads((summary_path.parent / "config.json").read_text())
        if metric not in summary:
            last = _last_epoch(summary_path.parent)
            if metric not in last:
                raise ConfigError(
                    f"{summary_path} has no metric {metric!r}, nor the last epoch of its "
                    f"metrics.jsonl; the summary has {sorted(summary)}, the last epoch "
                    f"{sorted(last)}"
                )
            summary = {**summary, metric: last[metric]}
        ih = config.get("format_options", {}).get("rank")
        hh = config.get("hidden_options", {}).get("rank")
        budget: Budget = DEFAULT
        if isinstance(ih, float) and isinstance(hh, float):
            budget = ih if ih == hh else (ih, hh)
        elif ih is not None or hh is not None:
            budget = f"rank {ih}/{hh}"  # ranks given directly: a cell of its own
        results.append(
            RunResult(
                config["format"],
                budget,
                int(config["seed"]),
                float(summary[metric]),
                int(summary["recurrent_params"]),
                float(summary["recurrent_compression"]),
                float(summary.get("seconds_per_epoch", math.nan)),
            )
        )
    return results


@dataclass(frozen=True)
class StudyRow:
    """Mean and spread of one (format, budget) cell over its seeds."""

    format: str
    budget: Budget
    runs: int
    mean: float
    std: float
    recurrent_params: float
    recurrent_compression: float
    seconds_per_epoch: float


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _budget_key(budget: Budget) -> tuple[float, float]:
    """Largest budgets first (a pair by its ``W_hh`` share), named cells last."""
    if isinstance(budget, tuple):
        return (-budget[1], -budget[0])
    return (math.inf, 0.0) if isinstance(budget, str) else (-budget, -budget)


def aggregate(results: Sequence[RunResult]) -> list[StudyRow]:
    """One row per (format, budget): sorted by format, then budget from the largest
    (``default`` last)."""
    cells: dict[tuple[str, Budget], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.format, r.budget), []).append(r)
    rows = []
    for (fmt, budget), rs in sorted(
        cells.items(), key=lambda kv: (kv[0][0], _budget_key(kv[0][1]))
    ):
        rows.append(
            StudyRow(
                fmt,
                budget,
                len(rs),
                statistics.fmean(r.metric for r in rs),
                _std([r.metric for r in rs]),
                statistics.fmean(r.recurrent_params for r in rs),
                statistics.fmean(r.recurrent_compression for r in rs),
                statistics.fmean(r.seconds_per_epoch for r in rs),
            )
        )
    return rows


@dataclass(frozen=True)
class PairedRow:
    """KCP minus the best other format at one budget, over the seeds both ran."""

    budget: Budget
    other: str
    pairs: int
    mean_diff: float
    std_diff: float
    kcp_mean: float
    other_mean: float


def paired(
    results: Sequence[RunResult], reference: str = "kcp", goal: str = "max"
) -> list[PairedRow]:
    """At every budget where ``reference`` and another compressed format ran: the other format
    with the best mean metric there (the highest for ``goal="max"``, the lowest for ``"min"``),
    and ``reference - other`` seed by seed."""
    if goal not in ("max", "min"):
        raise ValueError(f"goal must be 'max' or 'min', got {goal!r}")
    sign = 1.0 if goal == "max" else -1.0
    by_cell: dict[tuple[str, Budget], dict[int, float]] = {}
    for r in results:
        by_cell.setdefault((r.format, r.budget), {})[r.seed] = r.metric
    out = []
    budgets = sorted({b for f, b in by_cell if f == reference}, key=_budget_key)
    for budget in budgets:
        ref = by_cell[(reference, budget)]
        others = {
            f: seeds
            for (f, b), seeds in by_cell.items()
            if b == budget and f not in (reference, "dense")
        }
        if not others:
            continue
        best = max(sorted(others), key=lambda f: sign * statistics.fmean(others[f].values()))
        seeds = sorted(set(ref) & set(others[best]))
        diffs = [ref[s] - others[best][s] for s in seeds]
        out.append(
            PairedRow(
                budget,
                best,
                len(diffs),
                statistics.fmean(diffs) if diffs else math.nan,
                _std(diffs),
                statistics.fmean(ref.values()),
                statistics.fmean(others[best].values()),
            )
        )
    return out


# --- outputs ---


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes it private; a table is an ordinary file
    os.replace(tmp, path)


def _fmt(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "" if math.isnan(value) else f"{value * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def write_outputs(
    out: Path,
    rows: Sequence[StudyRow],
    pairs: Sequence[PairedRow],
    metric: str,
    goal: str = "max",
    results: Sequence[RunResult] = (),
) -> list[Path]:
    """``study.csv``, ``study.md``, ``paired.csv``, ``paired.md``, ``runs.csv`` (every run of
    ``results``, by format, budget and seed) and (with matplotlib) ``study.png`` in ``out``;
    returns the paths written. Metric values are in percent."""
    written = []
    header = ["format", "budget", "seed", f"{metric} (%)", "recurrent params", "s/epoch"]
    body = [
        [
            r.format,
            budget_tag(r.budget),
            str(r.seed),
            _fmt(r.metric, 100),
            str(r.recurrent_params),
            _fmt(r.seconds_per_epoch, 1, 1),
        ]
        for r in sorted(results, key=lambda r: (r.format, _budget_key(r.budget), r.seed))
    ]
    _write_atomic(out / "runs.csv", _table(header, body)[0])
    written.append(out / "runs.csv")
    header = [
        "format",
        "budget",
        "runs",
        f"{metric} mean (%)",
        f"{metric} std (%)",
        "recurrent params",
        "compression (x)",
        "s/epoch",
    ]
    body = [
        [
            r.format,
            budget_tag(r.budget),
            str(r.runs),
            _fmt(r.mean, 100),
            _fmt(r.std, 100),
            f"{r.recurrent_params:.0f}",
            f"{r.recurrent_compression:.1f}",
            _fmt(r.seconds_per_epoch, 1, 1),
        ]
        for r in rows
    ]
    for name, text in zip(("study.csv", "study.md"), _table(header, body), strict=True):
        _write_atomic(out / name, text)
        written.append(out / name)
    header = [
        "budget",
        f"best other ({'lowest' if goal == 'min' else 'highest'} mean)",
        "pairs",
        "KCP - other mean (pt)",
        "std (pt)",
        "KCP (%)",
        "other (%)",
    ]
    body = [
        [
            budget_tag(p.budget),
            p.other,
            str(p.pairs),
            _fmt(p.mean_diff, 100),
            _fmt(p.std_diff, 100),
            _fmt(p.kcp_mean, 100),
            _fmt(p.other_mean, 100),
        ]
        for p in pairs
    ]
    for name, text in zip(("paired.csv", "paired.md"), _table(header, body), strict=True):
        _write_atomic(out / name, text)
        written.append(out / name)
    png = plot_pareto(out / "study.png", rows, metric)
    if png is not None:
        written.append(png)
    return written


def plot_pareto(path: Path, rows: Sequence[StudyRow], metric: str) -> Path | None:
    """The metric (percent) against recurrent parameters (log scale), one curve per format with
    one-std error bars, dense as a dashed line; ``None`` when matplotlib is missing or there is
    nothing to plot."""
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("study: matplotlib is not installed; no plot written")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    formats = sorted({r.format for r in rows})
    for fmt in formats:
        cell = sorted((r for r in rows if r.format == fmt), key=lambda r: r.recurrent_params)
        xs = [r.recurrent_params for r in cell]
        ys = [100 * r.mean for r in cell]
        es = [0.0 if math.isnan(r.std) else 100 * r.std for r in cell]
        if fmt == "dense":
            ax.axhline(ys[0], color="black", linestyle="--", linewidth=1, label="dense")
            ax.errorbar(xs, ys, yerr=es, fmt="s", color="black", capsize=3)
            continue
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=fmt)
    ax.set_xscale("log")
    ax.set_xlabel("recurrent parameters (W_ih + W_hh)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path, _FILE_MODE)
    return path
