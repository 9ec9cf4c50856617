"""``kcprnn demo``: the main job. Trains a dense LSTM and KCP-, TT-, TR-, BT- and HT-LSTMs on the
UCF11-like stand-in under one protocol, prints the table and writes ``results.json``,
``results.md`` and ``accuracy_vs_compression.png`` into the demo's run folder.

The protocol is the paper's UCF11 setting (160x120 RGB frames, 6 frames, input 57,600 =
8x20x20x18, hidden 256 = 4x4x4x4, batch 16, Adam, 20 % held out) shortened to fit a 2-core CPU
in a few minutes: a smaller training set, few epochs and a larger learning rate (1e-3; the
paper's 1e-4 needs far more steps). The dense baseline alone gets a smaller one (``--dense-lr``,
default 1e-5): Adam moves every one of its 57,600 input weights per gate row by about ``lr`` at
each step, so a step shifts each pre-activation by about ``lr * sum|x|``; at 1e-3 that saturates
the gates and the dense LSTM stays at chance (measured), while the factorized formats share each
parameter across many weights and train at 1e-3. ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .report import write_report
from .train import train

__all__ = ["DEMO_FORMATS", "demo_configs", "main"]

UCF11_IN_MODES = [8, 20, 20, 18]
DEMO_FORMATS: dict[str, dict[str, Any]] = {
    "dense": {},
    "kcp": {
        "in_modes": [[2, 4], [4, 5], [4, 5], [3, 6]],
        "out_modes": [[4, 4], [2, 2], [2, 2], [2, 2]],
        "rank": 4,
    },
    "tt": {"in_modes": UCF11_IN_MODES, "rank": 4},
    "tr": {"in_modes": UCF11_IN_MODES, "rank": 4},
    "bt": {"in_modes": UCF11_IN_MODES, "rank": 4, "blocks": 2},
    "ht": {"in_modes": UCF11_IN_MODES, "rank": 4},
}
"""Input-to-hidden format options of the demo (the gates fold into the first output mode: 16x4x4x4).
TT rank 4 and BT 2 blocks of rank 4 are the published UCF11 configurations (3,360 and 3,392
parameters)."""


def demo_configs(
    out_dir: Path, formats: list[str], dense_lr: float = 1e-5, **overrides: Any
) -> list[Config]:
    """One :class:`Config` per format, identical except for the format, its options and, for
    ``dense``, the learning rate ``dense_lr`` (see the module docstring)."""
    base = Config(
        dataset="ucf11-like",
        clips_per_class=80,
        num_frames=6,
        epochs=8,
        lr=1e-3,
        batch_size=16,
        seed=0,
        hidden_size=256,
        hidden_modes=(4, 4, 4, 4),
    )
    base = dataclasses.replace(base, **overrides)
    return [
        dataclasses.replace(
            base,
            format=f,
            format_options=dict(DEMO_FORMATS[f]),
            name=f"ucf11-like-{f}",
            out_dir=str(out_dir / f),
            lr=dense_lr if f == "dense" else base.lr,
        )
        for f in formats
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn demo",
        description="Train dense, KCP-, TT-, TR-, BT- and HT-LSTMs on the UCF11-like stand-in "
        "under one protocol; print and save the results table and plot.",
    )
    parser.add_argument("--out", help="run folder (default: runs/demo-<UTC time>)")
    parser.add_argument(
        "--formats",
        default=",".join(DEMO_FORMATS),
        help="comma-separated formats (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument(
        "--clips-per-class",
        type=int,
        default=80,
        help="stand-in clips per class, 20%% held out (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam, factorized formats (default: %(default)s)"
    )
    parser.add_argument(
        "--dense-lr",
        type=float,
        default=1e-5,
        help="Adam, the dense baseline (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--cache-dir", default="", help="stand-in cache (default ~/.cache/kcprnn)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    console = logging.StreamHandler()  # warnings on the console; each run.log has the details
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in DEMO_FORMATS]
    if unknown or not formats:
        print(
            f"kcprnn demo: error: --formats must name some of {list(DEMO_FORMATS)}, got "
            f"{args.formats!r}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    try:
        configs = demo_configs(
            out,
            formats,
            epochs=args.epochs,
            clips_per_class=args.clips_per_class,
            lr=args.lr,
            dense_lr=args.dense_lr,
            seed=args.seed,
            device=args.device,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except ConfigError as exc:
        print(f"kcprnn demo: error: {exc}", file=sys.stderr)
        return 2
    c = configs[0]
    print(
        f"kcprnn demo: {len(configs)} LSTMs on the UCF11-like stand-in ({c.clips_per_class} "
        f"clips x 11 classes, {c.num_frames} frames of {c.frame_width}x{c.frame_height}x3), "
        f"{c.epochs} epochs, Adam lr {args.lr:g} (dense {args.dense_lr:g}), batch "
        f"{c.batch_size}; run folder {out}",
        flush=True,
    )
    rows = []
    start = time.perf_counter()
    for cfg in configs:
        t0 = time.perf_counter()
        summary = train(cfg)
        rows.append({**summary, "run_dir": str(cfg.run_dir)})
        print(
            f"  {cfg.format:>6}: test accuracy {summary['test_acc']:.1%}, "
            f"{summary['ih_params']:,} input-to-hidden params, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    table = write_report(rows, out)
    print(
        f"\n{table}\n\nchance is {1 / rows[0]['num_classes']:.1%}; total "
        f"{time.perf_counter() - start:.0f} s. Wrote {out / 'results.md'}, "
        f"{out / 'results.json'}, {out / 'accuracy_vs_compression.png'}"
    )
    return 0
