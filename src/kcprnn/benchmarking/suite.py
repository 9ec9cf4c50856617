"""The benchmark suite: points (UCF11 layer, sweeps over rank, rows and input size, the LSTM
training step, the recurrent regimes of :mod:`.regimes`), each timed as one interleaved run;
results as a JSON-ready dict.

A *point* is one problem size. At a point every case (ours, the dense baseline, the input
read, the peers) is built, checked to run, counted (parameters, multiply-accumulates), and then
all cases' forward and forward+backward closures are timed together by
:func:`~.timing.time_interleaved`, so the ratios at a point come from one run.
"""

from __future__ import annotations

import gc
import importlib.metadata
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._cpu import cost
from ..formats import FORMATS
from .cases import (
    PEER_FORMATS,
    PEER_LSTMS,
    BuiltCase,
    CaseSpec,
    build_case,
    count_macs,
    match_peer_rank,
    read_spec,
)
from .memory import measure_peak_memory
from .presets import Preset, blocked_split, kronecker_split
from .regimes import REGIME_POINTS, add_roofline, regime_points
from .timing import time_interleaved

__all__ = ["SuiteConfig", "environment", "run_suite", "POINT_KINDS"]

POINT_KINDS = ("ucf11", "rank", "rows", "input", "lstm", *REGIME_POINTS)
MODES = ("forward", "forward_backward")
_RECURRENT = ("lstm", "rnn", "cell")


@dataclass(frozen=True)
class SuiteConfig:
    """What to run. ``peers``: ``"auto"`` (use the ones that import), ``"none"`` or
    ``"required"`` (fail when one is absent). ``on_point`` is called with the points so far
    after each point (the CLI rewrites its JSON there, so an interrupted run keeps its data)."""

    preset: Preset
    device: torch.device
    threads: int
    points: tuple[str, ...] = POINT_KINDS
    formats: tuple[str, ...] | None = None
    peers: str = "auto"
    memory: bool = True
    rounds: int | None = None
    log: Callable[[str], None] | None = None
    on_point: Callable[[list[dict[str, Any]]], None] | None = None


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Versions, thread count and hardware, recorded with every run."""
    versions: dict[str, str | None] = {}
    for dist in ("torch", "kcprnn", "numpy", "tednet", "tensorly-torch", "tensorly", "opt-einsum"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    env: dict[str, Any] = {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "device": str(device),
        "opt_einsum": {
            "available": torch.backends.opt_einsum.is_available(),
            "enabled": bool(torch.backends.opt_einsum.enabled),
        },
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cost_model": {  # where `auto`'s prices come from, and what differs from the defaults
            "source": cost.default_cost_model_source(),
            "changed": dict(
                sorted(
                    cost.default_cost_model().to_dict().items() - cost.CostModel().to_dict().items()
                )
            ),
        },
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# --- case lists ---


def _our_formats(cfg: SuiteConfig) -> list[str]:
    names = sorted(n for n in FORMATS if n != "dense")
    if cfg.formats is not None:
        names = [n for n in names if n in cfg.formats]
    return names


def _algorithms(fmt: str) -> list[str | None]:
    """Every algorithm of formats that choose one ("auto" present), else the default only."""
    algos = tuple(FORMATS[fmt].algorithms)
    return list(algos) if "auto" in algos else [None]


def _kcp_modes(
    in_modes: Sequence[int], out_modes: Sequence[int], layout: str
) -> tuple[list[Any], list[Any]]:
    """KCP's nested modes: every mode split in two (``"interleaved"``, the paper's form) or
    whole modes per factor (``"blocked"``, the fast layout)."""
    if layout == "blocked":
        return blocked_split(in_modes, out_modes)
    return kronecker_split(in_modes), kronecker_split(out_modes)


def _our_linear(
    fmt: str,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    rows: int,
    rank: Any,
    algorithm: str | None,
    tag: str,
    layout: str = "interleaved",
) -> CaseSpec:
    options: dict[str, Any] = {"rank": list(rank) if isinstance(rank, Sequence) else rank}
    if algorithm is not None:
        options["algorithm"] = algorithm
    suffix = f" {algorithm}" if algorithm is not None else ""
    name = f"{fmt}-{layout}" if layout != "interleaved" else fmt
    rank_label = "x".join(map(str, rank)) if isinstance(rank, Sequence) else rank
    if fmt == "kcp":
        nested_in, nested_out = _kcp_modes(in_modes, out_modes, layout)
    else:
        nested_in, nested_out = list(in_modes), list(out_modes)
    return CaseSpec(
        label=f"kcprnn {name} r={rank_label}{suffix}",
        series=f"kcprnn {name}{suffix}" + tag,
        impl="kcprnn",
        kind="linear",
        format=fmt,
        in_features=math.prod(in_modes),
        out_features=math.prod(out_modes),
        rows=rows,
        in_modes=nested_in,
        out_modes=nested_out,
        options=options,
    )


def _baselines(
    in_modes: Sequence[int], out_modes: Sequence[int], rows: int, dense: bool
) -> list[CaseSpec]:
    i, o = math.prod(in_modes), math.prod(out_modes)
    specs = [read_spec(i, o, rows)]
    if dense:
        specs.append(
            CaseSpec(
                label="torch nn.Linear",
                series="torch nn.Linear",
                impl="torch",
                kind="linear",
                format="dense",
                in_features=i,
                out_features=o,
                rows=rows,
            )
        )
    return specs


def _peer_linear(ours: CaseSpec, params: int, available: set[str]) -> list[CaseSpec]:
    """Peer layers of ``ours``'s format, each at the rank that best matches ``params``."""
    out = []
    blocks = int(ours.options.get("blocks", 1))
    for lib, pfmt in PEER_FORMATS.get(ours.format, []):
        if lib not in available:
            continue
        rank = match_peer_rank(
            lib, pfmt, list(ours.in_modes), list(ours.out_modes), params, blocks=blocks
        )
        opts: dict[str, Any] = {"rank": rank}
        if pfmt == "bt":
            opts["blocks"] = blocks
        out.append(
            CaseSpec(
                label=f"{lib} {pfmt} r={rank} (= {ours.label})",
                series=f"{lib} {pfmt} (= kcprnn {ours.format})",
                impl=lib,
                kind="linear",
                format=pfmt,
                in_features=ours.in_features,
                out_features=ours.out_features,
                rows=ours.rows,
                in_modes=list(ours.in_modes),
                out_modes=list(ours.out_modes),
                options=opts,
                matches=ours.label,
            )
        )
    return out


def _lstm_specs(cfg: SuiteConfig, available: set[str]) -> list[CaseSpec]:
    p = cfg.preset
    i, h = math.prod(p.lstm_in_modes), math.prod(p.lstm_hidden_modes)
    gates_out = [4 * p.lstm_hidden_modes[0], *p.lstm_hidden_modes[1:]]
    common: dict[str, Any] = {
        "in_features": i,
        "out_features": h,
        "rows": p.seq_len * p.batch,
        "seq_len": p.seq_len,
        "batch": p.batch,
        "kind": "lstm",
    }
    specs = [
        CaseSpec(
            label="torch nn.LSTM", series="torch nn.LSTM", impl="torch", format="dense", **common
        )
    ]
    for fmt in _our_formats(cfg):
        ranks = p.kcp_ranks if fmt == "kcp" else (p.rank,)
        layouts = ("interleaved", "blocked") if fmt == "kcp" else ("interleaved",)
        for layout, r in itertools.product(layouts, ranks):
            if fmt == "kcp":
                in_modes, out_modes = _kcp_modes(p.lstm_in_modes, gates_out, layout)
            else:
                in_modes, out_modes = list(p.lstm_in_modes), gates_out
            options: dict[str, Any] = {
                "in_modes": in_modes,
                "out_modes": out_modes,
                "hidden_modes": list(p.lstm_hidden_modes),
                "rank": r,
            }
            name = f"{fmt}-{layout}" if layout != "interleaved" else fmt
            specs.append(
                CaseSpec(
                    label=f"kcprnn LSTM {name} r={r}",
                    series=f"kcprnn LSTM {name}",
                    impl="kcprnn",
                    format=fmt,
                    in_modes=options["in_modes"],
                    out_modes=options["out_modes"],
                    options=options,
                    **common,
                )
            )
    if "tednet" in available:
        for pfmt in PEER_LSTMS["tednet"]:
            opts: dict[str, Any] = {"rank": p.rank}
            if pfmt == "tk2":
                opts["tk2_in_modes"] = list(p.tk2_in_modes)
            specs.append(
                CaseSpec(
                    label=f"tednet {pfmt.upper()}LSTM r={p.rank}",
                    series=f"tednet LSTM {pfmt}",
                    impl="tednet",
                    format=pfmt,
                    in_modes=list(p.lstm_in_modes),
                    out_modes=list(p.lstm_hidden_modes),
                    options=opts,
                    **common,
                )
            )
    return specs


# --- running a point ---


def _build_and_count(
    spec: CaseSpec, device: torch.device
) -> tuple[BuiltCase | None, dict[str, Any]]:
    result: dict[str, Any] = spec.as_dict()
    try:
        built = build_case(spec, device)
        out = built.forward()
        if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
            raise FloatingPointError("forward produced non-finite values")
        if built.forward_backward is not None:
            built.forward_backward()
        macs = count_macs(built.forward)
        if built.model_macs is not None and spec.impl == "torch" and spec.kind in _RECURRENT:
            macs = max(macs, built.model_macs)  # fused kernel, not seen by the flop counter
        if spec.kind == "gemm":
            macs = int(built.model_macs or 0)
        result.update(
            params=built.params,
            params_total=built.params_total,
            model_macs=built.model_macs,
            macs=macs,
        )
        if spec.impl == "kcprnn" and built.module is not None and spec.kind == "linear":
            weight = built.module.weight  # the FactorizedMatrix
            result["algorithm"] = str(getattr(weight, "algorithm", ""))
            plan = getattr(weight, "plan", None)  # KCP: what "auto" resolves to at these rows
            if callable(plan) and result["algorithm"] != "dense":
                # forwards are timed under no_grad; forward+backward trains the factors
                with torch.no_grad():  # the plan of a no_grad forward (cached matrices)
                    result["resolved_algorithm"] = str(plan(spec.rows).algorithm)
                result["resolved_algorithm_training"] = str(
                    plan(spec.rows, training=True).algorithm
                )
        result["status"] = "ok"
        return built, result
    except Exception as err:  # noqa: BLE001  (a failing case is reported, the suite goes on)
        result.update(status="error", error=f"{type(err).__name__}: {err}")
        return None, result


def _log(cfg: SuiteConfig, msg: str) -> None:
    if cfg.log is not None:
        cfg.log(msg)


def _time_point(
    cfg: SuiteConfig, built: list[BuiltCase | None], results: list[dict[str, Any]]
) -> None:
    items, where = [], []
    for k, b in enumerate(built):
        if b is None:
            continue
        for mode in MODES:
            fn = getattr(b, mode)
            if fn is not None:
                items.append(fn)
                where.append((k, mode))
    rounds = cfg.rounds if cfg.rounds is not None else cfg.preset.rounds
    # every closure already ran in _build_and_count (the warm-up); calibration is the second call
    stats = time_interleaved(
        items, device=cfg.device, rounds=rounds, block_s=cfg.preset.block_s, warmup=0
    )
    for (k, mode), st in zip(where, stats, strict=True):
        results[k][mode] = st.as_dict()


def _add_ratios(results: list[dict[str, Any]]) -> None:
    def med(label_pred: Callable[[dict[str, Any]], bool], mode: str) -> float | None:
        for r in results:
            if label_pred(r) and mode in r:
                return float(r[mode]["median_ms"])
        return None

    read = med(lambda r: r["impl"] == "read", "forward")
    for mode in MODES:
        dense = med(lambda r: r["impl"] == "torch", mode)
        for r in results:
            if mode not in r or r["impl"] in ("read", "gemm"):
                continue
            t = float(r[mode]["median_ms"])
            ratios = r.setdefault("ratios", {})
            if dense is not None and r["impl"] != "torch":
                ratios[f"speedup_vs_dense_{mode}"] = dense / t
            if read is not None and mode == "forward":
                ratios["forward_over_read"] = t / read


def run_point(
    cfg: SuiteConfig,
    name: str,
    sweep: str | None,
    x: float | None,
    specs: Sequence[CaseSpec],
    peer_fn: Callable[[CaseSpec, int], list[CaseSpec]] | None = None,
    memory: bool = False,
    regime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, count, time (and optionally measure memory of) ``specs`` plus their peers.

    A ``regime`` point records its description under ``"regime"`` and gets its roofline
    (:func:`~.regimes.add_roofline`)."""
    start = time.perf_counter()
    built: list[BuiltCase | None] = []
    results: list[dict[str, Any]] = []
    for spec in specs:
        b, res = _build_and_count(spec, cfg.device)
        built.append(b)
        results.append(res)
        if peer_fn is not None and b is not None and spec.impl == "kcprnn":
            for peer in peer_fn(spec, b.params):
                pb, pres = _build_and_count(peer, cfg.device)
                built.append(pb)
                results.append(pres)
    _time_point(cfg, built, results)
    _add_ratios(results)
    del built
    gc.collect()
    if memory:
        for res in results:
            if res["status"] == "ok":
                spec = CaseSpec.from_dict({k: res[k] for k in CaseSpec.__dataclass_fields__})
                res["memory"] = measure_peak_memory(spec, cfg.device, cfg.threads)
    point: dict[str, Any] = {
        "name": name,
        "sweep": sweep,
        "x": x,
        "seconds": time.perf_counter() - start,
        "cases": results,
    }
    if regime is not None:
        point["regime"] = regime
        add_roofline(point)
    errors = [r["label"] for r in results if r["status"] != "ok"]
    _log(
        cfg,
        f"  {name}: {len(results)} cases in {point['seconds']:.1f} s"
        + (f"; errors: {', '.join(errors)}" if errors else ""),
    )
    return point


def run_suite(cfg: SuiteConfig, available_peers: set[str]) -> list[dict[str, Any]]:
    """Run every point kind in ``cfg.points``; returns the list of point dicts."""
    torch.set_num_threads(cfg.threads)
    p = cfg.preset
    fmts = _our_formats(cfg)
    peers = available_peers if cfg.peers != "none" else set()

    def peer_fn(spec: CaseSpec, params: int) -> list[CaseSpec]:
        primary = spec.options.get("algorithm") in (None, FORMATS[spec.format].default_algorithm)
        return _peer_linear(spec, params, peers) if primary and params > 0 else []

    def layer(
        in_modes: Sequence[int], rows: int, ranks: Sequence[int] | None, rank: int, dense: bool
    ) -> list[CaseSpec]:
        specs = _baselines(in_modes, p.out_modes, rows, dense)
        for fmt in fmts:
            for r in ranks if (fmt == "kcp" and ranks) else (rank,):
                for algo in _algorithms(fmt):
                    specs.append(_our_linear(fmt, in_modes, p.out_modes, rows, r, algo, ""))
        if ranks:  # the main point: KCP's fast layout and the extra ranks too
            if "kcp" in fmts:
                for r in ranks:
                    for algo in _algorithms("kcp"):
                        if algo != "dense":  # the same dense W as the interleaved rows
                            specs.append(
                                _our_linear(
                                    "kcp",
                                    in_modes,
                                    p.out_modes,
                                    rows,
                                    r,
                                    algo,
                                    "",
                                    layout="blocked",
                                )
                            )
            for fmt, r in p.extra_ranks:
                if fmt in fmts:
                    for algo in _algorithms(fmt):
                        specs.append(_our_linear(fmt, in_modes, p.out_modes, rows, r, algo, ""))
        return specs

    points: list[dict[str, Any]] = []

    def add(point: dict[str, Any]) -> None:
        points.append(point)
        if cfg.on_point is not None:
            cfg.on_point(list(points))

    if "ucf11" in cfg.points:
        _log(
            cfg, f"point ucf11: {math.prod(p.in_modes)} -> {math.prod(p.out_modes)}, {p.rows} rows"
        )
        add(
            run_point(
                cfg,
                "ucf11",
                None,
                None,
                layer(p.in_modes, p.rows, p.kcp_ranks, p.rank, True),
                peer_fn,
                memory=cfg.memory,
            )
        )
    if "rank" in cfg.points:
        for r in p.sweep_ranks:
            _log(cfg, f"point rank={r}")
            add(
                run_point(
                    cfg, f"rank={r}", "rank", r, layer(p.in_modes, p.rows, None, r, False), peer_fn
                )
            )
    if "rows" in cfg.points:
        for rows in p.sweep_rows:
            _log(cfg, f"point rows={rows}")
            add(
                run_point(
                    cfg,
                    f"rows={rows}",
                    "rows",
                    rows,
                    layer(p.in_modes, rows, None, p.rank, True),
                    peer_fn,
                )
            )
    if "input" in cfg.points:
        for modes in p.sweep_inputs:
            n = math.prod(modes)
            _log(cfg, f"point input={n} {list(modes)}")
            add(
                run_point(
                    cfg, f"input={n}", "input", n, layer(modes, p.rows, None, p.rank, True), peer_fn
                )
            )
    if "lstm" in cfg.points:
        _log(
            cfg,
            f"point lstm: T={p.seq_len}, B={p.batch}, {math.prod(p.lstm_in_modes)} -> "
            f"{math.prod(p.lstm_hidden_modes)}",
        )
        add(run_point(cfg, "lstm", None, None, _lstm_specs(cfg, peers), None, memory=cfg.memory))
    for rp in regime_points(p.regimes, cfg.points, fmts, peers, cfg.memory):
        _log(cfg, f"point {rp.name}")
        add(run_point(cfg, rp.name, rp.sweep, rp.x, rp.specs, None, rp.memory, rp.regime))
    return points
