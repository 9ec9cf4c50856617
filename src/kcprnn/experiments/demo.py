"""``kcprnn demo``: the main job. Trains a dense LSTM and compressed LSTMs (KCP in three forms,
TT, TR, BT, HT) on the UCF11-like stand-in under one protocol, over one or more seeds; prints a
table of mean and spread over the seeds and writes ``results.json``, ``results.md`` (the table,
every run, and a reading of the numbers) and ``accuracy_vs_compression.png`` into the demo's run
folder, one subfolder per run (``<model>-s<seed>``, which ``kcprnn report`` also reads).

The models (:data:`DEMO_MODELS`) compare the formats at one input-to-hidden budget: every
compressed model stores 3,240 to 3,392 ``W_ih`` parameters (17,000x to 19,000x compression; TT
rank 4, 3,360 parameters, and BT 2 blocks of rank 4, 3,392, are the published UCF11 models), with
KCP in its interleaved layout (the paper's form), its blocked layout and with ``P = 2`` terms;
and KCP's extreme point, rank 1 (78 parameters, 756,185x). The options are explicit, so the
models do not move with any format's default ranks.

The protocol is the paper's UCF11 setting (160x120 RGB frames, 6 frames, input 57,600 =
8x20x20x18, hidden 256 = 4x4x4x4, batch 16, Adam, 20 % held out) shortened to fit a 2-core CPU:
880 clips, 8 epochs, Adam lr 1e-3 for every parameter of every model (the paper's 1e-4 needs far
more steps) except the dense LSTM's ``W_ih``, which trains at ``--dense-ih-lr`` (default 2e-6;
its own parameter group, ``Config.ih_lr``). Adam moves every weight by about ``lr`` per step
whatever its fan-in, and a dense ``W_ih`` row reads 57,600 inputs with a large common offset
(the dim backgrounds, about -0.7 in [-1, 1]), so one step moves a pre-activation by up to
``lr * sum|x|``, about ``4e4 * lr``: at 1e-3 that is tens. The rate was chosen between 1e-5 and
2e-6 on a stand-in drawn with a seed the demo does not report (100), never on a reported test
set. The dense LSTM runs on the first seed only (``--dense-seeds``): one of its epochs costs 10
to 60 times a compressed model's, 2.5 times the eight compressed models' together. A seed
draws the stand-in, the split, the initialization and the batch order.

A run whose folder already holds a ``summary.json`` written under the same config (up to the
thread count, the progress bar, the cache folder and the spelling of its path) is reused, so an
interrupted demo resumes where it stopped. ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, config_defaults
from .loop import write_atomic
from .report import save_figure
from .train import train

__all__ = [
    "DEFAULT_DENSE_SEEDS",
    "DEFAULT_DENSE_IH_LR",
    "DEFAULT_EPOCHS",
    "DEFAULT_SEEDS",
    "DEMO_MODELS",
    "DemoModel",
    "demo_configs",
    "finished_run",
    "main",
    "reading",
    "summarize",
    "write_demo_report",
]

UCF11_IN_MODES = [8, 20, 20, 18]
KCP_INTERLEAVED = {
    "in_modes": [[2, 4], [4, 5], [4, 5], [3, 6]],
    "out_modes": [[4, 4], [2, 2], [2, 2], [2, 2]],
}
"""Every mode split into two balanced Kronecker factors (the paper's layout); 78 parameters per
unit of ``P * R``."""
KCP_BLOCKED = {
    "in_modes": [[8, 1], [20, 1], [1, 20], [1, 18]],
    "out_modes": [[8, 2], [4, 1], [4, 1], [4, 1]],
}
"""Each Kronecker factor owns whole modes (the fast layout); 193 parameters per unit of
``P * R``."""


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo: its input-to-hidden ``format`` and ``options``, a short
    description, and its ``group``: ``"dense"``, ``"matched"`` (the shared budget) or
    ``"extreme"``."""

    format: str
    options: dict[str, Any]
    description: str
    group: str


DEMO_MODELS: dict[str, DemoModel] = {
    "dense": DemoModel("dense", {}, "the full matrix", "dense"),
    "kcp": DemoModel("kcp", {**KCP_INTERLEAVED, "rank": 43}, "interleaved, P=1, R=43", "matched"),
    "kcp-blocked": DemoModel("kcp", {**KCP_BLOCKED, "rank": 17}, "blocked, P=1, R=17", "matched"),
    "kcp-p2": DemoModel(
        "kcp", {**KCP_INTERLEAVED, "rank": 21, "terms": 2}, "interleaved, P=2, R=21", "matched"
    ),
    "tt": DemoModel("tt", {"in_modes": UCF11_IN_MODES, "rank": 4}, "ranks 1,4,4,4,1", "matched"),
    "tr": DemoModel("tr", {"in_modes": UCF11_IN_MODES, "rank": 3}, "ring rank 3", "matched"),
    "bt": DemoModel(
        "bt", {"in_modes": UCF11_IN_MODES, "rank": 4, "blocks": 2}, "2 blocks, rank 4", "matched"
    ),
    "ht": DemoModel("ht", {"in_modes": UCF11_IN_MODES, "rank": 7}, "rank 7", "matched"),
    "kcp-r1": DemoModel("kcp", {**KCP_INTERLEAVED, "rank": 1}, "interleaved, P=1, R=1", "extreme"),
}
"""The demo's models by name. The gates fold into the first output mode (``W_ih`` is 1,024 x
57,600, output modes 16x4x4x4); the ``matched`` ones store 3,240-3,392 ``W_ih`` parameters."""

DEFAULT_SEEDS = (0, 1)
"""Seeds a plain ``kcprnn demo`` runs (``--seeds 0,1,2`` for three)."""
DEFAULT_EPOCHS = 8
DEFAULT_DENSE_IH_LR = 2e-6
"""Adam lr of the dense LSTM's ``W_ih`` (its other parameters train at the shared lr)."""
DEFAULT_DENSE_SEEDS = 1
"""The dense LSTM runs on the first this many of the seeds: one of its epochs costs 10 to 60
times a compressed model's."""


def demo_configs(
    out_dir: Path,
    models: list[str],
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    dense_ih_lr: float = DEFAULT_DENSE_IH_LR,
    dense_seeds: int | None = DEFAULT_DENSE_SEEDS,
    **overrides: Any,
) -> list[Config]:
    """One :class:`Config` per model and seed (seeds outermost; ``dense`` only for the first
    ``dense_seeds`` seeds, ``None``: all), identical except for the format, its options, the
    seed and, for ``dense``, the Adam lr of its input-to-hidden matrix (``ih_lr=dense_ih_lr``;
    every other parameter trains at the shared ``lr``)."""
    base = Config(
        dataset="ucf11-like",
        clips_per_class=80,
        num_frames=6,
        epochs=DEFAULT_EPOCHS,
        lr=1e-3,
        batch_size=16,
        seed=0,
        hidden_size=256,
        hidden_modes=(4, 4, 4, 4),
        hidden_format="dense",
    )
    base = dataclasses.replace(base, **overrides)
    return [
        dataclasses.replace(
            base,
            format=DEMO_MODELS[m].format,
            format_options=dict(DEMO_MODELS[m].options),
            name=f"{m}-s{seed}",
            out_dir=str(out_dir / f"{m}-s{seed}"),
            seed=seed,
            ih_lr=dense_ih_lr if m == "dense" else 0.0,
        )
        for i, seed in enumerate(seeds)
        for m in models
        if m != "dense" or dense_seeds is None or i < dense_seeds
    ]


REUSE_IGNORES = ("threads", "progress", "cache_dir", "out_dir")
"""Config keys that may differ between a finished run and the demo's config for it to be
reused: they do not change what is trained (``out_dir``: the same folder, spelt relative or
absolute)."""


def finished_run(cfg: Config) -> dict[str, Any] | None:
    """The summary of the finished run in ``cfg.run_dir`` if its ``config.json`` matches ``cfg``
    up to :data:`REUSE_IGNORES`, else ``None``."""
    paths = cfg.run_dir / "summary.json", cfg.run_dir / "config.json"
    if not all(p.is_file() for p in paths):
        return None
    try:
        summary, saved = (json.loads(p.read_text()) for p in paths)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(summary, dict) or not isinstance(saved, dict):
        return None
    now = cfg.to_dict()
    saved = {**config_defaults(), **saved}  # keys newer than the run: their defaults
    keys = (set(saved) | set(now)) - set(REUSE_IGNORES)
    if any(saved.get(k) != now.get(k) for k in keys):
        return None
    return summary


# --- results ---


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model (in the order of ``runs``) from the per-run rows (each a training
    summary with ``model`` and ``seed`` added): parameters, compression, median seconds per
    epoch, the test accuracy's mean and standard deviation over the seeds (``n - 1``) and the
    mean training accuracy (of the last epoch)."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    rows = []
    for name, rs in by_model.items():
        mean, std = _mean_std([r["test_acc"] for r in rs])
        spec = DEMO_MODELS.get(name)
        rows.append(
            {
                "model": name,
                "format": rs[0]["format"],
                "description": spec.description if spec else "",
                "group": spec.group if spec else "",
                "ih_params": rs[0]["ih_params"],
                "compression": rs[0]["compression"],
                "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in rs),
                "test_acc_mean": mean,
                "test_acc_std": std,
                "train_acc_mean": statistics.fmean(r["train_acc"] for r in rs),
                "seeds": [r["seed"] for r in rs],
                "test_acc": [r["test_acc"] for r in rs],
            }
        )
    return rows


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarize`'s rows."""
    lines = [
        "| model | format, options | W_ih params | compression | train s/epoch "
        "| train accuracy (%) | test accuracy (%) | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['format']}, {r['description']} | {r['ih_params']:,} | "
            f"{r['compression']:,.0f}x | {r['seconds_per_epoch']:.1f} | "
            f"{100 * r['train_acc_mean']:.1f} | "
            f"{_pct(r['test_acc_mean'], r['test_acc_std'])} | {len(r['seeds'])} |"
        )
    return "\n".join(lines)


def _runs_table(runs: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    models = list(dict.fromkeys(r["model"] for r in runs))
    acc = {(r["model"], r["seed"]): r["test_acc"] for r in runs}
    lines = [
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for m in models:
        cells = [f"{100 * acc[m, s]:.1f}" if (m, s) in acc else "-" for s in seeds]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(rows: list[dict[str, Any]], chance: float) -> str:
    """A paragraph that reads :func:`summarize`'s rows: the best model at the matched budget and
    who is within one standard deviation of it, the KCP forms, the extreme point, the dense
    baseline, and how far the seeds resolve the differences."""
    by = {r["model"]: r for r in rows}
    seeds = max(len(r["seeds"]) for r in rows)
    parts = []
    matched = [r for r in rows if r["group"] == "matched"]
    if matched:
        best = max(matched, key=lambda r: r["test_acc_mean"])
        lo = min(r["ih_params"] for r in matched)
        hi = max(r["ih_params"] for r in matched)
        spread = best["test_acc_std"] if not math.isnan(best["test_acc_std"]) else 0.0
        close = [
            r["model"]
            for r in matched
            if r is not best
            and best["test_acc_mean"] - r["test_acc_mean"]
            <= max(spread, 0.0 if math.isnan(r["test_acc_std"]) else r["test_acc_std"])
        ]
        parts.append(
            f"At the matched budget ({lo:,} to {hi:,} input-to-hidden parameters) {best['model']} "
            f"scores highest, {_pct(best['test_acc_mean'], best['test_acc_std'])} %"
            + (
                f"; {', '.join(close)} {'is' if len(close) == 1 else 'are'} within one standard "
                "deviation of it"
                if close and seeds > 1
                else ""
            )
            + "."
        )
        kcps = [r for r in matched if r["format"] == "kcp"]
        if kcps:
            forms = ", ".join(
                f"{r['model']} ({r['description']}) {_pct(r['test_acc_mean'], r['test_acc_std'])} %"
                for r in kcps
            )
            parts.append(f"KCP at that budget: {forms}.")
        for r in rows:
            if r["group"] == "extreme":
                gap = 100 * (best["test_acc_mean"] - r["test_acc_mean"])
                parts.append(
                    f"KCP's extreme point ({r['description']}: {r['ih_params']:,} parameters, "
                    f"{r['compression']:,.0f}x) scores "
                    f"{_pct(r['test_acc_mean'], r['test_acc_std'])} %, {gap:.1f} points "
                    f"{'below' if gap >= 0 else 'above'} {best['model']} with "
                    f"{best['ih_params'] / r['ih_params']:.0f}x fewer parameters."
                )
    if "dense" in by:
        d = by["dense"]
        compressed = [r for r in rows if r["group"] != "dense"]
        above = sum(r["test_acc_mean"] < d["test_acc_mean"] for r in compressed)
        fits = (
            f"it fits the training clips ({100 * d['train_acc_mean']:.0f} % training "
            "accuracy) but generalizes less well"
            if d["train_acc_mean"] >= 0.6
            else f"it is still far from fitting the training clips ({100 * d['train_acc_mean']:.0f}"
            " % training accuracy in the last epoch)"
        )
        few = len(d["seeds"]) < seeds
        parts.append(
            f"The dense LSTM ({d['ih_params']:,} input-to-hidden parameters"
            + (f"; seed {', '.join(map(str, d['seeds']))} only" if few else "")
            + f") scores {_pct(d['test_acc_mean'], d['test_acc_std'])} %, "
            + (
                f"below all {len(compressed)} compressed models"
                if above == 0
                else f"above {above} of the {len(compressed)} compressed models"
            )
            + f"; {fits}."
        )
    parts.append(
        f"Chance is {100 * chance:.1f} %. "
        + (
            f"Over {seeds} seeds (each draws its own stand-in), differences smaller than the "
            "standard deviations are not resolved."
            if seeds > 1
            else "One seed gives no spread: differences of a few points are not resolved."
        )
        + " These are stand-in numbers under one short protocol, not UCF11 accuracies."
    )
    return " ".join(parts)


def plot(rows: list[dict[str, Any]], path: Path, chance: float) -> None:
    """Mean test accuracy (error bars: one standard deviation over the seeds) against the
    compression ratio of ``W_ih`` (log scale), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = r["compression"], 100 * r["test_acc_mean"]
        err = 0.0 if math.isnan(r["test_acc_std"]) else 100 * r["test_acc_std"]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, ms=5)
        ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(100 * chance, color="grey", ls="--", lw=1, label="chance")
    ax.legend(loc="lower left")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio of the input-to-hidden matrix")
    seeds = max(len(r["seeds"]) for r in rows)
    ax.set_ylabel(f"test accuracy (%), mean of {seeds} seed{'s' if seeds > 1 else ''}")
    ax.set_title("UCF11-like stand-in")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def write_demo_report(
    runs: list[dict[str, Any]], out_dir: Path, protocol: dict[str, Any]
) -> tuple[str, str]:
    """Write ``results.json`` (the protocol, the per-model rows and every run),
    ``results.md`` and ``accuracy_vs_compression.png``; return the table and the reading."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    chance = 1 / runs[0]["num_classes"]
    table, text = format_table(rows), reading(rows, chance)
    seeds = sorted({r["seed"] for r in runs})
    md = "\n\n".join(
        [
            "# kcprnn demo: LSTMs on the UCF11-like stand-in",
            _protocol_line(protocol, seeds),
            table,
            text,
            "Test accuracy (%) of every run:",
            _runs_table(runs),
        ]
    )
    write_atomic(out_dir / "results.md", (md + "\n").encode())
    record = {"protocol": {**protocol, "seeds": seeds}, "models": rows, "runs": runs}
    write_atomic(out_dir / "results.json", (json.dumps(record, indent=2) + "\n").encode())
    plot(rows, out_dir / "accuracy_vs_compression.png", chance)
    return table, text


def _protocol_line(p: dict[str, Any], seeds: list[int]) -> str:
    return (
        f"{p['clips_per_class']} clips x 11 classes (20 % held out for test), {p['num_frames']} "
        f"frames of 160x120x3, hidden 256, {_schedule(p)}; test accuracy after the last "
        f"epoch, mean ± standard deviation over seeds {', '.join(map(str, seeds))}."
    )


def _schedule(p: dict[str, Any]) -> str:
    return (
        f"{p['epochs']} epochs, batch {p['batch_size']}, Adam lr "
        f"{p['lr']:g} (the dense W_ih {p['dense_ih_lr']:g})"
    )


# --- command line ---


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated ints, got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}") from None
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn demo",
        description="Train a dense LSTM and KCP-, TT-, TR-, BT- and HT-LSTMs at one "
        "input-to-hidden parameter budget, plus KCP's extreme-compression point, on the "
        "UCF11-like stand-in under one protocol and several seeds; print and save the table "
        "(mean ± std over seeds), a reading of it and the plot.",
    )
    parser.add_argument("--out", help="run folder (default: runs/demo-<UTC time>)")
    parser.add_argument(
        "--models",
        "--formats",
        default=",".join(DEMO_MODELS),
        help="comma-separated models (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=list(DEFAULT_SEEDS),
        help="comma-separated seeds; each draws its own stand-in (default: "
        f"{','.join(map(str, DEFAULT_SEEDS))}; 0,1,2 for three)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="compressed models (default: %(default)s)",
    )
    parser.add_argument(
        "--dense-seeds",
        type=int,
        default=DEFAULT_DENSE_SEEDS,
        help="the dense LSTM runs on the first N seeds; 0: all (default: %(default)s)",
    )
    parser.add_argument(
        "--clips-per-class",
        type=int,
        default=80,
        help="stand-in clips per class, 20%% held out (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam, every model (default: %(default)s)"
    )
    parser.add_argument(
        "--dense-ih-lr",
        type=float,
        default=DEFAULT_DENSE_IH_LR,
        help="Adam lr of the dense LSTM's input-to-hidden matrix; its other parameters train at "
        "--lr (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--cache-dir", default="", help="stand-in cache (default ~/.cache/kcprnn)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    console = logging.StreamHandler()  # warnings on the console; each run.log has the details
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in DEMO_MODELS]
    if unknown or not models:
        print(
            f"kcprnn demo: error: --models must name some of {list(DEMO_MODELS)}, got "
            f"{args.models!r}",
            file=sys.stderr,
        )
        return 2
    if args.dense_seeds < 0:
        print(
            f"kcprnn demo: error: --dense-seeds must be >= 0, got {args.dense_seeds}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    try:
        configs = demo_configs(
            out,
            models,
            seeds=args.seeds,
            epochs=args.epochs,
            clips_per_class=args.clips_per_class,
            lr=args.lr,
            dense_ih_lr=args.dense_ih_lr,
            dense_seeds=args.dense_seeds or None,
            device=args.device,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except ConfigError as exc:
        print(f"kcprnn demo: error: {exc}", file=sys.stderr)
        return 2
    c = configs[0]
    dense_seeds = [
        cfg.seed for cfg in configs if cfg.format == "dense" and cfg.name.startswith("dense-")
    ]
    protocol = {
        "dataset": c.dataset,
        "clips_per_class": c.clips_per_class,
        "num_frames": c.num_frames,
        "epochs": c.epochs,
        "batch_size": c.batch_size,
        "lr": args.lr,
        "dense_ih_lr": args.dense_ih_lr,
        "dense_seeds": dense_seeds,
    }
    print(
        f"kcprnn demo: {len(models)} LSTMs x {len(args.seeds)} seeds on the UCF11-like stand-in "
        f"({c.clips_per_class} clips x 11 classes, {c.num_frames} frames of "
        f"{c.frame_width}x{c.frame_height}x3), {_schedule(protocol)}; run folder {out}",
        flush=True,
    )
    if "dense" in models and len(dense_seeds) < len(args.seeds):
        print(
            f"  the dense LSTM runs on seed{'s' if len(dense_seeds) > 1 else ''} "
            f"{', '.join(map(str, dense_seeds))} only (one of its epochs costs 10-60x a "
            "compressed model's); --dense-seeds 0 runs it on every seed.",
            flush=True,
        )
    if len(args.seeds) < 3:
        print(
            f"  {len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}: the spread is a "
            "rough one; --seeds 0,1,2 for more.",
            flush=True,
        )
    runs = []
    start = time.perf_counter()
    for cfg in configs:
        t0 = time.perf_counter()
        summary = finished_run(cfg)
        reused = summary is not None
        if summary is None:
            summary = train(cfg)
        model = cfg.name.rsplit("-s", 1)[0]
        runs.append({**summary, "model": model, "seed": cfg.seed, "run_dir": str(cfg.run_dir)})
        print(
            f"  {model:>11} seed {cfg.seed}: test accuracy {summary['test_acc']:.1%}, "
            f"{summary['ih_params']:,} input-to-hidden params, "
            + ("finished before, reused" if reused else f"{time.perf_counter() - t0:.0f} s"),
            flush=True,
        )
    table, text = write_demo_report(runs, out, protocol)
    print(
        f"\n{table}\n\n{text}\n\nTotal {time.perf_counter() - start:.0f} s. Wrote "
        f"{out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_compression.png'}"
    )
    return 0
