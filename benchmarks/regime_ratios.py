"""Summarize the recurrent regime points of a ``kcprnn bench`` run as ratios to ``torch.nn``.

One row per speech, spike and streaming point: ``torch.nn``'s median time (forward / forward +
backward, ms) and, for kcprnn's modules, ``torch.nn``'s time over theirs (above 1: kcprnn is
faster): dense, the other formats (TT, TR, BT, HT, CP, Tucker; their range) with a compressed
``W_ih`` and with both matrices compressed, and KCP the same two ways. Below the table: how many
ratios are below 1 and below ``--noise`` (0.95, about a run's spread), and the lowest. Reads the
JSON alone::

    python benchmarks/regime_ratios.py benchmarks/results/regimes/amd-calibrated/bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PHASES = ("forward", "forward_backward")


STAT = "median_ms"  # or "min_ms" (--stat min): the fastest round, steadier on a noisy machine


def _median(case: dict[str, Any], phase: str) -> float | None:
    found = case.get(phase)
    return found.get(STAT) if isinstance(found, dict) else None


def _ratio_text(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    low, high = min(ratios), max(ratios)
    return f"{low:.2f}" if len(ratios) == 1 else f"{low:.2f}-{high:.2f}"


def summarize(data: dict[str, Any]) -> tuple[list[str], list[tuple[float, str]]]:
    """Markdown table lines, and every ratio with its label (point, case, phase)."""
    lines = [
        "| point | `torch.nn` ms | kcprnn dense | others, `W_ih` | others, both "
        "| KCP `W_ih` | KCP both |",
        "|---|---|---|---|---|---|---|",
    ]
    every: list[tuple[float, str]] = []
    for point in data["points"]:
        if not point["name"].startswith(("speech", "spikes", "streaming")):
            continue
        cases = point["cases"]
        torch_case = next((c for c in cases if c["impl"] == "torch"), None)
        if torch_case is None:
            continue
        groups: dict[str, dict[str, list[float]]] = {}
        for case in cases:
            if case["impl"] != "kcprnn":
                continue
            label = case["label"]
            both = "W_ih+W_hh" in label
            if case["format"] == "dense":
                group = "dense"
            elif case["format"] == "kcp":
                group = "kcp both" if both else "kcp ih"
            else:
                group = "others both" if both else "others ih"
            for phase in PHASES:
                ours, theirs = _median(case, phase), _median(torch_case, phase)
                if ours is None or theirs is None:
                    continue
                ratio = theirs / ours
                groups.setdefault(group, {}).setdefault(phase, []).append(ratio)
                every.append((ratio, f"{point['name']}: {label}, {phase}"))
        torch_ms = " / ".join(
            f"{_median(torch_case, p):.3g}" for p in PHASES if _median(torch_case, p) is not None
        )
        cells = [
            " / ".join(_ratio_text(groups.get(g, {}).get(p, [])) for p in PHASES)
            for g in ("dense", "others ih", "others both", "kcp ih", "kcp both")
        ]
        lines.append(f"| {point['name']} | {torch_ms} | " + " | ".join(cells) + " |")
    return lines, every


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a bench.json written by kcprnn bench")
    parser.add_argument(
        "--noise", type=float, default=0.95, help="also count the ratios below this (0.95)"
    )
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="each case's median round (default) or its fastest",
    )
    parser.add_argument("--worst", type=int, default=10, help="list this many lowest ratios")
    args = parser.parse_args(argv)
    global STAT
    STAT = args.stat + "_ms"
    with open(args.json) as f:
        data = json.load(f)
    lines, every = summarize(data)
    print("\n".join(lines))
    below = sorted(r for r in every if r[0] < 1.0)
    clear = sum(r[0] < args.noise for r in every)
    print(f"\n{len(below)} of {len(every)} ratios below 1, {clear} below {args.noise:g}; lowest:")
    for ratio, label in below[: args.worst]:
        print(f"  {ratio:.2f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
