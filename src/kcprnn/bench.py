"""``kcprnn bench``: time every registered format against dense ``nn.Linear``/``nn.LSTM``, the
input read and the peer libraries; write JSON and PNG plots, print tables and log-log slopes.

The command measures and reports only. Checking a run against the team's acceptance thresholds
is ``benchmarks/check_targets.py`` (thresholds in ``benchmarks/targets.toml``).

Examples::

    kcprnn bench --quick                        # a minute or two
    kcprnn bench                                # full run (UCF11 point, sweeps, LSTM step,
                                                #   recurrent regimes: hours on 2 CPU cores)
    kcprnn bench --quick --points speech,streaming   # two regimes at the quick sizes
    kcprnn bench --points ucf11 --no-memory     # one point
    .venv-peers/bin/kcprnn bench --peers required   # with tednet and tensorly-torch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .benchmarking import (
    POINT_KINDS,
    PRESETS,
    SuiteConfig,
    override_regimes,
    peer_status,
    run_suite,
)
from .benchmarking.report import (
    SWEEP_AXES,
    format_markdown,
    format_point_table,
    plot_sweeps,
    sweep_series,
)
from .benchmarking.suite import environment

__all__ = ["main", "parse_args", "write_json_atomic"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="kcprnn bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="sizes and repetitions (default: ucf11, or quick with --quick)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer sweep points and rounds (1-2 minutes)"
    )
    ap.add_argument(
        "--points",
        default=",".join(POINT_KINDS),
        help=f"comma-separated subset of {','.join(POINT_KINDS)} (default: all)",
    )
    ap.add_argument(
        "--formats", default=None, help="comma-separated subset of our formats (default: all)"
    )
    ap.add_argument(
        "--peers",
        choices=("auto", "none", "required"),
        default="auto",
        help="auto: use tednet/tensorly-torch if importable; required: fail without them",
    )
    ap.add_argument(
        "--no-peers", dest="peers", action="store_const", const="none", help="same as --peers none"
    )
    ap.add_argument(
        "--memory",
        dest="memory",
        action="store_true",
        default=None,
        help="measure peak memory at the UCF11, LSTM and regime points (not the sweeps; "
        "default, except --quick)",
    )
    ap.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip peak-memory measurement (CPU: one subprocess per case)",
    )
    ap.add_argument(
        "--regime",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one size of the regime points (repeatable), e.g. speech_seq_len=300, "
        "speech_modes=LSTM, sweep_formats=kcp,tt (fields of RegimeSizes)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default: the preset's)"
    )
    ap.add_argument(
        "--out", default="bench-results", help="folder for bench.json and the PNG plots"
    )
    ap.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    ap.add_argument(
        "--replot",
        metavar="JSON",
        default=None,
        help="only rebuild plots and tables.md in --out from a bench.json (also partial)",
    )
    args = ap.parse_args(argv)
    if args.preset is None:
        args.preset = "quick" if args.quick else "ucf11"
    if args.memory is None:
        args.memory = args.preset != "quick"
    points = tuple(p.strip() for p in args.points.split(",") if p.strip())
    unknown = [p for p in points if p not in POINT_KINDS]
    if unknown:
        ap.error(f"unknown points {unknown}; choose from {list(POINT_KINDS)}")
    args.points = points
    args.formats = (
        None if args.formats is None else tuple(f.strip() for f in args.formats.split(","))
    )
    if args.threads < 1:
        ap.error(f"--threads must be positive, got {args.threads}")
    try:
        preset = PRESETS[args.preset]
        args.sizes = dataclasses.replace(
            preset, regimes=override_regimes(preset.regimes, args.regime)
        )
    except ValueError as err:
        ap.error(str(err))
    return args


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _slopes(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fitted log-log slopes (and local slopes) of every series of every sweep present."""
    return {
        sweep: {
            mode: {
                name: {k: v for k, v in s.items() if k in ("slope", "local_slopes")}
                for name, s in sweep_series(points, sweep, mode).items()
            }
            for mode in ("forward", "forward_backward", "macs")
        }
        for sweep in SWEEP_AXES
        if any(p["sweep"] == sweep for p in points)
    }


def _write_tables(out_dir: Path, points: list[dict[str, Any]], env: dict[str, Any]) -> None:
    md = out_dir / "tables.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(format_markdown(points, env))
    os.replace(tmp, md)


def replot(source: Path, out_dir: Path) -> int:
    """Plots and ``tables.md`` in ``out_dir`` from an existing (possibly partial) bench.json."""
    data = json.loads(source.read_text())
    points, env = data["points"], data["environment"]
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (
        f"kcprnn bench {data['preset']}, {env['threads']} threads, {env['device']}, "
        f"torch {env['versions']['torch']}"
    )
    plots = plot_sweeps(points, out_dir, title)
    _write_tables(out_dir, points, env)
    print(f"wrote {len(plots)} plots and {out_dir / 'tables.md'} from {source}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replot is not None:
        return replot(Path(args.replot), Path(args.out))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kcprnn bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    status = peer_status() if args.peers != "none" else {}
    available = {lib for lib, s in status.items() if s["available"]}
    if args.peers == "required" and available != set(status):
        missing = {lib: s["error"] for lib, s in status.items() if not s["available"]}
        print(
            f"kcprnn bench: --peers required but missing: {missing}; run benchmarks/setup_peers.sh",
            file=sys.stderr,
        )
        return 2
    for lib, s in status.items():
        print(
            f"peer {lib}: "
            + (f"version {s['version']}" if s["available"] else f"absent ({s['error']})")
        )
    env = environment(device, args.threads)
    print(
        f"torch {env['versions']['torch']}, {env['threads']} threads, {env['device']}, {env['cpu']}"
    )
    out_dir = Path(args.out)
    path = out_dir / "bench.json"
    start = time.perf_counter()
    title = (
        f"kcprnn bench {args.preset}, {env['threads']} threads, {env['device']}, "
        f"torch {env['versions']['torch']}"
    )

    def assemble(points: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        return {
            "schema": 1,
            "complete": complete,
            "preset": args.preset,
            "preset_sizes": dataclasses.asdict(cfg.preset),
            "args": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in vars(args).items()
                if k != "sizes"
            },
            "environment": env,
            "peers": status
            or {
                lib: {"available": False, "error": "disabled (--peers none)"}
                for lib in ("tednet", "tltorch")
            },
            "seconds": time.perf_counter() - start,
            "points": points,
            "slopes": _slopes(points),
            "plots": {},
        }

    cfg = SuiteConfig(
        preset=args.sizes,
        device=device,
        threads=args.threads,
        points=args.points,
        formats=args.formats,
        peers=args.peers,
        memory=args.memory,
        rounds=args.rounds,
        log=lambda m: print(m, flush=True),
        on_point=lambda pts: write_json_atomic(path, assemble(pts, complete=False)),
    )
    points = run_suite(cfg, available)
    result = assemble(points, complete=True)
    if args.plots:
        result["plots"] = plot_sweeps(points, out_dir, title)
    write_json_atomic(path, result)
    _write_tables(out_dir, points, env)
    slopes = result["slopes"]
    for pt in points:
        if pt["sweep"] is None:
            print()
            print(format_point_table(pt))
    for sweep, modes in slopes.items():
        print(f"\n== log-log slopes vs {sweep} (forward / forward+backward / MACs) ==")
        for name in sorted(modes["forward"]):
            cells = []
            for mode in ("forward", "forward_backward", "macs"):
                v = modes[mode].get(name, {}).get("slope")
                cells.append(f"{'-' if v is None else f'{v:+.2f}':>6}")
            print(f"  {name:<44} {' / '.join(cells)}")
    plots = result["plots"]
    print(
        f"\nwrote {path}"
        + (f" and {len(plots)} plots" if plots else "")
        + f" in {result['seconds']:.0f} s"
    )
    return 0
