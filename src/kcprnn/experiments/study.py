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
- ``runs.csv``: every finished run's format, budget, seed, metric, parameters and s/epoch;
- ``study.png``: the metric against the recurrent parameters (log scale), one curve per format
  with error bars of one standard deviation, dense as a dashed line (needs matplotlib);
- ``paired.csv`` / ``paired.md``: at every budget, KCP minus the best other format (the best
  mean there: the highest, or the lowest for an error rate or a loss, ``--goal``), seed by seed
  on the seeds both have: mean and standard deviation of the differences.

The aggregation and the outputs are in :mod:`kcprnn.experiments.study_tables`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .study_tables import (
    DEFAULT,
    Budget,
    PairedRow,
    StudyRow,
    aggregate,
    budget_tag,
    metric_goal,
    paired,
    read_runs,
    write_outputs,
)

__all__ = [
    "DEFAULT",
    "PairedRow",
    "RunSpec",
    "StudyRow",
    "aggregate",
    "exit_with_parent",
    "main",
    "metric_goal",
    "paired",
    "plan_runs",
    "read_runs",
    "run_study",
    "write_outputs",
]

log = logging.getLogger(__name__)

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
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = {pool.submit(runner, cfg.to_dict()): (spec, cfg) for spec, cfg in todo}
            for future in as_completed(futures):
                spec, cfg = futures[future]
                finish(spec, cfg, future.exception())
    if bar is not None:
        bar.close()
    return outcome


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A pool worker's initializer: a daemon thread ends the worker within ``every`` seconds of
    its parent ``parent`` going away (killed, not only interrupted), so that no run keeps
    training unseen after its study stopped (a resumed study redoes it from its last
    checkpoint)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="kcprnn-exit-with-parent", daemon=True).start()


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total == 0 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="study", unit="run")


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
        "--goal",
        choices=("max", "min"),
        default=None,
        help="whether the metric is better high or low (default: 'min' for names ending in "
        "_per, _wer, _cer, _loss or _error, else 'max')",
    )
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
        goal = args.goal or metric_goal(args.metric)
        rows, pairs = aggregate(results), paired(results, goal=goal)
        written = write_outputs(out, rows, pairs, args.metric, goal, results)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"kcprnn study: error: {exc}", file=sys.stderr)
        return 2
    print((out / "study.md").read_text())
    if pairs:
        print((out / "paired.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
