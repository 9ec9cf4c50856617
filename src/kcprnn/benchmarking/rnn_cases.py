"""Recurrent benchmark cases: whole modules over a sequence (``kind="rnn"``), one cell step
(``kind="cell"``) and the float32 GEMM whose time gives a run's peak (``kind="gemm"``).

Options of ``"rnn"`` and ``"cell"`` specs (``CaseSpec.options``):

- ``mode``: ``"LSTM"``, ``"GRU"`` or ``"RNN"``;
- ``bidirectional``, ``num_layers`` (modules only);
- kcprnn only: ``rank`` (of ``W_ih``, per Kronecker factor for KCP; modes chosen by the
  library), ``hidden_format`` and ``hidden_rank`` (of ``W_hh``).

``CaseSpec.format`` is the input-to-hidden format (``"dense"`` for ``torch.nn``). Cases use the
public API only: ``torch.nn.LSTM``/``GRU``/``RNN`` and their cells, ``kcprnn``'s namesakes and
:func:`kcprnn.summary` for the layer's own MAC count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GATES", "build_recurrent", "torch_recurrent_macs"]

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
"""Gate blocks stacked on the rows of each mode's weight matrices."""

_TORCH_MODULES: dict[str, type[nn.Module]] = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
_TORCH_CELLS: dict[str, type[nn.Module]] = {
    "LSTM": nn.LSTMCell,
    "GRU": nn.GRUCell,
    "RNN": nn.RNNCell,
}


def _mode(options: dict[str, Any]) -> str:
    mode = options.get("mode")
    if mode not in GATES:
        raise ValueError(f"recurrent case mode must be one of {sorted(GATES)}, got {mode!r}")
    return str(mode)


def torch_recurrent_macs(
    mode: str,
    in_features: int,
    hidden: int,
    rows: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
) -> int:
    """Weight-product MACs of a dense recurrent forward over ``rows = T * batch`` rows:
    per layer and direction ``rows * G * hidden * (layer input + hidden)``.

    ``torch.nn``'s fused kernels are invisible to ``FlopCounterMode``, so the suite takes this
    formula for them (the backward adds two products of the same size per product)."""
    gates = GATES[mode]
    directions = 2 if bidirectional else 1
    total = 0
    for layer in range(num_layers):
        layer_in = in_features if layer == 0 else directions * hidden
        total += directions * rows * gates * hidden * (layer_in + hidden)
    return total


def _kcprnn_module(
    spec: Any, cell: bool, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, int]:
    import kcprnn

    opts = spec.options
    mode = _mode(opts)
    hidden_format = str(opts.get("hidden_format", "dense"))
    kwargs: dict[str, Any] = {"format": spec.format, "hidden_format": hidden_format}
    if spec.format != "dense":
        kwargs["rank"] = opts["rank"]
    if hidden_format != "dense":
        kwargs["hidden_options"] = {"rank": opts.get("hidden_rank", opts.get("rank"))}
    if cell:
        cls = getattr(kcprnn, f"{mode}Cell")
        module = cls(spec.in_features, spec.out_features, device=device, dtype=dtype, **kwargs)
        summ = kcprnn.summary(module, batch_size=spec.batch)
        return module, round(summ.macs_per_step)
    module = getattr(kcprnn, mode)(
        spec.in_features,
        spec.out_features,
        num_layers=int(opts.get("num_layers", 1)),
        bidirectional=bool(opts.get("bidirectional", False)),
        device=device,
        dtype=dtype,
        **kwargs,
    )
    summ = kcprnn.summary(module, batch_size=spec.batch, seq_len=spec.seq_len)
    return module, round(summ.macs_per_step * spec.seq_len)


def build_recurrent(
    spec: Any, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> tuple[nn.Module | None, Callable[[], Tensor], Tensor, int | None]:
    """``(module, run, input, model_macs)`` of a ``"rnn"``, ``"cell"`` or ``"gemm"`` spec.

    ``run`` returns the output whose sum is back-propagated. A cell step starts from a random
    state (batch ``spec.batch``), as a streaming step after the first does; a module starts
    from zeros, as ``torch.nn``'s do by default."""
    if spec.kind == "gemm":
        n = spec.in_features
        a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
        b = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
        return None, lambda: a @ b, a, n**3
    opts = spec.options
    mode = _mode(opts)
    cell = spec.kind == "cell"
    if spec.impl == "kcprnn":
        module, macs = _kcprnn_module(spec, cell, device, dtype)
    elif spec.impl == "torch":
        layers, bidirectional = int(opts.get("num_layers", 1)), bool(opts.get("bidirectional"))
        if cell:
            module = _TORCH_CELLS[mode](spec.in_features, spec.out_features, device=device)
        else:
            module = _TORCH_MODULES[mode](
                spec.in_features,
                spec.out_features,
                num_layers=layers,
                bidirectional=bidirectional,
                device=device,
            )
        module = module.to(dtype)
        macs = torch_recurrent_macs(
            mode,
            spec.in_features,
            spec.out_features,
            spec.rows,
            num_layers=1 if cell else layers,
            bidirectional=False if cell else bidirectional,
        )
    else:
        raise ValueError(f"no recurrent case for implementation {spec.impl!r}")
    if not cell:
        x = torch.randn(spec.seq_len, spec.batch, spec.in_features, generator=gen, dtype=dtype)
        x = x.to(device)

        def run_seq(inp: Tensor = x, m: nn.Module = module) -> Tensor:
            return m(inp)[0]

        return module, run_seq, x, macs
    x = torch.randn(spec.batch, spec.in_features, generator=gen, dtype=dtype).to(device)
    h = torch.randn(spec.batch, spec.out_features, generator=gen, dtype=dtype).to(device)
    if mode == "LSTM":
        c = torch.randn(spec.batch, spec.out_features, generator=gen, dtype=dtype).to(device)

        def run_lstm(inp: Tensor = x, m: nn.Module = module) -> Tensor:
            h1, c1 = m(inp, (h, c))
            return h1 + c1

        return module, run_lstm, x, macs

    def run_cell(inp: Tensor = x, m: nn.Module = module) -> Tensor:
        return m(inp, h)

    return module, run_cell, x, macs
