"""``kcprnn study``: a grid of training runs (formats x parameter budgets x seeds) on one preset,
then a table, a Pareto plot and a paired comparison.

Every run is one :func:`~kcprnn.experiments.train.train` of the preset with the run's format for
both recurrent matrices (``format`` and ``hidden_format``), its budget as the float ``rank`` of
both (:mod:`kcprnn.budget`; the budget ``default`` passes no rank: the recurrent modules'
default, one budget for the pair, :func:`kcprnn.budget.split_budget`; a pair ``IH:HH`` gives
``W_ih`` and ``W_hh`` budgets of their own, ``0.25:0.02``), its seed, one thread, and its own
folder ``OUT/runs/<format>-<budget>-s<seed>``. The preset's own ``format_options`` and
``hidden_options`` are dropped (they belong to the preset's format); its other keys and ``--set
KEY=VALUE`` overrides apply to every run, ``--set format_options.KEY=VALUE`` (``hidden_options.``)
to every compressed run next to its budget's ``rank`` (e.g. ``format_options.init=variance``
with ``kcp``). ``dense`` runs once per seed (budgets do not apply to it) and is the reference
line of the plot.

Runs whose ``summary.json`` exists are skipped, so an interrupted study resumes where it stopped;
the rest run in up to ``--jobs`` processes (spawned, one thread each). Then, from every run
folder under ``OUT/runs``:

- ``study.csv`` / ``study.md``: per (format, budget), the number of runs, mean and standard
  deviation (over seeds, ``n - 1`` in the denominator) of the metric, the recurrent parameters
  (``W_ih`` and ``W_hh``) and their compression against dense;
- ``study.png``: the metric against the recurrent parameters (log scale), one curve per format
  with error bars of one standard deviation, dense as a dashed line (needs matplotlib);
- ``paired.csv`` / ``paired.md``: at every budget, KCP minus the best other format (the highest
  mean there), seed by seed on the seeds both have: mean and standard deviation of the
  differences.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .report import save_figure

__all__ = [
    "PairedRow",
    "RunSpec",
    "StudyRow",
    "aggregate",
    "main",
    "paired",
    "plan_runs",
    "read_runs",
    "run_study",
    "write_outputs",
]

log = logging.getLogger(__name__)

DEFAULT = "default"
"""The budget that passes no rank: every format at the recurrent modules' default (1/32 of the
dense recurrent parameters for the pair, :func:`kcprnn.budget.split_budget`)."""

Budget = float | str | tuple[float, float]
"""A share of each matrix's dense parameters, :data:`DEFAULT`, or ``(W_ih share, W_hh share)``."""


# --- the grid ---


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: ``format`` for both matrices, ``budget`` (a float, or
    :data:`DEFAULT`), ``seed``."""

    format: str
    budget: Budget
    seed: int

    @property
    def budget_tag(self) -> str:
        return budget_tag(self.budget)

    @property
    def run_id(self) -> str:
        return f"{self.format}-{self.budget_tag}-s{self.seed}"


def budget_tag(budget: Budget) -> str:
    """``"default"``, the budget as ``%g`` (``0.01``, ``0.002``, ``1e-05``), or a pair as
    ``ih0.25-hh0.02``."""
    if isinstance(budget, tuple):
        return f"ih{budget[0]:g}-hh{budget[1]:g}"
    return budget if isinstance(budget, str) else f"{budget:g}"


def parse_budget(text: str) -> Budget:
    """``"default"``, a float in ``(0, 1]`` (``0.02``, ``1/50``), or ``IH:HH``, two of them
    (``0.25:0.02``: ``W_ih`` at 1/4, ``W_hh`` at 1/50)."""
    text = text.strip()
    if text == DEFAULT:
        return DEFAULT
    if ":" in text:
        ih, _, hh = text.partition(":")
        return (float(parse_budget(ih)), float(parse_budget(hh)))  # type: ignore[arg-type]
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except ValueError:
        raise ConfigError(f"budget {text!r} is neither 'default' nor a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"a budget is a share of the dense parameters in (0, 1], got {text!r}")
    return value


def plan_runs(
    formats: Sequence[str], budgets: Sequence[Budget], seeds: Sequence[int]
) -> list[RunSpec]:
    """The grid, dense once per seed; seeds outermost, so partial results cover every cell."""
    runs = []
    for seed in seeds:
        for fmt in formats:
            for budget in [DEFAULT] if fmt == "dense" else budgets:
                runs.append(RunSpec(fmt, budget, seed))
    return list(dict.fromkeys(runs))


def study_config(preset: str | Path, sets: Sequence[str]) -> Config:
    """The preset with the ``--set`` overrides (``KEY=VALUE``), its format options only those
    set here (``format_options.KEY=VALUE``, ``hidden_options.``): the preset's own belong to
    its format."""
    base = load_config(preset, [f"--{item}" for item in sets])
    given: dict[str, set[str]] = {"format_options": set(), "hidden_options": set()}
    for item in sets:
        head, _, key = item.partition("=")[0].partition(".")
        if head in given and key:
            given[head].add(key.split(".")[0])
    return dataclasses.replace(
        base,
        format_options={k: base.format_options[k] for k in given["format_options"]},
        hidden_options={k: base.hidden_options[k] for k in given["hidden_options"]},
    )


def run_config(base: Config, spec: RunSpec, out: Path) -> Config:
    """The preset's config with the run's format, budget, seed, folder and one thread."""
    budget = spec.budget
    ih, hh = budget if isinstance(budget, tuple) else (budget, budget)
    dense = spec.format == "dense"
    ih_rank, hh_rank = ({} if b == DEFAULT else {"rank": float(b)} for b in (ih, hh))
    return dataclasses.replace(
        base,
        format=spec.format,
        hidden_format=spec.format,
        # the study's own options (--set) for a compressed format, the budget as its rank
        format_options={**({} if dense else base.format_options), **ih_rank},
        hidden_options={**({} if dense else base.hidden_options), **hh_rank},
        seed=spec.seed,
        name=spec.run_id,
        out_dir=str(out / "runs" / spec.run_id),
        threads=1,
        progress=False,
    )


def _run_one(values: dict[str, Any]) -> dict[str, Any]:
    """Train one run in a worker process (spawned: a fresh interpreter, one thread)."""
    import torch

    from .train import train

    torch.set_num_threads(1)
    return train(Config(**values))


def run_study(
    base: Config,
    specs: Sequence[RunSpec],
    out: Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    runner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, list[str]]:
    """Run every spec without a ``summary.json``; ``jobs > 1`` runs them in spawned processes.
    A run that fails is logged (and its error written to ``error.txt`` in its folder) and left
    to the next call. Returns the run ids by outcome: ``done``, ``skipped``, ``failed``."""
    runner = runner or _run_one
    outcome: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    todo = []
    for spec in specs:
        cfg = run_config(base, spec, out)
        if (cfg.run_dir / "summary.json").is_file():
            outcome["skipped"].append(spec.run_id)
        else:
            todo.append((spec, cfg))
    log.info("study: %d runs to do, %d done before", len(todo), len(outcome["skipped"]))
    bar = _progress(len(todo), progress)

    def finish(spec: RunSpec, cfg: Config, error: BaseException | None) -> None:
        if error is None:
            outcome["done"].append(spec.run_id)
        else:
            outcome["failed"].append(spec.run_id)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "error.txt").write_text(f"{type(error).__name__}: {error}\n")
            log.error("study: run %s failed: %s: %s", spec.run_id, type(error).__name__, error)
        if bar is not None:
            bar.update(1)

    if jobs <= 1 or len(todo) <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for spec, cfg in todo:
                try:
                    runner(cfg.to_dict())
                    finish(spec, cfg, None)
                except Exception as exc:  # a failed run must not stop the grid
                    finish(spec, cfg, exc)
        finally:
            torch.set_num_threads(threads)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(runner, cfg.to_dict()): (spec, cfg) for spec, cfg in todo}
            for future in as_completed(futures):
                spec, cfg = futures[future]
                finish(spec, cfg, future.exception())
    if bar is not None:
        bar.close()
    return outcome


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="study", unit="run")


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


def read_runs(out: Path, metric: str = "test_acc") -> list[RunResult]:
    """Every finished run under ``out/runs`` (its ``config.json`` and ``summary.json``)."""
    results = []
    for summary_path in sorted((out / "runs").glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        config = json.loads((summary_path.parent / "config.json").read_text())
        if metric not in summary:
            raise ConfigError(f"{summary_path} has no metric {metric!r}; it has {sorted(summary)}")
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


def paired(results: Sequence[RunResult], reference: str = "kcp") -> list[PairedRow]:
    """At every budget where ``reference`` and another compressed format ran: the other format
    with the highest mean metric there, and ``reference - other`` seed by seed."""
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
        best = max(sorted(others), key=lambda f: statistics.fmean(others[f].values()))
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
    out: Path, rows: Sequence[StudyRow], pairs: Sequence[PairedRow], metric: str
) -> list[Path]:
    """``study.csv``, ``study.md``, ``paired.csv``, ``paired.md`` and (with matplotlib)
    ``study.png`` in ``out``; returns the paths written. Metric values are in percent."""
    written = []
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
        "best other",
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


# --- command line ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn study",
        description="Train a grid of formats x parameter budgets x seeds on one preset "
        "(resumable: finished runs are skipped), then write a table (mean and std over seeds), "
        "a Pareto plot and KCP's paired comparison with the best other format.",
    )
    parser.add_argument("--preset", required=True, help="a TOML preset (its data and protocol)")
    parser.add_argument("--formats", default="dense,kcp,tt,ht", help="comma-separated formats")
    parser.add_argument(
        "--budgets",
        default=DEFAULT,
        help="comma-separated shares of the dense parameters in (0, 1] (0.02 or 1/50), or "
        "'default' (the modules' default: 1/32 of the pair)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs (1 thread each)")
    parser.add_argument("--out", required=True, help="study folder (runs in OUT/runs)")
    parser.add_argument("--metric", default="test_acc", help="summary key to compare")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset key for every run (repeatable), e.g. --set epochs=5; "
        "--set format_options.init=variance gives every compressed run's W_ih that option",
    )
    parser.add_argument(
        "--aggregate-only", action="store_true", help="skip training, aggregate what exists"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .. import FORMATS

        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"unknown formats {unknown}; choose from {sorted(FORMATS)}")
        budgets = [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not formats or not budgets or not seeds:
            raise ConfigError("--formats, --budgets and --seeds each need at least one entry")
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        base = study_config(args.preset, args.set)
        out = Path(args.out)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        specs = plan_runs(formats, budgets, seeds)
        if not args.aggregate_only:
            jobs = min(args.jobs, os.cpu_count() or 1)
            outcome = run_study(base, specs, out, jobs=jobs, progress=not args.no_progress)
            print(
                f"runs: {len(outcome['done'])} done, {len(outcome['skipped'])} skipped "
                f"(finished before), {len(outcome['failed'])} failed"
                + (f": {outcome['failed']}" if outcome["failed"] else "")
            )
        results = read_runs(out, args.metric)
        rows, pairs = aggregate(results), paired(results)
        written = write_outputs(out, rows, pairs, args.metric)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"kcprnn study: error: {exc}", file=sys.stderr)
        return 2
    print((out / "study.md").read_text())
    if pairs:
        print((out / "paired.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
