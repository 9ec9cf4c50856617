"""Parameter, compression and multiply-accumulate counts of models holding compressed RNNs.

:func:`summary` returns a :class:`ModelSummary` (a dataclass whose ``str`` is a table); it prints
nothing. Counts come from each :class:`~kcprnn.FactorizedMatrix`'s ``num_params``, ``in_features
* out_features`` and ``flops(rows)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..formats import FactorizedMatrix
from .cells import RNNCellBase
from .recurrent import RNNBase

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclass(frozen=True)
class LayerSummary:
    """Counts of one recurrent layer and direction (one cell).

    Attributes:
        name: module path, with torch's layer suffix (``"lstm.l0"``, ``"lstm.l1_reverse"``).
        kind: ``"LSTM"``, ``"GRU"`` or ``"RNN"``.
        format: format of the input-to-hidden matrix ``W_ih``.
        hidden_format: format of the hidden-to-hidden matrix ``W_hh``.
        input_shape: ``(out_features, in_features)`` of ``W_ih``.
        input_params: parameters of ``W_ih``.
        input_dense_params: entries of the dense ``W_ih``.
        hidden_params: parameters of ``W_hh`` (and of the projection ``W_hr``).
        hidden_dense_params: entries of the dense ``W_hh`` (and ``W_hr``).
        bias_params: ``b_ih`` and ``b_hh`` entries.
        macs_per_step: multiply-accumulates of the weight products per time step for the
            summary's ``batch_size``: ``W_ih.flops(batch_size*seq_len)/seq_len`` (the input
            product of all steps is one product) ``+ W_hh.flops(batch_size)`` (+ ``W_hr``);
            gate nonlinearities and bias adds are not counted.
    """

    name: str
    kind: str
    format: str
    hidden_format: str
    input_shape: tuple[int, int]
    input_params: int
    input_dense_params: int
    hidden_params: int
    hidden_dense_params: int
    bias_params: int
    macs_per_step: float

    @property
    def params(self) -> int:
        return self.input_params + self.hidden_params + self.bias_params

    @property
    def dense_params(self) -> int:
        return self.input_dense_params + self.hidden_dense_params + self.bias_params

    @property
    def input_compression(self) -> float:
        """Dense entries of ``W_ih`` per stored parameter (the papers' convention)."""
        return self.input_dense_params / self.input_params

    @property
    def compression(self) -> float:
        """Dense parameters of the whole layer per stored parameter."""
        return self.dense_params / self.params


@dataclass(frozen=True)
class ModelSummary:
    """Counts of a model: its recurrent layers and its totals.

    Attributes:
        layers: one :class:`LayerSummary` per recurrent layer and direction.
        params: all parameters of the model (recurrent or not).
        dense_params: the same model with every factorized matrix stored dense.
        batch_size, seq_len: the sizes the MAC counts are for.
    """

    layers: list[LayerSummary] = field(default_factory=list)
    params: int = 0
    dense_params: int = 0
    batch_size: int = 1
    seq_len: int = 1

    @property
    def input_params(self) -> int:
        return sum(s.input_params for s in self.layers)

    @property
    def input_dense_params(self) -> int:
        return sum(s.input_dense_params for s in self.layers)

    @property
    def input_compression(self) -> float:
        """Compression of all input-to-hidden matrices together (the papers' convention)."""
        return self.input_dense_params / self.input_params

    @property
    def compression(self) -> float:
        """Compression of the whole model: dense parameters per stored parameter."""
        return self.dense_params / self.params

    @property
    def macs_per_step(self) -> float:
        """Recurrent weight-product MACs per time step, all layers."""
        return sum(s.macs_per_step for s in self.layers)

    def __str__(self) -> str:
        head = (
            "layer",
            "kind",
            "W_ih format",
            "W_ih shape",
            "W_ih params",
            "W_ih ratio",
            "W_hh params",
            "bias",
            "params",
            "MACs/step",
        )
        rows = [
            (
                s.name,
                s.kind,
                s.format,
                f"{s.input_shape[0]} x {s.input_shape[1]}",
                f"{s.input_params:,}",
                f"{s.input_compression:,.1f}x",
                f"{s.hidden_params:,}",
                f"{s.bias_params:,}",
                f"{s.params:,}",
                f"{s.macs_per_step:,.0f}",
            )
            for s in self.layers
        ]
        if self.layers:
            rows.append(
                (
                    "recurrent total",
                    "",
                    "",
                    "",
                    f"{self.input_params:,}",
                    f"{self.input_compression:,.1f}x",
                    f"{sum(s.hidden_params for s in self.layers):,}",
                    f"{sum(s.bias_params for s in self.layers):,}",
                    f"{sum(s.params for s in self.layers):,}",
                    f"{self.macs_per_step:,.0f}",
                )
            )
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        lines = [
            "  ".join(
                v.ljust(w) if c < 4 else v.rjust(w)
                for c, (v, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        ratio = f"{self.compression:,.1f}x" if self.params else "n/a"
        lines.append(
            f"model: {self.params:,} parameters ({self.dense_params:,} dense), compression "
            f"{ratio}; MACs for batch_size={self.batch_size}, seq_len={self.seq_len}"
        )
        return "\n".join(lines)


def _layer_summary(
    name: str, kind: str, cell: RNNCellBase, batch_size: int, seq_len: int
) -> LayerSummary:
    mats = cell.matrices()
    ih = mats.pop("ih")
    hidden = list(mats.values())
    bias = sum(b.numel() for b in (cell.bias_ih, cell.bias_hh) if b is not None)
    macs = ih.flops(batch_size * seq_len) / seq_len + sum(m.flops(batch_size) for m in hidden)
    return LayerSummary(
        name=name,
        kind=kind,
        format=ih.format_name,
        hidden_format=cell.hidden_format,
        input_shape=(ih.out_features, ih.in_features),
        input_params=ih.num_params,
        input_dense_params=ih.in_features * ih.out_features,
        hidden_params=sum(m.num_params for m in hidden),
        hidden_dense_params=sum(m.in_features * m.out_features for m in hidden),
        bias_params=bias,
        macs_per_step=macs,
    )


def summary(model: nn.Module, batch_size: int = 1, seq_len: int = 1) -> ModelSummary:
    """Count the parameters, compression ratios and MACs of ``model``.

    Every :class:`~kcprnn.LSTM`/``GRU``/``RNN`` and every stand-alone cell inside ``model``
    (or ``model`` itself) gives rows; the totals cover all of ``model``'s parameters, with each
    factorized matrix's dense size (``in_features * out_features``) for ``dense_params``.

    Args:
        model: any module.
        batch_size: sequences per batch for the MAC counts. Default: 1.
        seq_len: time steps sharing one input-to-hidden product. Default: 1.

    Returns:
        A :class:`ModelSummary`; ``str()`` of it is a table.
    """
    for value, name in ((batch_size, "batch_size"), (seq_len, "seq_len")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    layers: list[LayerSummary] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, RNNBase):
            for layer in range(module.num_layers):
                for direction in range(module.num_directions):
                    cell = module.cell(layer, direction)
                    seen.add(id(cell))
                    name = f"{prefix}l{layer}" + ("_reverse" if direction else "")
                    layers.append(_layer_summary(name, module.mode, cell, batch_size, seq_len))
        elif isinstance(module, RNNCellBase) and id(module) not in seen:
            kind = module.mode
            layers.append(_layer_summary(path or kind, kind, module, batch_size, seq_len))
    params = sum(p.numel() for p in model.parameters())
    matrices = [m for m in model.modules() if isinstance(m, FactorizedMatrix)]
    dense = (
        params
        - sum(m.num_params for m in matrices)
        + sum(m.in_features * m.out_features for m in matrices)
    )
    return ModelSummary(
        layers=layers, params=params, dense_params=dense, batch_size=batch_size, seq_len=seq_len
    )
