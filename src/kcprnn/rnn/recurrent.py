"""Multi-layer, optionally bidirectional LSTM, GRU and Elman RNN with compressed weights.

Drop-ins for ``torch.nn.LSTM``/``GRU``/``RNN``: same constructor arguments, same ``forward``
contract (padded batch-first or time-major input, unbatched input, ``PackedSequence``), plus
keyword options that choose the weight formats.

Speed by construction: in every layer and direction, the input-to-hidden product of all time steps
is ONE product over the ``B*T`` rows (the packed rows for a ``PackedSequence``), done before the
recurrence; the time loop (:func:`scan`) only does the hidden-to-hidden work.

Legend for shape comments: ``t`` time steps, ``b`` batch, ``n`` rows of all steps (``t*b`` or the
packed total), ``i`` input features, ``h`` hidden size, ``p`` output size (``proj_size`` or ``h``),
``g`` gate rows (``G*h``), ``k`` layers times directions.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..formats import make_matrix
from ..formats._base import resolve_dtype
from ..formats.dense import DenseMatrix
from .cells import (
    GRUCell,
    LSTMCell,
    MatrixFactory,
    RNNCell,
    State,
    _CellBase,
    _check_format,
    _check_modes,
    _check_nonlinearity,
    _check_size,
    _check_torch_kind,
    _from_dense_factory,
    fold_gates,
    gru_sequence,
    lstm_sequence,
)

__all__ = ["GRU", "LSTM", "RNN", "run_layer", "scan"]


def scan(
    step: Callable[[Tensor, State], State],
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """Run ``step`` over time on precomputed input projections, in packed layout.

    Args:
        step: ``(gates_x_t (b_t, g), state) -> state``; ``state[0]`` is the step's output.
        gates_x: input projections of all steps, time-major packed rows ``(n, g)``: the
            ``batch_sizes[0]`` rows of step 0, then the ``batch_sizes[1]`` rows of step 1, ...
        batch_sizes: non-increasing active batch sizes per step (all equal for padded input).
        state: initial state, tensors of ``batch_sizes[0]`` rows.
        reverse: run from the last step to the first (backward direction); each sequence then
            starts from its own last step.

    Returns:
        ``(outputs, final)``: ``state[0]`` of every step in the same packed layout ``(n, p)``,
        and the final state of every sequence (after its own last step), ``batch_sizes[0]`` rows.
    """
    outputs: list[Tensor] = []
    if not reverse:
        finished: list[State] = []
        offset = 0
        for b in batch_sizes:
            if b < state[0].shape[0]:  # the sequences at rows >= b have ended
                finished.append(tuple(s[b:] for s in state))
                state = tuple(s[:b] for s in state)  # (b, .)
            state = step(gates_x[offset : offset + b], state)  # (b, .)
            outputs.append(state[0])
            offset += b
        finished.append(state)
        final = tuple(
            torch.cat(parts[::-1], dim=0) for parts in zip(*finished, strict=True)
        )  # (b0, .)
        return torch.cat(outputs, dim=0), final  # (n, p)
    initial = state
    offset = gates_x.shape[0]
    state = tuple(s[: batch_sizes[-1]] for s in initial)
    for b in reversed(batch_sizes):
        have = state[0].shape[0]
        if b > have:  # sequences at rows have..b start here, from their initial state
            state = tuple(
                torch.cat([s, s0[have:b]], dim=0) for s, s0 in zip(state, initial, strict=True)
            )  # (b, .)
        offset -= b
        state = step(gates_x[offset : offset + b], state)  # (b, .)
        outputs.append(state[0])
    return torch.cat(outputs[::-1], dim=0), state  # (n, p)


def run_layer(
    cell: _CellBase,
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """One direction of one layer over precomputed input projections, as :func:`scan`.

    An LSTM layer (no projection) or GRU layer with a dense recurrent weight and sequences of
    equal length runs as :func:`~kcprnn.rnn.cells.lstm_sequence` /
    :func:`~kcprnn.rnn.cells.gru_sequence` (fused steps, a hand-written backward through time),
    except under ``torch.compile``; everything else steps through :func:`scan` with autograd.
    """
    fused = (
        isinstance(cell.weight_hh, DenseMatrix)
        and len(set(batch_sizes)) == 1
        and not torch.compiler.is_compiling()
    )  # compiled graphs fuse the steps themselves
    if fused and isinstance(cell, LSTMCell) and cell.weight_hr is None:
        out, h, c = lstm_sequence(
            gates_x, state[0], state[1], cell.weight_hh.weight, cell.bias_hh, reverse
        )
        return out, (h, c)  # (n, h)
    if fused and isinstance(cell, GRUCell):
        out, h = gru_sequence(gates_x, state[0], cell.weight_hh.weight, cell.bias_hh, reverse)
        return out, (h,)  # (n, h)
    return scan(cell.step, gates_x, batch_sizes, state, reverse=reverse)


def _check_batch_sizes(batch_sizes: Tensor, rows: int) -> list[int]:
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(
            f"PackedSequence batch_sizes must be a non-empty 1-D tensor, got shape "
            f"{tuple(batch_sizes.shape)}"
        )
    sizes = [int(b) for b in batch_sizes.tolist()]
    if any(b <= 0 for b in sizes) or any(a < b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(
            "PackedSequence batch_sizes must be positive and non-increasing (sequences sorted by "
            "decreasing length, as pack_padded_sequence(..., enforce_sorted=True) requires of "
            f"its lengths; pass enforce_sorted=False to sort them), got batch_sizes={sizes}"
        )
    if sum(sizes) != rows:
        raise ValueError(
            f"PackedSequence data has {rows} rows but its batch_sizes sum to {sum(sizes)}"
        )
    return sizes


class _RNNBase(nn.Module):
    """Shared implementation of :class:`LSTM`, :class:`GRU` and :class:`RNN`."""

    mode: ClassVar[str] = ""
    cell_class: ClassVar[type[_CellBase]] = _CellBase

    cells: nn.ModuleList

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        format: str = "kcp",
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        layer_options: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        _check_format(format, "format")
        _check_format(hidden_format, "hidden_format")
        factory_kwargs = {"device": device, "dtype": resolve_dtype(dtype)}

        def factories(layer: int, direction: int) -> MatrixFactory:
            def factory(kind: str, in_f: int, out_f: int, opts: dict[str, Any]):
                fmt = format if kind == "ih" else hidden_format
                return make_matrix(fmt, in_f, out_f, **factory_kwargs, **opts)

            return factory

        self._setup(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            nonlinearity,
            factories,
            factory_kwargs,
            hidden_modes,
            hidden_options,
            layer_options,
            options,
        )
        self.reset_parameters()

    def _setup(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        proj_size: int,
        nonlinearity: str,
        factories: Callable[[int, int], MatrixFactory],
        factory_kwargs: dict[str, Any],
        hidden_modes: Sequence[Any] | None,
        hidden_options: dict[str, Any] | None,
        layer_options: Sequence[dict[str, Any]] | None,
        options: dict[str, Any],
    ) -> None:
        _check_size(input_size, "input_size")
        _check_size(hidden_size, "hidden_size")
        _check_size(num_layers, "num_layers")
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                f"element being zeroed, got dropout={dropout!r}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        if proj_size and self.mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if layer_options is not None and (
            isinstance(layer_options, dict)
            or len(layer_options) != num_layers
            or not all(isinstance(o, dict) for o in layer_options)
        ):
            raise ValueError(
                f"layer_options must be a sequence of num_layers={num_layers} dicts, "
                f"got {layer_options!r}"
            )
        if hidden_modes is not None:
            hidden_modes = _check_modes(hidden_modes, hidden_size, "hidden_modes", "hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        if self.mode == "RNN":
            self.nonlinearity = _check_nonlinearity(nonlinearity)
        num_directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        cells = []
        for layer in range(num_layers):
            opts = dict(options)
            if layer > 0:
                # Deeper layers read the (concatenated) hidden outputs: in_modes from hidden_modes
                # (directions folded into the first mode), else the format's balanced default.
                opts.pop("in_modes", None)
                if hidden_modes is not None and not proj_size:
                    opts["in_modes"] = fold_gates(hidden_modes, num_directions)
            if layer_options is not None:
                opts.update(layer_options[layer])
            layer_in = input_size if layer == 0 else num_directions * out_size
            for direction in range(num_directions):
                cell = self.cell_class.__new__(self.cell_class)
                nn.Module.__init__(cell)
                cell._build(
                    layer_in,
                    hidden_size,
                    bias,
                    proj_size,
                    factories(layer, direction),
                    hidden_modes,
                    opts,
                    dict(hidden_options or {}),
                    factory_kwargs,
                )
                if self.mode == "RNN":
                    cell.nonlinearity = self.nonlinearity
                cells.append(cell)
        self.cells = nn.ModuleList(cells)

    # --- properties --------------------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def format(self) -> str:
        """Format of the input-to-hidden matrices."""
        return self.cells[0].format

    @property
    def hidden_format(self) -> str:
        """Format of the hidden-to-hidden matrices."""
        return self.cells[0].hidden_format

    def cell(self, layer: int, direction: int = 0) -> _CellBase:
        """The cell of ``layer`` and ``direction`` (0 forward, 1 reverse)."""
        return self.cells[layer * self.num_directions + direction]

    def reset_parameters(self) -> None:
        """``torch.nn``'s init, ``U(-1/sqrt(h), 1/sqrt(h))``, through each format's
        ``reset_parameters(std=1/sqrt(3h))``."""
        for cell in self.cells:
            cell.reset_parameters()

    def flatten_parameters(self) -> None:
        """Does nothing: kept for code written for ``torch.nn`` (no cuDNN flat weight buffer)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        s += f", format={self.format!r}"
        if self.hidden_format != "dense":
            s += f", hidden_format={self.hidden_format!r}"
        return s

    # --- forward -----------------------------------------------------------------------------

    def _state_sizes(self) -> tuple[int, ...]:
        return self.cells[0].state_sizes()

    def _check_hx(self, hx: State, batch: int, batched: bool) -> State:
        k = self.num_layers * self.num_directions
        out = []
        for idx, (t, size) in enumerate(zip(hx, self._state_sizes(), strict=True)):
            name = "hx" if len(hx) == 1 else ("h_0", "c_0")[idx]
            want_dim = 3 if batched else 2
            if t.dim() != want_dim:
                raise ValueError(
                    f"{self.mode}: for {'batched 3-D' if batched else 'unbatched 2-D'} input, "
                    f"{name} should also be {want_dim}-D but got a {t.dim()}-D tensor"
                )
            t = t if batched else t.unsqueeze(1)  # (k, b, s)
            if t.shape != (k, batch, size):
                want = (k, batch, size) if batched else (k, size)
                got = tuple(t.shape) if batched else (t.shape[0], t.shape[2])
                raise ValueError(f"{self.mode}: Expected {name} of size {want}, got {got}")
            out.append(t)
        return tuple(out)

    def _forward(self, input: Tensor | PackedSequence, hx: State | None):
        mode = self.mode
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"{mode}: PackedSequence data must be 2-D, got {data.dim()}-D")
            sizes = _check_batch_sizes(batch_sizes_t, data.shape[0])
            batch, batched = sizes[0], True
            x = data  # (n, i)
        else:
            if not isinstance(input, Tensor):
                raise TypeError(
                    f"{mode}: input must be a Tensor or a PackedSequence, "
                    f"got {type(input).__name__}"
                )
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{mode}: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(0 if self.batch_first else 1)  # 3-D
            batch_dim, time_dim = (0, 1) if self.batch_first else (1, 0)
            batch, steps = x.shape[batch_dim], x.shape[time_dim]
            if steps == 0:
                raise ValueError(
                    f"{mode}: Expected sequence length to be larger than 0, got input of shape "
                    f"{tuple(input.shape)}"
                )
            sizes = [batch] * steps
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{mode}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.shape[-1]}"
            )
        k = self.num_layers * self.num_directions
        if hx is None:
            hx = tuple(x.new_zeros(k, batch, s) for s in self._state_sizes())  # (k, b, s)
        else:
            hx = self._check_hx(hx, batch, batched)
            if packed and sorted_indices is not None:
                hx = tuple(t.index_select(1, sorted_indices) for t in hx)  # (k, b, s)

        finals: list[State] = []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                cell = self.cells[idx]
                gates_x = cell.input_projection(layer_input)  # (n, g) or 3-D
                if layer == 0 and not packed:
                    if self.batch_first:
                        gates_x = gates_x.transpose(0, 1)  # (t, b, g)
                    gates_x = gates_x.reshape(-1, gates_x.shape[-1])  # (n, g)
                state = tuple(t[idx] for t in hx)  # (b, s)
                out, final = run_layer(cell, gates_x, sizes, state, reverse=direction == 1)
                outs.append(out)  # (n, p)
                finals.append(final)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (n, d*p)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)  # (n, d*p)
        h_n = tuple(torch.stack(p, dim=0) for p in zip(*finals, strict=True))  # (k, b, s)

        if packed:
            if unsorted_indices is not None:
                h_n = tuple(t.index_select(1, unsorted_indices) for t in h_n)  # (k, b, s)
            output = PackedSequence(layer_input, batch_sizes_t, sorted_indices, unsorted_indices)
            return output, h_n
        output = layer_input.reshape(len(sizes), batch, layer_input.shape[-1])  # (t, b, d*p)
        if self.batch_first:
            output = output.transpose(0, 1)  # (b, t, d*p)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)  # (t, d*p)
            h_n = tuple(t.squeeze(1) for t in h_n)  # (k, s)
        return output, h_n

    # --- conversion --------------------------------------------------------------------------

    @classmethod
    def from_torch(
        cls,
        module: nn.Module,
        format: str = "kcp",
        *,
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        layer_options: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> _RNNBase:
        """Compress a trained ``torch.nn`` module of the same kind.

        Every input-to-hidden weight goes through ``FORMATS[format].from_dense(weight,
        **layer's options)`` (exact for ``"dense"``; a format without a decomposition raises
        ``NotImplementedError`` naming it); hidden-to-hidden (and projection) weights through
        ``FORMATS[hidden_format].from_dense`` (an exact copy by default); both biases ``b_ih``
        and ``b_hh`` are copied. Options apply per layer as in the constructor.
        """
        _check_format(format, "format")
        _check_format(hidden_format, "hidden_format")
        _check_torch_kind(cls, module)
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        ref = module.weight_ih_l0

        def factories(layer: int, direction: int) -> MatrixFactory:
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            weights = {
                "ih": getattr(module, "weight_ih" + sfx),
                "hh": getattr(module, "weight_hh" + sfx),
            }
            if getattr(module, "proj_size", 0):
                weights["hr"] = getattr(module, "weight_hr" + sfx)
            return _from_dense_factory(weights, format, hidden_format)

        out._setup(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            module.bias,
            module.batch_first,
            module.dropout,
            module.bidirectional,
            getattr(module, "proj_size", 0),
            getattr(module, "nonlinearity", "tanh"),
            factories,
            {"device": ref.device, "dtype": ref.dtype},
            hidden_modes,
            hidden_options,
            layer_options,
            options,
        )
        if module.bias:
            with torch.no_grad():
                for layer in range(module.num_layers):
                    for direction in range(out.num_directions):
                        sfx = f"_l{layer}" + ("_reverse" if direction else "")
                        cell = out.cell(layer, direction)
                        cell.bias_ih.copy_(getattr(module, "bias_ih" + sfx))
                        cell.bias_hh.copy_(getattr(module, "bias_hh" + sfx))
        out.train(module.training)
        return out


_ARGS_DOC = r"""
    Args:
        input_size: the number of expected features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        num_layers: number of stacked recurrent layers. Default: 1.
        {extra_args}bias: if ``False``, no ``b_ih`` and ``b_hh``. Default: ``True``.
        batch_first: if ``True``, input and output are ``(batch, seq, feature)`` instead of
            ``(seq, batch, feature)``; not applied to hidden states. Default: ``False``.
        dropout: if non-zero, dropout with this probability on the outputs of every layer but
            the last. Default: 0.
        bidirectional: if ``True``, a bidirectional network. Default: ``False``.
        {proj_arg}device, dtype: factory arguments, as in ``torch.nn``.
        format: format of every input-to-hidden matrix ``W_ih`` (``G*hidden_size x
            layer input``), a key of :data:`kcprnn.FORMATS`. Default: ``"kcp"``.
        hidden_format: format of every hidden-to-hidden matrix ``W_hh`` (and ``W_hr``).
            Default: ``"dense"``, as in the papers' baselines.
        hidden_modes: modes of ``hidden_size`` (flat, or nested for Kronecker-factored formats).
            The ``G`` gates are folded into the first output mode, ``J_1 <- G*J_1``
            (``[4,4,4,4] -> [16,4,4,4]`` for an LSTM; nested modes: into the first Kronecker
            factor of the first mode), to give ``out_modes`` of every ``W_ih`` unless
            ``out_modes`` is given. Flat ``hidden_modes`` also tensorize ``W_hh``
            (``in_modes=hidden_modes``, ``out_modes`` folded), except with ``proj_size``.
        hidden_options: options of ``hidden_format`` for ``W_hh`` and ``W_hr`` (``rank``,
            ``num_modes``, ...); they win over what ``hidden_modes`` derives.
        layer_options: optional list of ``num_layers`` dicts, merged over ``**options`` for
            each layer's ``W_ih`` (the last word on any per-layer choice).
        **options: options of ``format`` (``in_modes``, ``out_modes``, ``rank``, ...).

    How options apply to layers: ``**options`` go to every layer's ``W_ih``, both directions,
    except ``in_modes``, which describe ``input_size`` and so apply to layer 0 only. Layers > 0
    read ``num_directions * (proj_size or hidden_size)`` features: their ``in_modes`` are
    ``hidden_modes`` with the directions folded into the first mode (``[2*4,4,4,4]`` when
    bidirectional; not with ``proj_size``), or the format's balanced default when
    ``hidden_modes`` is not given. An explicit ``out_modes`` (the full ``G*hidden_size`` gate
    output, flat or nested) is passed through to every layer.
"""

_IO_DOC = r"""
    Inputs: input, {hx_in}
        - **input**: ``(L, H_in)`` unbatched, ``(L, N, H_in)`` or, with ``batch_first=True``,
          ``(N, L, H_in)``; or a :class:`~torch.nn.utils.rnn.PackedSequence` of variable-length
          sequences.
        {hx_doc}

    Outputs: output, {hx_out}
        - **output**: ``(L, D*H_out)`` unbatched, ``(L, N, D*H_out)`` or ``(N, L, D*H_out)``:
          the last layer's ``h_t`` for every ``t``; a ``PackedSequence`` for packed input.
        {hn_doc}

    Shape:
        ``N`` batch, ``L`` sequence length, ``D`` 2 if bidirectional else 1, ``H_in``
        ``input_size``, ``H_out`` {h_out}.
"""


class LSTM(_RNNBase):
    __doc__ = (
        r"""A multi-layer LSTM with compressed weights; drop-in for ``torch.nn.LSTM``.

    Each layer computes, for every step, the gates ``(i, f, g, o)`` of :class:`LSTMCell`;
    the input-to-hidden products of all steps are done at once before the recurrence.
"""
        + _ARGS_DOC.format(
            extra_args="",
            proj_arg="proj_size: if ``> 0``, an LSTM with projections of this size. Default: 0.\n"
            "        ",
        )
        + _IO_DOC.format(
            hx_in="(h_0, c_0)",
            hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
            "**c_0**: the same with ``hidden_size``; zeros if omitted.",
            hx_out="(h_n, c_n)",
            hn_doc="- **h_n**, **c_n**: final hidden and cell states of every layer and "
            "direction, shaped as ``h_0`` and ``c_0``.",
            h_out="``proj_size`` if ``> 0`` else ``hidden_size``",
        )
        + r"""
    Attributes:
        cells: ``num_layers * D`` :class:`LSTMCell` (``proj_size`` set), index
            ``layer * D + direction``; ``cell(layer, direction)`` returns one.

    Examples::

        >>> rnn = LSTM(10, 20, 2, format="dense")
        >>> output, (h_n, c_n) = rnn(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
"""
    )

    mode = "LSTM"
    cell_class = LSTMCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            "tanh",
            device,
            dtype,
            **options,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        output, (h_n, c_n) = self._forward(input, None if hx is None else tuple(hx))
        return output, (h_n, c_n)


class GRU(_RNNBase):
    __doc__ = (
        r"""A multi-layer GRU with compressed weights; drop-in for ``torch.nn.GRU``.

    Each layer computes, for every step, the gates ``(r, z, n)`` of :class:`GRUCell`
    (``b_hn`` inside the reset gate, as in ``torch.nn``); the input-to-hidden products of all
    steps are done at once before the recurrence.
"""
        + _ARGS_DOC.format(extra_args="", proj_arg="")
        + _IO_DOC.format(
            hx_in="h_0",
            hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
            "zeros if omitted.",
            hx_out="h_n",
            hn_doc="- **h_n**: final hidden state of every layer and direction, shaped as h_0.",
            h_out="``hidden_size``",
        )
        + r"""
    Examples::

        >>> rnn = GRU(10, 20, 2, format="dense")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> h_n.shape
        torch.Size([2, 3, 20])
"""
    )

    mode = "GRU"
    cell_class = GRUCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        proj_size = options.pop("proj_size", 0)  # refused by the base with torch's message
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            "tanh",
            device,
            dtype,
            **options,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return output, h_n


class RNN(_RNNBase):
    __doc__ = (
        r"""A multi-layer Elman RNN (``tanh`` or ``relu``) with compressed weights; drop-in for
    ``torch.nn.RNN``: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.
"""
        + _ARGS_DOC.format(
            extra_args="nonlinearity: ``'tanh'`` or ``'relu'``. Default: ``'tanh'``.\n        ",
            proj_arg="",
        )
        + _IO_DOC.format(
            hx_in="h_0",
            hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
            "zeros if omitted.",
            hx_out="h_n",
            hn_doc="- **h_n**: final hidden state of every layer and direction, shaped as h_0.",
            h_out="``hidden_size``",
        )
        + r"""
    Examples::

        >>> rnn = RNN(10, 20, 2, nonlinearity="relu", format="dense")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> output.shape
        torch.Size([5, 3, 20])
"""
    )

    mode = "RNN"
    cell_class = RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        proj_size = options.pop("proj_size", 0)  # refused by the base with torch's message
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            nonlinearity,
            device,
            dtype,
            **options,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return output, h_n
