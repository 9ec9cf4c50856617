"""Benchmark harness behind ``kcprnn bench``: our formats against dense layers and the peer
libraries (tednet, tensorly-torch), which are imported only here and only when installed, and
our recurrent modules against ``torch.nn``'s in the speech, spikes and streaming regimes.

The harness measures and reports; it judges nothing. The team's acceptance thresholds and the
script that checks a run against them are in ``benchmarks/`` (``targets.toml``,
``check_targets.py``)."""

from .cases import CaseSpec, build_case, match_peer_rank, peer_num_params, peer_status
from .presets import (
    PRESETS,
    Preset,
    RegimeSizes,
    blocked_split,
    kronecker_split,
    override_regimes,
)
from .regimes import REGIME_POINTS, add_roofline, matrices_of, regime_points
from .report import fit_loglog_slope, sweep_series
from .suite import POINT_KINDS, SuiteConfig, run_suite
from .timing import TimingStats, median, time_interleaved

__all__ = [
    "POINT_KINDS",
    "PRESETS",
    "REGIME_POINTS",
    "CaseSpec",
    "Preset",
    "RegimeSizes",
    "SuiteConfig",
    "TimingStats",
    "add_roofline",
    "blocked_split",
    "build_case",
    "fit_loglog_slope",
    "kronecker_split",
    "match_peer_rank",
    "matrices_of",
    "median",
    "override_regimes",
    "peer_num_params",
    "peer_status",
    "regime_points",
    "run_suite",
    "sweep_series",
    "time_interleaved",
]
