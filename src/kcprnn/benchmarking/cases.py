"""Benchmark cases: a JSON-serializable :class:`CaseSpec` and :func:`build_case`, which turns a
spec into runnable forward and forward+backward closures.

Implementations (``CaseSpec.impl``):

- ``"kcprnn"``: our :class:`~kcprnn.FactorizedLinear` (any registered format) or our LSTM.
- ``"torch"``: ``nn.Linear`` / ``nn.LSTM`` (the dense baselines).
- ``"read"``: ``x.sum()``, the time to read the input once (the memory-bandwidth floor).
- recurrent modules and cells of either side, and the GEMM of a run's peak: :mod:`.rnn_cases`.
- ``"tednet"``, ``"tltorch"``: the peer libraries. They are imported here only, lazily, and
  are optional: :func:`peer_status` reports them absent when they cannot be imported.

A spec holds everything needed to rebuild the same case in another process (the CPU peak
memory worker does that), including the rank a peer was given to match our parameter count.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CASE_KINDS",
    "PEER_FORMATS",
    "BuiltCase",
    "CaseSpec",
    "build_case",
    "count_macs",
    "match_peer_rank",
    "peer_num_params",
    "peer_status",
]

CASE_KINDS = ("linear", "lstm", "read", "rnn", "cell", "gemm")
"""``CaseSpec.kind`` values: the recurrent ones are built by :mod:`~.rnn_cases`."""

PEER_FORMATS: dict[str, list[tuple[str, str]]] = {
    "tt": [("tednet", "tt"), ("tltorch", "blocktt")],
    "tr": [("tednet", "tr")],
    "bt": [("tednet", "bt")],
    "cp": [("tednet", "cp"), ("tltorch", "cp")],
    "tucker": [("tltorch", "tucker")],
}
"""Our format name -> the peer implementations of the same format, ``(library, peer format)``."""

PEER_LSTMS: dict[str, tuple[str, ...]] = {"tednet": ("tt", "tr", "bt", "cp", "tk2")}

_PEER_MODULES = {"tednet": "tednet.tnn", "tltorch": "tltorch"}
_TEDNET_SUBMODULES = ("tensor_train", "tensor_ring", "bt_tucker", "cp", "tucker2", "tn_rnn")


def _tednet() -> Any:
    """``tednet.tnn`` with the format subpackages it does not import itself."""
    for sub in _TEDNET_SUBMODULES:
        importlib.import_module(f"tednet.tnn.{sub}")
    return importlib.import_module("tednet.tnn")


_PEER_DISTS = {"tednet": "tednet", "tltorch": "tensorly-torch"}


@dataclass
class CaseSpec:
    """One thing to time. ``label`` is unique within a point; ``series`` joins points of a sweep.

    Attributes:
        label: row name in tables, e.g. ``"kcprnn kcp r=4 auto"``.
        series: curve name in sweep plots (the label without the swept value).
        impl: ``"kcprnn"``, ``"torch"``, ``"read"``, ``"tednet"`` or ``"tltorch"``.
        kind: one of :data:`CASE_KINDS` (``"rnn"``: a recurrent module over a sequence,
            ``"cell"``: one cell step, ``"gemm"``: the square product of the GEMM peak).
        format: our format name, ``"dense"``, or the peer's format (``"blocktt"``, ``"tk2"``...).
        in_modes, out_modes: the tensorization (flat lists; nested for KCP).
        rows: rows per call for linear/read cases (``seq_len * batch`` for LSTMs).
        options: implementation options (``rank``, ``blocks``, ``algorithm``, ...).
        seq_len, batch: recurrent input shape ``(seq_len, batch, in_features)`` (a cell step:
            ``(batch, in_features)``).
        matches: for peers, the label of our case whose parameter count they match.
    """

    label: str
    series: str
    impl: str
    kind: str
    format: str
    in_features: int
    out_features: int
    rows: int
    in_modes: list[Any] = field(default_factory=list)
    out_modes: list[Any] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 0
    batch: int = 0
    matches: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseSpec:
        return cls(**data)


def read_spec(in_features: int, out_features: int, rows: int) -> CaseSpec:
    """The yardstick case: reading the ``(rows, in_features)`` input once (``x.sum()``)."""
    return CaseSpec(
        label="input read x.sum()",
        series="input read x.sum()",
        impl="read",
        kind="read",
        format="read",
        in_features=in_features,
        out_features=out_features,
        rows=rows,
    )


@dataclass
class BuiltCase:
    """A built case: closures to time, and its counts."""

    forward: Callable[[], object]
    forward_backward: Callable[[], object] | None
    params: int
    params_total: int
    model_macs: int | None
    module: nn.Module | None
    input: Tensor


# --- peers ---


def peer_status() -> dict[str, dict[str, Any]]:
    """Whether each peer library imports, with its version or the import error."""
    status: dict[str, dict[str, Any]] = {}
    for lib, module in _PEER_MODULES.items():
        try:
            with _quiet():
                importlib.import_module(module)
        except Exception as err:  # noqa: BLE001  (any import failure means "absent")
            status[lib] = {"available": False, "error": f"{type(err).__name__}: {err}"}
            continue
        status[lib] = {"available": True, "version": importlib.metadata.version(_PEER_DISTS[lib])}
    return status


@contextlib.contextmanager
def _quiet():
    """Silence the peers' construction prints and warnings (tednet prints ratios, tltorch
    Tucker warns on every construction)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tt_params(in_modes: list[int], out_modes: list[int], r: int) -> int:
    ranks = [1] + [r] * (len(in_modes) - 1) + [1]
    return sum(
        ranks[d] * i * o * ranks[d + 1]
        for d, (i, o) in enumerate(zip(in_modes, out_modes, strict=True))
    )


def peer_num_params(
    lib: str, fmt: str, in_modes: list[int], out_modes: list[int], rank: int, blocks: int = 1
) -> int:
    """Weight parameters (bias excluded) of a peer layer, from its construction rules.

    tednet TR has one ring core per input and per output mode; tednet CP and all tltorch
    formats factor the ``2D``-mode tensor ``out_modes + in_modes``; tltorch caps Tucker ranks at
    the mode sizes and stores a CP weight vector.
    """
    modes = list(out_modes) + list(in_modes)
    merged = sum(i * o for i, o in zip(in_modes, out_modes, strict=True))
    if (lib, fmt) in {("tednet", "tt"), ("tltorch", "blocktt")}:
        return _tt_params(in_modes, out_modes, rank)
    if (lib, fmt) == ("tednet", "tr"):
        return rank * rank * sum(modes)
    if (lib, fmt) == ("tednet", "bt"):
        return blocks * (rank ** len(in_modes) + rank * merged)
    if (lib, fmt) == ("tednet", "cp"):
        return rank * sum(modes)
    if (lib, fmt) == ("tltorch", "cp"):
        return rank * (sum(modes) + 1)
    if (lib, fmt) == ("tltorch", "tucker"):
        capped = [min(rank, m) for m in modes]
        return math.prod(capped) + sum(m * c for m, c in zip(modes, capped, strict=True))
    raise ValueError(f"no parameter rule for peer {lib!r} format {fmt!r}")


def match_peer_rank(
    lib: str,
    fmt: str,
    in_modes: list[int],
    out_modes: list[int],
    target: int,
    *,
    blocks: int = 1,
    max_rank: int = 64,
    max_params: int = 4_000_000,
) -> int:
    """The peer rank whose parameter count is closest (in ratio) to ``target``.

    Ranks whose layer would exceed ``max_params`` are not considered (tltorch Tucker's core
    grows as ``rank**(2D)``); ties go to the smaller rank.
    """
    if target < 1:
        raise ValueError(f"target parameter count must be positive, got {target=}")
    best_rank, best_err = 1, math.inf
    for r in range(1, max_rank + 1):
        p = peer_num_params(lib, fmt, in_modes, out_modes, r, blocks)
        if p > max_params:
            break
        err = abs(math.log(p / target))
        if err < best_err - 1e-12:
            best_rank, best_err = r, err
    return best_rank


def _build_peer_linear(spec: CaseSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    r = int(spec.options["rank"])
    in_m, out_m = [int(m) for m in spec.in_modes], [int(m) for m in spec.out_modes]
    with _quiet():
        if spec.impl == "tednet":
            tnn = _tednet()
            if spec.format == "tt":
                layer = tnn.tensor_train.TTLinear(in_m, out_m, [r] * (len(in_m) - 1))
            elif spec.format == "tr":
                layer = tnn.tensor_ring.TRLinear(in_m, out_m, [r] * (len(in_m) + len(out_m)))
            elif spec.format == "bt":
                layer = tnn.bt_tucker.BTTLinear(
                    in_m, out_m, [r] * len(in_m), int(spec.options.get("blocks", 1))
                )
            elif spec.format == "cp":
                layer = tnn.cp.CPLinear(in_m, out_m, r)
            else:
                raise ValueError(f"unknown tednet linear format {spec.format!r}")
        elif spec.impl == "tltorch":
            tltorch = importlib.import_module("tltorch")
            layer = tltorch.FactorizedLinear(
                tuple(in_m),
                tuple(out_m),
                factorization=spec.format,
                rank=r,
                implementation="factorized",
            )
        else:
            raise ValueError(f"not a peer implementation: {spec.impl!r}")
    return layer.to(device=device, dtype=dtype)


def _build_peer_lstm(spec: CaseSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    tnn = _tednet()
    r = int(spec.options["rank"])
    in_m = [int(m) for m in spec.in_modes]
    hidden = [
        int(m) for m in spec.out_modes
    ]  # copied: tednet multiplies hidden_shape[0] by 4 in place
    drop = {"drop_ih": 0.0, "drop_hh": 0.0}  # tednet bakes in dropout; off for a like-for-like step
    with _quiet():
        if spec.format == "tt":
            model = tnn.tensor_train.TTLSTM(in_m, list(hidden), [r] * (len(in_m) - 1), **drop)
        elif spec.format == "tr":
            model = tnn.tensor_ring.TRLSTM(in_m, list(hidden), [r] * (2 * len(in_m)), **drop)
        elif spec.format == "bt":
            model = tnn.bt_tucker.BTTLSTM(
                in_m, list(hidden), [r] * len(in_m), int(spec.options.get("blocks", 1)), **drop
            )
        elif spec.format == "cp":
            model = tnn.cp.CPLSTM(in_m, list(hidden), r, **drop)
        elif spec.format == "tk2":
            tk2_in = [int(m) for m in spec.options["tk2_in_modes"]]
            model = tnn.tucker2.TK2LSTM(tk2_in, spec.out_features, [r, r], **drop)
        else:
            raise ValueError(f"unknown tednet LSTM format {spec.format!r}")
    return model.to(device=device, dtype=dtype)


# --- building ---


def _weight_params(module: nn.Module) -> int:
    return sum(
        p.numel() for n, p in module.named_parameters() if not n.split(".")[-1].startswith("bias")
    )


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of the matrix products ``fn`` runs (``FlopCounterMode`` / 2).

    Counts ``mm``/``bmm``/``addmm``/convolutions and what ``einsum``/``tensordot`` lower to,
    oneDNN's inner product (``mkldnn._linear_pointwise``, which ``kcprnn`` uses on CPU) and
    kcprnn's compiled kernels (:func:`kcprnn._cpu.native.counting_macs`); elementwise work
    (bias, sums, activations) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .._cpu import native as _native

    custom = {}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if onednn is not None:
        custom[onednn] = _linear_pointwise_flops
    with (
        FlopCounterMode(display=False, custom_mapping=custom) as counter,
        _native.counting_macs() as native,
    ):
        fn()
    return int(counter.get_total_flops()) // 2 + native[0]


def _linear_pointwise_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._linear_pointwise(input, weight, ...)``: ``2 * rows * in * out``."""
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * weight_shape[0]


def _zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def build_case(
    spec: CaseSpec, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> BuiltCase:
    """Build the module and input for ``spec`` and return closures that run it once.

    ``forward`` runs under ``torch.no_grad()`` in eval mode; ``forward_backward`` runs in
    training mode, sums the output and back-propagates to the parameters (the input does not
    require grad), clearing the previous gradients first.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    run: Callable[..., Tensor]
    if spec.kind == "read":
        x = torch.randn(spec.rows, spec.in_features, generator=gen, dtype=dtype).to(device)
        return BuiltCase(
            forward=lambda: x.sum(),
            forward_backward=None,
            params=0,
            params_total=0,
            model_macs=0,
            module=None,
            input=x,
        )
    if spec.kind == "linear":
        x = torch.randn(spec.rows, spec.in_features, generator=gen, dtype=dtype).to(device)
        model_macs: int | None = None
        if spec.impl == "kcprnn":
            from ..layers import FactorizedLinear

            options = dict(spec.options)
            layer = FactorizedLinear(
                spec.in_features,
                spec.out_features,
                format=spec.format,
                device=device,
                dtype=dtype,
                in_modes=spec.in_modes,
                out_modes=spec.out_modes,
                **options,
            )
            with torch.no_grad():  # the plan of the forward that is timed (inference, no_grad)
                model_macs = int(layer.macs(spec.rows, training=False))
            module: nn.Module = layer
        elif spec.impl == "torch":
            module = nn.Linear(spec.in_features, spec.out_features, device=device, dtype=dtype)
            model_macs = spec.rows * spec.in_features * spec.out_features
        else:
            module = _build_peer_linear(spec, device, dtype)

        def run(inp: Tensor = x, m: nn.Module = module) -> Tensor:
            return m(inp)

    elif spec.kind == "lstm":
        x = torch.randn(spec.seq_len, spec.batch, spec.in_features, generator=gen, dtype=dtype).to(
            device
        )
        model_macs = None
        if spec.impl == "kcprnn":
            from ..rnn import LSTM

            module = LSTM(
                spec.in_features,
                spec.out_features,
                format=spec.format,
                device=device,
                dtype=dtype,
                **spec.options,
            )

            def run(inp: Tensor = x, m: nn.Module = module) -> Tensor:
                return m(inp)[0]

        elif spec.impl == "torch":
            module = nn.LSTM(spec.in_features, spec.out_features, device=device, dtype=dtype)
            # the fused LSTM kernel is invisible to FlopCounterMode: count its gate products
            model_macs = (
                spec.seq_len
                * spec.batch
                * 4
                * spec.out_features
                * (spec.in_features + spec.out_features)
            )

            def run(inp: Tensor = x, m: nn.Module = module) -> Tensor:
                return m(inp)[0]

        else:
            module = _build_peer_lstm(spec, device, dtype)
            state_cls = importlib.import_module("tednet.tnn.tn_rnn").LSTMState
            zeros = torch.zeros(spec.batch, spec.out_features, device=device, dtype=dtype)

            def run(inp: Tensor = x, m: nn.Module = module) -> Tensor:
                return m(inp, state_cls(zeros, zeros))[0]

    elif spec.kind in ("rnn", "cell", "gemm"):
        from .rnn_cases import build_recurrent

        maybe_module, run, x, model_macs = build_recurrent(spec, device, dtype, gen)
        if maybe_module is None:  # the GEMM of the peak: forward only
            return BuiltCase(
                forward=run,
                forward_backward=None,
                params=0,
                params_total=0,
                model_macs=model_macs,
                module=None,
                input=x,
            )
        module = maybe_module
    else:
        raise ValueError(f"unknown case kind {spec.kind!r}; expected one of {sorted(CASE_KINDS)}")

    def forward() -> Tensor:
        module.eval()
        with torch.no_grad():
            return run()

    def forward_backward() -> None:
        module.train()
        _zero_grads(module)
        run().sum().backward()

    return BuiltCase(
        forward=forward,
        forward_backward=forward_backward,
        params=_weight_params(module),
        params_total=sum(p.numel() for p in module.parameters()),
        model_macs=model_macs,
        module=module,
        input=x,
    )
