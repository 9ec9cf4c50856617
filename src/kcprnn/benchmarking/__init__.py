"""Benchmark harness behind ``kcprnn bench``: our formats against dense layers and the peer
libraries (tednet, tensorly-torch), which are imported only here and only when installed.

The harness measures and reports; it judges nothing. The team's acceptance thresholds and the
script that checks a run against them are in ``benchmarks/`` (``targets.toml``,
``check_targets.py``)."""

from .cases import CaseSpec, build_case, match_peer_rank, peer_num_params, peer_status
from .presets import PRESETS, Preset, blocked_split, kronecker_split
from .report import fit_loglog_slope, sweep_series
from .suite import POINT_KINDS, SuiteConfig, run_suite
from .timing import TimingStats, median, time_interleaved

__all__ = [
    "POINT_KINDS",
    "PRESETS",
    "CaseSpec",
    "Preset",
    "SuiteConfig",
    "TimingStats",
    "blocked_split",
    "build_case",
    "fit_loglog_slope",
    "kronecker_split",
    "match_peer_rank",
    "median",
    "peer_num_params",
    "peer_status",
    "run_suite",
    "sweep_series",
    "time_interleaved",
]
