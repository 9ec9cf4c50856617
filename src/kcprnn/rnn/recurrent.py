"""Multi-layer, optionally bidirectional LSTM, GRU and Elman RNN with compressed weights.

Drop-ins for ``torch.nn.LSTM``/``GRU``/``RNN``: same constructor arguments, same ``forward``
contract (padded batch-first or time-major input, unbatched input, ``PackedSequence``), plus
keyword options that choose the weight formats.

Speed by construction: in every layer and direction, the input-to-hidden product of all time steps
is ONE product over the ``B*T`` rows (the packed rows for a ``PackedSequence``), done before the
recurrence; the time loop (:func:`~kcprnn.rnn.scan`) only does the hidden-to-hidden work.

Legend for shape comments: ``t`` time steps, ``b`` batch, ``n`` rows of all steps (``t*b`` or the
packed total), ``i`` input features, ``h`` hidden size, ``p`` output size (``proj_size`` or ``h``),
``g`` gate rows (``G*h``), ``k`` layers times directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .._compile import compiled_route
from .._compile_layer import compiled_layer, fuses_layer
from .._compile_module import compiled_module, walks_every_layer
from ._docs import GRU_DOC, LSTM_DOC, RNN_DOC
from ._options import check_arguments, check_input_dtype, check_torch_module, fold_gates
from .cells import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .fused import input_projection
from .layer import check_batch_sizes, run_layer, scan, torch_layer
from .plan import ROUTES, LayerPlan, dense_weight, plan_layer
from .steps import State

__all__ = ["GRU", "LSTM", "RNN", "RNNBase", "run_layer", "scan"]

_Module = TypeVar("_Module", bound="RNNBase")


class RNNBase(nn.Module):
    """Shared implementation of :class:`LSTM`, :class:`GRU` and :class:`RNN`.

    Subclasses set :attr:`mode` (``"LSTM"``, ``"GRU"`` or ``"RNN"``), :attr:`cell_class` (the
    cell of one layer and direction) and :attr:`torch_class`, the ``torch.nn`` module that
    :meth:`from_torch` converts (subclasses of the three modules inherit all three).
    """

    mode: ClassVar[str] = ""
    cell_class: ClassVar[type[RNNCellBase]] = RNNCellBase
    torch_class: ClassVar[type[nn.RNNBase]] = nn.RNNBase

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
        format: str = "kcp",
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        layer_options: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        modes = check_arguments(
            self.mode,
            input_size,
            hidden_size,
            bias=bias,
            proj_size=proj_size,
            nonlinearity=nonlinearity,
            format=format,
            hidden_format=hidden_format,
            hidden_modes=hidden_modes,
            cell=False,
            num_layers=num_layers,
            dropout=dropout,
            layer_options=layer_options,
        )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        if self.mode == "RNN":
            self.nonlinearity = nonlinearity
        num_directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        cells = []
        for layer in range(num_layers):
            opts = dict(options)
            if layer > 0:
                # Deeper layers read the (concatenated) hidden outputs: in_modes from hidden_modes
                # (directions folded into the first mode), else the format's balanced default.
                opts.pop("in_modes", None)
                if modes is not None and not proj_size:
                    opts["in_modes"] = fold_gates(modes, num_directions)
            if layer_options is not None:
                opts.update(layer_options[layer])
            layer_in = input_size if layer == 0 else num_directions * out_size
            for _ in range(num_directions):
                cell = self.cell_class(
                    layer_in,
                    hidden_size,
                    bias,
                    device=device,
                    dtype=dtype,
                    proj_size=proj_size,
                    nonlinearity=nonlinearity,
                    format=format,
                    hidden_format=hidden_format,
                    hidden_modes=modes,
                    hidden_options=hidden_options,
                    **opts,
                )
                cells.append(cell)
        self.cells = nn.ModuleList(cells)
        self.recurrence = "auto"
        # every layer's plan per input shape (kcprnn.rnn.plan.plan_layer); plans read shapes,
        # formats, algorithms, cost models, dtypes and devices, never parameter values
        self._plans: dict[tuple[Any, ...], LayerPlan] = {}

    # --- properties --------------------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def recurrence(self) -> str:
        """How each layer runs over time; settable. ``"auto"`` (default): the cheapest route by
        the cost model, per layer; ``"torch"``: the weights rebuilt dense and torch's own fused
        recurrence; ``"dense"``: the input product in its format, then kcprnn's fused loop with
        ``W_hh`` dense; ``"structured"``: the same with a KCP or CP ``W_hh`` multiplied as a
        Kronecker sum at every step; ``"steps"``: one cell step at a time under autograd (see
        :mod:`kcprnn.rnn.plan`). A fused route that cannot run (sequences of different
        lengths, an LSTM projection) runs ``"torch"``."""
        return self._recurrence

    @recurrence.setter
    def recurrence(self, value: str) -> None:
        if value not in ROUTES:
            raise ValueError(f"recurrence must be one of {list(ROUTES)}, got recurrence={value!r}")
        self._recurrence = value

    @property
    def format(self) -> str:
        """Format of the input-to-hidden matrices."""
        return self.cell(0).format

    @property
    def hidden_format(self) -> str:
        """Format of the hidden-to-hidden matrices."""
        return self.cell(0).hidden_format

    def cell(self, layer: int, direction: int = 0) -> RNNCellBase:
        """The cell of ``layer`` and ``direction`` (0 forward, 1 reverse)."""
        index = layer * self.num_directions + direction
        found = self._modules["cells"]._modules.get(str(index))  # type: ignore[union-attr]
        # the ModuleList's own indexing (negative indices, its IndexError) where that misses
        return cast(RNNCellBase, found if found is not None else self.cells[index])

    def reset_parameters(self) -> None:
        """``torch.nn``'s init, ``U(-1/sqrt(h), 1/sqrt(h))``, through each format's
        ``reset_parameters(std=1/sqrt(3h))``."""
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                self.cell(layer, direction).reset_parameters()

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
        return self.cell(0).state_sizes()

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

    def _forward(
        self, input: Tensor | PackedSequence, hx: State | None
    ) -> tuple[Tensor | PackedSequence, State]:
        mode = self.mode
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise ValueError(f"{mode}: PackedSequence data must be 2-D, got {data.dim()}-D")
            sizes = check_batch_sizes(batch_sizes_t, data.shape[0])
            steps = len(sizes)
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
            # torch.export: one entry stands for every step, so that the length stays symbolic
            # (run_layer scans the time axis of the equal-length rows)
            sizes = [batch] if torch.compiler.is_exporting() else [batch] * steps
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{mode}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {x.shape[-1]}"
            )
        check_input_dtype(mode, x, self)
        k = self.num_layers * self.num_directions
        zero_state = hx is None
        given = hx
        if hx is None:
            hx = tuple(x.new_zeros(k, batch, s) for s in self._state_sizes())  # (k, b, s)
        else:
            hx = self._check_hx(hx, batch, batched)
            if packed and sorted_indices is not None:
                hx = tuple(t.index_select(1, sorted_indices) for t in hx)  # (k, b, s)

        finals: list[State] = []
        layer_input = x
        rows = x.shape[0] if packed else batch * steps
        equal = len(set(sizes)) == 1
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if (
            torch.compiler.is_compiling()
            and not torch.compiler.is_exporting()
            and not packed
            and not walks_every_layer(self, batch, steps, training)
        ):  # one opaque node running this forward eagerly (kcprnn._compile_module)
            assert not isinstance(input, PackedSequence)
            return compiled_module(self, input, given)
        for layer in range(self.num_layers):
            d = self.num_directions
            cells = [self.cell(layer, direction) for direction in range(d)]
            compiling = torch.compiler.is_compiling()
            if compiling:  # no cost model in a traced graph (kcprnn._compile)
                route, dense_inputs = compiled_route(cells, equal), (False,) * d
            else:
                plans = self.__dict__.setdefault("_plans", {})
                found = plan_layer(self.recurrence, cells, rows, steps, equal, training, plans)
                route, dense_inputs = found.route, found.dense_inputs
            if route == "torch":
                if layer == 0 and not packed:
                    seq = x.transpose(0, 1) if self.batch_first else x  # (t, b, i)
                elif packed:
                    seq = layer_input  # (n, f)
                else:
                    seq = layer_input.view(steps, batch, -1)  # (t, b, f)
                states = tuple(t[layer * d : (layer + 1) * d] for t in hx)  # (d, b, s)
                out, final = torch_layer(cells, seq, batch_sizes_t if packed else None, states)
                layer_input = out.reshape(rows, out.shape[-1])  # (n, d*p)
                finals.extend(tuple(t[k] for t in final) for k in range(d))
            else:
                outs = []
                # a batch-first input narrower than the gates is put in time order before the
                # input product (one copy of the input, shared by the directions) instead of
                # its gates after it (one copy of the gates per direction)
                time_major_x: Tensor | None = None
                for direction, cell in enumerate(cells):
                    idx = layer * d + direction
                    # the fused LSTM and Elman loops add b_ih + b_hh as they read each step's
                    # input projections, made without a bias (a product with one first copies
                    # it into every row); traced, b_hh is folded into the input product
                    b_ih, b_hh = cell.bias_ih, cell.bias_hh
                    fold = route in ("dense", "structured") and cell.mode != "GRU"
                    fold = fold and b_ih is not None and b_hh is not None
                    bias = b_ih + b_hh if fold and b_ih is not None and b_hh is not None else b_ih
                    loop_bias = None
                    if fold and not (compiling or torch.compiler.is_exporting()):
                        loop_bias, bias, fold = bias, None, False
                    if compiling and fuses_layer(cell, route):  # one opaque node
                        state = tuple(t[idx] for t in hx)  # (b, s)
                        first = layer == 0 and not packed and self.batch_first
                        out, final = compiled_layer(
                            cell,
                            layer_input,
                            bias,
                            state,
                            direction == 1,
                            first,
                            bool(fold),
                            zero_state,
                        )
                        outs.append(out)  # (n, p)
                        finals.append(final)
                        continue
                    rows_in = layer_input
                    reorder = layer == 0 and not packed and self.batch_first
                    if reorder and x.shape[-1] < cell.weight_ih.out_features:
                        if time_major_x is None:
                            time_major_x = x.transpose(0, 1).contiguous()  # (t, b, i)
                        rows_in, reorder = time_major_x, False
                    dense_ih = cell.weight_ih.format_name == "dense" and not compiling
                    if dense_inputs[direction] or dense_ih:
                        # (g, i), once per call; kept between calls without gradients
                        w_ih = cell._kept_weight("dense_ih", dense_weight, cell.weight_ih)
                        gates_x = input_projection(rows_in, w_ih, bias)  # (n, g) or 3-D
                    else:
                        gates_x = cell.weight_ih(rows_in, bias)  # (n, g) or 3-D
                    if layer == 0 and not packed:
                        if reorder:
                            gates_x = gates_x.transpose(0, 1)  # (t, b, g)
                        gates_x = gates_x.reshape(-1, gates_x.shape[-1])  # (n, g)
                    state = tuple(t[idx] for t in hx)  # (b, s)
                    out, final = run_layer(
                        cell, gates_x, sizes, state, direction == 1, route, bool(fold), loop_bias
                    )
                    outs.append(out)  # (n, p)
                    finals.append(final)
                layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (n, d*p)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)  # (n, d*p)
        h_n = tuple(torch.stack(p, dim=0) for p in zip(*finals, strict=True))  # (k, b, s)

        if packed:
            if unsorted_indices is not None:
                h_n = tuple(t.index_select(1, unsorted_indices) for t in h_n)  # (k, b, s)
            return PackedSequence(layer_input, batch_sizes_t, sorted_indices, unsorted_indices), h_n
        output = layer_input.reshape(steps, batch, layer_input.shape[-1])  # (t, b, d*p)
        if self.batch_first:
            output = output.transpose(0, 1)  # (b, t, d*p)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)  # (t, d*p)
            h_n = tuple(t.squeeze(1) for t in h_n)  # (k, s)
        return output, h_n

    @classmethod
    def from_torch(
        cls: type[_Module],
        module: nn.RNNBase,
        format: str = "kcp",
        *,
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        layer_options: Sequence[dict[str, Any]] | None = None,
        **options: Any,
    ) -> _Module:
        """Compress a trained ``torch.nn`` module of the same kind (:attr:`torch_class`).

        The module is constructed with ``module``'s settings and the given formats and options
        (which apply per layer as in the constructor), then every cell takes its layer and
        direction's weights through :meth:`RNNCellBase.load_dense_weights`: every
        input-to-hidden weight goes through ``FORMATS[format].from_dense(weight, **layer's
        options)`` (exact for ``"dense"``; a format without a decomposition raises
        ``NotImplementedError`` naming it); hidden-to-hidden (and projection) weights through
        ``FORMATS[hidden_format].from_dense`` (an exact copy by default); both biases ``b_ih``
        and ``b_hh`` are copied. Returns an instance of ``cls``.
        """
        check_torch_module(cls, cls.torch_class, module)

        def weight(name: str, layer: int, direction: int) -> Any:
            return getattr(module, f"{name}_l{layer}" + ("_reverse" if direction else ""))

        settings: dict[str, Any] = {}
        if module.proj_size:
            settings["proj_size"] = module.proj_size
        if isinstance(module, nn.RNN):
            settings["nonlinearity"] = module.nonlinearity
        # Built on the meta device (no memory, no random numbers drawn), then every matrix and
        # bias is replaced by one made from module's weights, on their device.
        out = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device="meta",
            dtype=weight("weight_ih", 0, 0).dtype,
            format=format,
            hidden_format=hidden_format,
            hidden_modes=hidden_modes,
            hidden_options=hidden_options,
            layer_options=layer_options,
            **settings,
            **options,
        )
        for layer in range(out.num_layers):
            for direction in range(out.num_directions):
                out.cell(layer, direction).load_dense_weights(
                    weight("weight_ih", layer, direction),
                    weight("weight_hh", layer, direction),
                    weight("weight_hr", layer, direction) if out.proj_size else None,
                    bias_ih=weight("bias_ih", layer, direction) if out.bias else None,
                    bias_hh=weight("bias_hh", layer, direction) if out.bias else None,
                )
        out.train(module.training)
        return out


class LSTM(RNNBase):
    __doc__ = LSTM_DOC

    mode = "LSTM"
    cell_class = LSTMCell
    torch_class = nn.LSTM

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
            device,
            dtype,
            proj_size=proj_size,
            **options,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        output, (h_n, c_n) = self._forward(input, None if hx is None else tuple(hx))
        return output, (h_n, c_n)


class GRU(RNNBase):
    __doc__ = GRU_DOC

    mode = "GRU"
    cell_class = GRUCell
    torch_class = nn.GRU

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return output, h_n


class RNN(RNNBase):
    __doc__ = RNN_DOC

    mode = "RNN"
    cell_class = RNNCell
    torch_class = nn.RNN

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
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device,
            dtype,
            nonlinearity=nonlinearity,
            **options,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, None if hx is None else (hx,))
        return output, h_n
