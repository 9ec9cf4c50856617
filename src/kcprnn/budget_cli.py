"""``kcprnn budget IN OUT BUDGET``: the command line of :func:`kcprnn.budget.configurations`."""

from __future__ import annotations

import argparse
import sys

from .budget import configurations


def main(argv: list[str] | None = None) -> int:
    """``kcprnn budget IN OUT BUDGET``: each format's configurations that fit the budget."""
    parser = argparse.ArgumentParser(
        prog="kcprnn budget",
        description="List each format's configurations of an (OUT x IN) matrix within a "
        "parameter budget (a share of the dense parameters in (0, 1]), with parameter counts "
        "and multiply-accumulates; the first row of a format is what rank=BUDGET builds.",
    )
    parser.add_argument("in_features", type=int)
    parser.add_argument("out_features", type=int)
    parser.add_argument("budget", type=float, help="share of the dense parameters, e.g. 0.02")
    parser.add_argument("--formats", default="", help="comma-separated (default: all)")
    parser.add_argument("--rows", type=int, default=1, help="rows of the product the MACs count")
    parser.add_argument("--limit", type=int, default=4, help="configurations per format")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f] or None
    try:
        table = configurations(
            args.in_features,
            args.out_features,
            args.budget,
            formats,
            rows=args.rows,
            limit=args.limit,
        )
    except (TypeError, ValueError) as exc:
        print(f"kcprnn budget: error: {exc}", file=sys.stderr)
        return 2
    target = args.budget * args.in_features * args.out_features
    shape = f"{args.out_features} x {args.in_features}"
    print(f"{shape}, budget {args.budget:g}: {target:,.0f} parameters")
    print(f"{'format':<8} {'params':>12} {'share':>9} {'compr.':>9} {'MACs':>14}  options")
    for name, rows in table.items():
        for k, c in enumerate(rows):
            opts = ", ".join(f"{key}={value}" for key, value in c.options.items())
            tag = f" [{c.label}]" if c.label else ""
            print(
                f"{name if k == 0 else '':<8} {c.num_params:>12,} {c.fraction:>9.5f} "
                f"{c.compression:>8.1f}x {c.macs:>14,}  {opts}{tag}"
            )
    return 0
