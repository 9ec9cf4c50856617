"""The recurrent regimes of the suite: speech, spikes, streaming inference, and time against the
sequence length and the hidden size.

Every regime point holds, for one recurrent mode and size: ``torch.nn``'s module (or cell),
kcprnn's dense one, and every format for the input-to-hidden matrix alone (``W_hh`` dense) and
for both matrices; the input read (``x.sum()`` over the whole input) and one square float32 GEMM,
timed in the same interleaved run, give the point's roofline; tednet's LSTMs join the
unidirectional one-layer LSTM sequences where that library is installed.

- ``speech``: bidirectional modules (LSTM, GRU) over ``T`` frames of a batch of utterances;
- ``spikes``: unidirectional modules over spike-train input (700 channels);
- ``streaming``: one cell step at batch 1 (at the video and the speech sizes), and a long
  sequence at batch 1;
- ``sweep-T`` / ``sweep-hidden``: the speech module against ``T`` and against the hidden size.

The roofline of a case is the larger of the input read and its MACs at the run's GEMM peak (the
forward+backward roofline takes three times the forward's MACs: the backward of every product is
two products of the same size). Its MACs are the larger of the two counts the suite records:
``macs``, the products seen while the forward runs (fused kernels, torch's or those a module routes
to, are invisible to that counter), and ``model_macs``, the model's own count
(:func:`kcprnn.summary` for kcprnn's modules, the dense formula for ``torch.nn``'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..shapes import balanced_factors
from .cases import PEER_LSTMS, CaseSpec, read_spec
from .presets import RegimeSizes

__all__ = [
    "REGIME_POINTS",
    "RegimePoint",
    "add_roofline",
    "matrices_of",
    "regime_points",
]

REGIME_POINTS = ("speech", "spikes", "streaming", "sweep-T", "sweep-hidden")
"""Point kinds of :func:`regime_points`, as named by ``kcprnn bench --points``."""

BACKWARD_MAC_FACTOR = 3
"""Forward+backward MACs per forward MAC in the roofline (input and weight gradients)."""


@dataclass
class RegimePoint:
    """One point to run: its name, sweep (``None`` outside the sweeps), swept value, the
    description recorded with it (``regime``: mode, sizes) and its cases."""

    name: str
    sweep: str | None
    x: float | None
    regime: dict[str, Any]
    specs: list[CaseSpec]
    memory: bool


def matrices_of(case: dict[str, Any]) -> str:
    """Which matrices of a recurrent case are compressed: ``"input"`` (``W_ih`` only),
    ``"both"``, or ``"dense"`` (kcprnn's dense module, and ``torch.nn``'s)."""
    hidden = case.get("options", {}).get("hidden_format", "dense")
    if case.get("format") == "dense" and hidden == "dense":
        return "dense"
    return "input" if hidden == "dense" else "both"


def _name(mode: str, cell: bool) -> str:
    return f"{mode}Cell" if cell else mode


def _specs(
    sizes: RegimeSizes,
    formats: Sequence[str],
    peers: set[str],
    *,
    mode: str,
    in_features: int,
    hidden: int,
    seq_len: int,
    batch: int,
    bidirectional: bool = False,
    num_layers: int = 1,
    cell: bool = False,
) -> list[CaseSpec]:
    kind = "cell" if cell else "rnn"
    rows = batch if cell else seq_len * batch
    common: dict[str, Any] = {
        "kind": kind,
        "in_features": in_features,
        "out_features": hidden,
        "rows": rows,
        "seq_len": 1 if cell else seq_len,
        "batch": batch,
    }
    base: dict[str, Any] = {"mode": mode}
    if not cell:
        base.update(bidirectional=bidirectional, num_layers=num_layers)
    n = sizes.gemm_size
    name = _name(mode, cell)
    specs = [
        read_spec(in_features, hidden, rows),
        CaseSpec(
            label=f"GEMM {n}x{n}x{n} float32",
            series="GEMM peak",
            impl="gemm",
            kind="gemm",
            format="gemm",
            in_features=n,
            out_features=n,
            rows=n,
        ),
        CaseSpec(
            label=f"torch nn.{name}",
            series=f"torch nn.{name}",
            impl="torch",
            format="dense",
            options=dict(base),
            **common,
        ),
        CaseSpec(
            label=f"kcprnn {name} dense",
            series=f"kcprnn {name} dense",
            impl="kcprnn",
            format="dense",
            options=dict(base, hidden_format="dense"),
            **common,
        ),
    ]
    r = sizes.rank
    for fmt in formats:
        for hidden_format, tag in (("dense", "W_ih"), (fmt, "W_ih+W_hh")):
            opts = dict(base, rank=r, hidden_format=hidden_format)
            if hidden_format != "dense":
                opts["hidden_rank"] = r
            specs.append(
                CaseSpec(
                    label=f"kcprnn {name} {fmt} r={r} ({tag})",
                    series=f"kcprnn {fmt} ({tag})",
                    impl="kcprnn",
                    format=fmt,
                    options=opts,
                    **common,
                )
            )
    if "tednet" in peers and mode == "LSTM" and not cell and not bidirectional and num_layers == 1:
        in_modes = sorted(balanced_factors(in_features, 4), reverse=True)
        hidden_modes = sorted(balanced_factors(hidden, 4), reverse=True)
        for pfmt in PEER_LSTMS["tednet"]:
            if pfmt == "tk2":  # Tucker-2 needs a 3-mode image input; no such input here
                continue
            specs.append(
                CaseSpec(
                    label=f"tednet {pfmt.upper()}LSTM r={r}",
                    series=f"tednet LSTM {pfmt}",
                    impl="tednet",
                    kind="lstm",
                    format=pfmt,
                    in_features=in_features,
                    out_features=hidden,
                    rows=rows,
                    in_modes=in_modes,
                    out_modes=hidden_modes,
                    options={"rank": r},
                    seq_len=seq_len,
                    batch=batch,
                )
            )
    return specs


def regime_points(
    sizes: RegimeSizes,
    kinds: Sequence[str],
    formats: Sequence[str],
    peers: set[str],
    memory: bool,
) -> list[RegimePoint]:
    """The points of ``kinds`` (a subset of :data:`REGIME_POINTS`, in that order) for ``sizes``.

    ``formats``: our formats (the sweeps keep ``sizes.sweep_formats`` of them); ``memory``:
    measure peak memory at the non-sweep points."""
    s = sizes
    points: list[RegimePoint] = []

    def add(name: str, sweep: str | None, x: float | None, meta: dict[str, Any], **kw: Any):
        fmts = formats
        if sweep is not None and s.sweep_formats is not None:
            fmts = [f for f in formats if f in s.sweep_formats]
        specs = _specs(s, fmts, peers, **kw)
        points.append(RegimePoint(name, sweep, x, meta, specs, memory and sweep is None))

    if "speech" in kinds:
        for mode in s.speech_modes:
            for i in s.speech_inputs:
                for h in s.speech_hiddens:
                    for layers in s.speech_layers:
                        meta = _meta("speech", mode, i, h, s.speech_seq_len, s.speech_batch)
                        meta.update(bidirectional=True, num_layers=layers)
                        add(
                            f"speech {mode} bi T={s.speech_seq_len} B={s.speech_batch} "
                            f"I={i} H={h} L={layers}",
                            None,
                            None,
                            meta,
                            mode=mode,
                            in_features=i,
                            hidden=h,
                            seq_len=s.speech_seq_len,
                            batch=s.speech_batch,
                            bidirectional=True,
                            num_layers=layers,
                        )
    if "spikes" in kinds:
        for mode in s.spikes_modes:
            for t in s.spikes_seq_lens:
                i, h, b = s.spikes_input, s.spikes_hidden, s.spikes_batch
                add(
                    f"spikes {mode} T={t} B={b} I={i} H={h}",
                    None,
                    None,
                    _meta("spikes", mode, i, h, t, b),
                    mode=mode,
                    in_features=i,
                    hidden=h,
                    seq_len=t,
                    batch=b,
                )
    if "streaming" in kinds:
        for mode in s.stream_modes:
            for size, i, h in s.stream_cell_sizes:
                meta = _meta("streaming", mode, i, h, 1, 1)
                meta.update(cell=True, size=size)
                add(
                    f"streaming {mode}Cell step B=1 {size} I={i} H={h}",
                    None,
                    None,
                    meta,
                    mode=mode,
                    in_features=i,
                    hidden=h,
                    seq_len=1,
                    batch=1,
                    cell=True,
                )
        for mode in s.stream_seq_modes:
            i, h = s.stream_seq_size
            t = s.stream_seq_len
            add(
                f"streaming {mode} T={t} B=1 I={i} H={h}",
                None,
                None,
                _meta("streaming", mode, i, h, t, 1),
                mode=mode,
                in_features=i,
                hidden=h,
                seq_len=t,
                batch=1,
            )
    for kind, values in (("sweep-T", s.sweep_seq_lens), ("sweep-hidden", s.sweep_hiddens)):
        if kind not in kinds:
            continue
        for v in values:
            t = v if kind == "sweep-T" else s.sweep_seq_len
            h = v if kind == "sweep-hidden" else s.sweep_hidden
            meta = _meta(kind, s.sweep_mode, s.sweep_input, h, t, s.sweep_batch)
            meta.update(bidirectional=True, num_layers=1)
            add(
                f"{kind} {s.sweep_mode} bi T={t} B={s.sweep_batch} I={s.sweep_input} H={h}",
                "T" if kind == "sweep-T" else "hidden",
                float(v),
                meta,
                mode=s.sweep_mode,
                in_features=s.sweep_input,
                hidden=h,
                seq_len=t,
                batch=s.sweep_batch,
                bidirectional=True,
            )
    return points


def _meta(regime: str, mode: str, i: int, h: int, t: int, b: int) -> dict[str, Any]:
    return {
        "regime": regime,
        "mode": mode,
        "input": i,
        "hidden": h,
        "seq_len": t,
        "batch": b,
        "bidirectional": False,
        "num_layers": 1,
        "cell": False,
    }


def add_roofline(point: dict[str, Any]) -> None:
    """Add the point's roofline (``point["roofline"]``: the input read, the GEMM and its peak)
    and, per timed case, ``roofline`` ms and the ratios ``forward_over_roofline`` /
    ``forward_backward_over_roofline`` (replacing earlier ones). Without a timed read or GEMM
    nothing is added."""
    cases = point["cases"]

    def timed(impl: str) -> dict[str, Any] | None:
        return next((c for c in cases if c["impl"] == impl and "forward" in c), None)

    read, gemm = timed("read"), timed("gemm")
    if read is None or gemm is None or not gemm.get("macs"):
        return
    read_ms = float(read["forward"]["median_ms"])
    gemm_ms = float(gemm["forward"]["median_ms"])
    peak = float(gemm["model_macs"]) / (gemm_ms * 1e-3)  # MACs per second
    point["roofline"] = {
        "read_ms": read_ms,
        "gemm_n": int(gemm["in_features"]),
        "gemm_ms": gemm_ms,
        "gemm_peak_gmacs": peak / 1e9,
        "backward_mac_factor": BACKWARD_MAC_FACTOR,
    }
    for c in cases:
        macs = float(max(c.get("macs") or 0, c.get("model_macs") or 0))
        if c["impl"] in ("read", "gemm") or c["status"] != "ok" or macs <= 0:
            continue
        roof = {
            "forward_ms": max(read_ms, macs / peak * 1e3),
            "forward_backward_ms": max(read_ms, BACKWARD_MAC_FACTOR * macs / peak * 1e3),
        }
        c["roofline"] = roof
        ratios = c.setdefault("ratios", {})
        for mode in ("forward", "forward_backward"):
            if mode in c:
                ratios[f"{mode}_over_roofline"] = float(c[mode]["median_ms"]) / roof[f"{mode}_ms"]
