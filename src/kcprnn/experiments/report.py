"""``kcprnn report RUN_DIR...``: the results table and the accuracy-vs-compression plot of runs.

Each run folder written by :func:`kcprnn.experiments.train.train` holds ``summary.json``; a folder
without one but with run subfolders (a demo folder) stands for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["collect", "format_table", "main", "plot", "write_report"]

COLUMNS = (
    ("format", "format", "{}"),
    ("ih_params", "input-to-hidden params", "{:,}"),
    ("compression", "compression ratio", "{:,.0f}x"),
    ("ih_macs_per_frame", "MACs per frame (W_ih)", "{:,}"),
    ("seconds_per_epoch", "train s/epoch", "{:.1f}"),
)
SCORES = (
    ("test_acc", "test accuracy", "{:.1%}"),
    ("test_per", "test PER", "{:.1%}"),
    ("test_wer", "test WER", "{:.1%}"),
)
"""The score columns: accuracy (classification), phone or word error rate (speech); a table
holds those that appear in its rows."""


def _columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    scores = tuple(s for s in SCORES if any(row.get(s[0]) is not None for row in rows))
    return COLUMNS + (scores or SCORES[:1])


def _score(row: dict[str, Any]) -> tuple[str, str]:
    """The key and title of the run's score (its first of :data:`SCORES`)."""
    return next(((k, t) for k, t, _ in SCORES if row.get(k) is not None), SCORES[0][:2])


def collect(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """The ``summary.json`` of every run (expanding folders of runs), with ``run_dir`` added."""
    rows = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"run folder {str(d)!r} does not exist")
        if (d / "summary.json").is_file():
            found = [d]
        else:
            found = sorted(p.parent for p in d.glob("*/summary.json"))
        if not found:
            raise FileNotFoundError(f"{str(d)!r} has no summary.json (is it a finished run?)")
        for run in found:
            row = json.loads((run / "summary.json").read_text())
            rows.append({**row, "run_dir": str(run)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per run."""
    columns = _columns(rows)
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" if k == "format" else "---:" for k, _, _ in columns) + "|",
    ]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy (or error rate, for speech) against compression ratio (log scale), one
    labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    key, title = _score(rows[0]) if rows else SCORES[0][:2]
    for row in rows:
        ax.scatter(row["compression"], 100 * row[key], s=30)
        ax.annotate(
            row["format"],
            (row["compression"], 100 * row[key]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=9,
        )
    if rows and "num_classes" in rows[0] and key == "test_acc":
        ax.axhline(100 / rows[0]["num_classes"], color="grey", ls="--", lw=1, label="chance")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio of the input-to-hidden matrix")
    ax.set_ylabel(f"{title} (%)")
    ax.set_title(rows[0]["dataset"] if rows else "")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path, mode: int | None = None) -> None:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG atomically (a temporary file
    in the same folder, then ``os.replace``; ``mode`` sets its permissions) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> str:
    """Write ``results.json``, ``results.md`` and ``accuracy_vs_compression.png``; return the
    Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    for name, text in (
        ("results.json", json.dumps(rows, indent=2) + "\n"),
        ("results.md", table + "\n"),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    plot(rows, out_dir / "accuracy_vs_compression.png")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kcprnn report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--out",
        help="where results.* go (default: the first RUN_DIR if it is "
        "a folder of runs, else its parent)",
    )
    args = parser.parse_args(argv)
    try:
        rows = collect(args.run_dirs)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"kcprnn report: error: {exc}", file=sys.stderr)
        return 2
    first = Path(args.run_dirs[0])
    if args.out:
        out = Path(args.out)
    else:
        out = first.parent if (first / "summary.json").is_file() else first
    print(write_report(rows, out))
    names = ("results.md", "results.json", "accuracy_vs_compression.png")
    written = ", ".join(str(out / n) for n in names)
    print(f"\nwrote {written}")
    return 0
