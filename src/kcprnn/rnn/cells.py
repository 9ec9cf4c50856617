"""One-step recurrent cells whose weights are stored in tensor formats: :class:`LSTMCell`,
:class:`GRUCell` and :class:`RNNCell`, drop-ins for ``torch.nn``'s cells.

A cell holds its input-to-hidden matrix ``W_ih`` in any registered format and its
hidden-to-hidden matrix ``W_hh`` (dense by default), with the gates stacked on the output rows in
``torch.nn``'s order: LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``. The step itself is one of the pure
functions of :mod:`kcprnn.rnn.steps`; :meth:`RNNCellBase.input_projection` and
:meth:`RNNCellBase.step` let a multi-step caller do the input product of all steps at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .._compile_module import compiled_module, compiles_opaque
from ..budget import budget_options, is_budget
from ..formats import FORMATS, FactorizedMatrix, make_matrix, resolve_dtype
from ._cell_repeat import remember_dense, remember_step, repeated_dense, repeated_step
from ._cell_route import cell_uses_dense
from ._cell_step import (
    autocasting,
    dense_weights,
    kept,
    marks,
    native_applies,
    native_step,
    needs_grad,
    shared_step,
)
from ._options import (
    check_arguments,
    check_input_dtype,
    check_torch_module,
    default_budget_options,
    fold_gates,
    hidden_matrix_options,
    input_matrix_options,
)
from .fused import gru_sequence, lstm_sequence
from .steps import State, gru_step, lstm_step, rnn_step

__all__ = [
    "GRUCell",
    "LSTMCell",
    "RNNCell",
    "RNNCellBase",
    # the step, fused-sequence and option functions, importable from here as well
    "fold_gates",
    "gru_sequence",
    "gru_step",
    "hidden_matrix_options",
    "input_matrix_options",
    "lstm_sequence",
    "lstm_step",
    "rnn_step",
]

_Cell = TypeVar("_Cell", bound="RNNCellBase")
_Kept = TypeVar("_Kept")
_Pair = tuple[Tensor, Tensor]  # W_ih and W_hh dense


def _from_dense(
    role: str, weight: Tensor, format: str, options: dict[str, Any]
) -> FactorizedMatrix:
    """``FORMATS[format].from_dense(weight, **options)``, naming the weight's role if the format
    has no decomposition; a parameter budget (a float ``rank``) is solved first, as the
    constructor solved it."""
    if is_budget(options.get("rank")):
        options = budget_options(format, weight.shape[1], weight.shape[0], options)
    try:
        return FORMATS[format].from_dense(weight, **options)
    except NotImplementedError as err:
        raise NotImplementedError(
            f"cannot convert the {role} weight to format {format!r}: {err}"
        ) from err


class RNNCellBase(nn.Module):
    """Shared parts of the three cells: construction, init, ``forward``'s checks, conversion.

    Subclasses set :attr:`mode` (``"LSTM"``, ``"GRU"`` or ``"RNN"``), :attr:`num_gates` and
    :attr:`torch_class`, the ``torch.nn`` cell that :meth:`from_torch` converts (subclasses of
    the three cells inherit all three). The arguments are those of :class:`LSTMCell`;
    ``nonlinearity`` (``"tanh"`` or ``"relu"``) is for :class:`RNNCell` only.
    """

    mode: ClassVar[str] = ""
    num_gates: ClassVar[int] = 1
    torch_class: ClassVar[type[nn.RNNCellBase]] = nn.RNNCellBase

    weight_ih: FactorizedMatrix
    weight_hh: FactorizedMatrix
    weight_hr: FactorizedMatrix | None
    bias_ih: nn.Parameter | None
    bias_hh: nn.Parameter | None

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
        format: str = "kcp",
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
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
            cell=True,
        )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.bias = bias
        g, out_size = self.num_gates, self.num_gates * hidden_size
        state_in = proj_size or hidden_size
        hidden_opts = dict(hidden_options or {})
        hh_opts = hidden_matrix_options(hidden_opts, state_in, hidden_size, g, modes)
        # role -> (format, options, in_features, out_features) of every matrix
        specs = {
            "ih": (format, input_matrix_options(options, g, modes), input_size, out_size),
            "hh": (hidden_format, hh_opts, state_in, out_size),
        }
        if proj_size:
            specs["hr"] = (hidden_format, dict(hidden_opts), hidden_size, proj_size)
        specs = default_budget_options(specs)  # a budget for every compressed matrix with no rank
        # kept for load_dense_weights, which decomposes with the same options
        self._matrix_options = {role: spec[:2] for role, spec in specs.items()}
        factory: dict[str, Any] = {"device": device, "dtype": resolve_dtype(dtype)}
        self.weight_hr = None
        for role, (fmt, opts, n_in, n_out) in specs.items():
            setattr(self, f"weight_{role}", make_matrix(fmt, n_in, n_out, **factory, **opts))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(out_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(out_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        # kept between steps without gradients (kcprnn.rnn._cell_step)
        self._dense_choice: dict[tuple[Any, ...], bool] = {}
        self._dense_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self._native_cache: tuple[tuple, Any] | None = None
        self._kept: dict[str, tuple[tuple, Any]] = {}  # kept(): name -> (weights key, value)
        self._param_slots: tuple[nn.Module, nn.Module, list[tuple[dict, str]]] | None = None
        self._repeat: tuple[tuple, tuple, tuple[Tensor, Tensor], bool] | None = None
        self.reset_parameters()

    @property
    def format(self) -> str:
        """Format of the input-to-hidden matrix."""
        return self.weight_ih.format_name

    @property
    def hidden_format(self) -> str:
        """Format of the hidden-to-hidden matrix."""
        return self.weight_hh.format_name

    @property
    def output_size(self) -> int:
        """Size of ``h``: ``proj_size`` if set, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def matrices(self) -> dict[str, FactorizedMatrix]:
        """The weight matrices by role (``"ih"``, ``"hh"``, and ``"hr"`` with a projection)."""
        out = {"ih": self.weight_ih, "hh": self.weight_hh}
        if self.weight_hr is not None:
            out["hr"] = self.weight_hr
        return out

    def reset_parameters(self) -> None:
        """``torch.nn``'s init: every weight and bias ``U(-1/sqrt(h), 1/sqrt(h))``; the
        factorized matrices get that std (``1/sqrt(3h)``) on their reconstruction."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for m in self.matrices().values():
            m.reset_parameters(std=bound / math.sqrt(3))
        with torch.no_grad():
            for b in (self.bias_ih, self.bias_hh):
                if b is not None:
                    b.uniform_(-bound, bound)

    def input_projection(self, x: Tensor) -> Tensor:
        """``W_ih x + b_ih`` for rows ``(n, input_size) -> (n, G*hidden)``: the product a
        multi-step caller does once for all time steps."""
        return self.weight_ih(x, self.bias_ih)  # (n, G*h)

    def step(self, gates_x: Tensor, state: State) -> State:
        """One step from the precomputed input projection; ``state`` is a tuple."""
        raise NotImplementedError(f"{type(self).__name__} does not define step()")

    def state_sizes(self) -> tuple[int, ...]:
        """Feature sizes of the state tensors (``(output_size,)`` or ``(output_size, hidden)``)."""
        return (self.output_size,)

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles leave out what the steps keep (the compiled step holds pointers)
        state = super().__getstate__()
        state.update(
            _dense_cache=None, _native_cache=None, _param_slots=None, _kept={}, _repeat=None
        )
        return state

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if not self.bias:
            s += ", bias=False"
        return s

    def _forward(self, input: Tensor, hx: State | None) -> State:
        weights = repeated_dense(self, input, hx)
        if weights is not None:
            return self._dense_step(input, hx, weights)  # type: ignore[arg-type]
        if (repeated := repeated_step(self, input, hx)) is not None:
            return repeated
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.shape[-1]}"
            )
        check_input_dtype(name, input, self)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)  # (b, i)
        b = x.shape[0]
        state: State
        if hx is None:
            state = tuple(x.new_zeros(b, s) for s in self.state_sizes())
        else:
            checked = []
            for k, (t, s) in enumerate(zip(hx, self.state_sizes(), strict=True)):
                if t.dim() not in (1, 2) or t.dim() != input.dim():
                    raise ValueError(
                        f"{name}: Expected hx[{k}] to be {input.dim()}D like the input, "
                        f"got {t.dim()}D instead"
                    )
                t = t if batched else t.unsqueeze(0)  # (b, s)
                if t.shape != (b, s):
                    raise ValueError(
                        f"{name}: Expected hx[{k}] of shape {(b, s) if batched else (s,)}, "
                        f"got {tuple(t.shape) if batched else tuple(t.shape[1:])}"
                    )
                checked.append(t)
            state = tuple(checked)
        if self._use_dense(b):
            new = self._dense_step(x, state)  # tuple of (b, s)
            if training := torch.is_grad_enabled():
                marks(self)["pending"] = True  # until a backward through the rebuild
            if batched and hx is not None:
                remember_dense(self, input, state, training)  # a lone step is priced apart
        else:
            new = self._structured_step(x, state)  # tuple of (b, s)
            if batched and hx is not None and torch.is_grad_enabled():
                remember_step(self, input, state)
        if not batched:
            new = tuple(t.squeeze(0) for t in new)
        return new

    # --- the dense step ----------------------------------------------------------------------

    def _use_dense(self, batch: int) -> bool:
        """Whether a step on ``batch`` rows runs on dense weights and torch's fused cell
        (:func:`kcprnn.rnn._cell_route.cell_uses_dense`; the answer depends on shapes, the
        matrices' algorithms and cost models, and the parameters' dtype and device, which key
        it)."""
        if self.weight_hr is not None or torch.compiler.is_compiling():
            return False
        ih, hh = self.weight_ih, self.weight_hh
        if ih.format_name == "dense" and hh.format_name == "dense":
            return True  # torch's fused cell on the parameters themselves: nothing to price
        p = self.bias_hh if self.bias_hh is not None else next(hh.parameters(), None)
        if p is not None and autocasting(p.device):
            return True  # torch's fused cell, which autocast casts as it casts torch.nn's
        training = torch.is_grad_enabled() and needs_grad(self)
        pending = training and marks(self)["pending"]  # a step of a sequence, or a lone one
        models = (ih._algorithm, hh._algorithm, ih._cost_model, hh._cost_model)
        dtype = None if p is None else (p.dtype, p.is_cpu)  # what the prices read of them
        key = (batch, training, pending, ih, hh, models, dtype)
        choice = self._dense_choice.get(key)
        if choice is None:
            choice = cell_uses_dense(self, batch, training)
            if len(self._dense_choice) >= 64:
                self._dense_choice.clear()
            self._dense_choice[key] = choice
        return choice

    def _kept_weight(self, name: str, build: Callable[..., _Kept], *args: Any) -> _Kept:
        """``build(*args)`` (made from the weights), kept under ``name`` between calls without
        gradients until a parameter changes (:func:`kcprnn.rnn._cell_step.kept`)."""
        return kept(self, name, lambda: build(*args))

    def _structured_step(self, x: Tensor, state: State) -> State:
        """One step through the formats' products: the compiled step where it can run; under
        autograd KCP matrices' factor matrices (:func:`~kcprnn.rnn._cell_step.shared_step`);
        else :meth:`step` on torch ops; compiled, one opaque node running this eager code."""
        if compiles_opaque(self):
            return compiled_module(self, x, state)[1]
        if (
            not (
                torch.is_grad_enabled()
                and (x.requires_grad or any(t.requires_grad for t in state) or needs_grad(self))
            )
            and native_applies(self, x.dtype, x.is_cpu)
            and not torch.compiler.is_compiling()  # compiled graphs trace the torch ops
        ):
            step = native_step(self)
            h, c = state[0].contiguous(), state[1].contiguous() if len(state) > 1 else None
            if step.has_ih:
                return step(x if x.stride(-1) == 1 else x.contiguous(), h, c)
            return step(None, h, c, gx=self.input_projection(x))
        return shared_step(self, x, state) or self.step(self.input_projection(x), state)

    def _dense_step(self, x: Tensor, state: State, weights: _Pair | None = None) -> State:
        """One step on dense weights (``weights``, or those kept or rebuilt by
        :func:`~kcprnn.rnn._cell_step.dense_weights`) through torch's fused cell."""
        raise NotImplementedError(f"{type(self).__name__} does not define _dense_step()")

    # --- conversion ----------------------------------------------------------------------------

    def load_dense_weights(
        self,
        weight_ih: Tensor,
        weight_hh: Tensor,
        weight_hr: Tensor | None = None,
        bias_ih: Tensor | None = None,
        bias_hh: Tensor | None = None,
    ) -> None:
        """Set the weights from dense ones in ``torch.nn``'s layout (gates stacked on the rows).

        Every matrix is replaced by ``FORMATS[its format].from_dense(weight, **options)``, with
        the options the constructor derived for it (exact for ``"dense"``; a format without a
        decomposition raises ``NotImplementedError`` naming it); the biases given are copied.
        The new parameters take the device and dtype of the given tensors. ``weight_hr`` is
        required with a projection and refused without one.
        """
        name = type(self).__name__
        given = {"ih": weight_ih, "hh": weight_hh, "hr": weight_hr}
        if weight_hr is not None and "hr" not in self._matrix_options:
            raise ValueError(f"{name}: weight_hr given, but the cell has no projection")
        weights: dict[str, Tensor] = {}
        for role, matrix in self.matrices().items():
            w, expected = given[role], (matrix.out_features, matrix.in_features)
            if w is None or tuple(w.shape) != expected:
                got = "none" if w is None else f"shape {tuple(w.shape)}"
                raise ValueError(f"{name}: weight_{role} should have shape {expected}, got {got}")
            weights[role] = w.detach()
        biases = {"bias_ih": bias_ih, "bias_hh": bias_hh}
        size = (self.num_gates * self.hidden_size,)
        for key, b in biases.items():
            if b is not None and (not self.bias or tuple(b.shape) != size):
                raise ValueError(
                    f"{name}: {key} of shape {tuple(b.shape)} given, but the cell has "
                    + (f"biases of shape {size}" if self.bias else "bias=False")
                )
        new = {
            role: _from_dense(role, w, *self._matrix_options[role]) for role, w in weights.items()
        }
        for role, m in new.items():
            setattr(self, f"weight_{role}", m)
        for key, b in biases.items():
            if b is not None:
                setattr(self, key, nn.Parameter(b.detach().clone()))

    @classmethod
    def from_torch(
        cls: type[_Cell],
        cell: nn.RNNCellBase,
        format: str = "kcp",
        *,
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> _Cell:
        """Compress a trained ``torch.nn`` cell of the same kind (:attr:`torch_class`).

        The cell is constructed with ``cell``'s sizes, bias and nonlinearity and the given
        formats and options, then takes ``cell``'s weights through :meth:`load_dense_weights`:
        the input-to-hidden weight goes through ``FORMATS[format].from_dense`` (exact for
        ``"dense"``), the hidden-to-hidden weight through ``FORMATS[hidden_format].from_dense``
        (an exact copy by default), both biases are copied. Returns an instance of ``cls``.
        """
        check_torch_module(cls, cls.torch_class, cell)
        # Built on the meta device (no memory, no random numbers drawn), then every matrix and
        # bias is replaced by one made from cell's weights, on their device.
        out = cls(
            cell.input_size,
            cell.hidden_size,
            cell.bias,
            device="meta",
            dtype=cell.weight_ih.dtype,
            nonlinearity=getattr(cell, "nonlinearity", "tanh"),
            format=format,
            hidden_format=hidden_format,
            hidden_modes=hidden_modes,
            hidden_options=hidden_options,
            **options,
        )
        bias_ih, bias_hh = (getattr(cell, key) for key in ("bias_ih", "bias_hh"))
        out.load_dense_weights(cell.weight_ih, cell.weight_hh, bias_ih=bias_ih, bias_hh=bias_hh)
        return out


class LSTMCell(RNNCellBase):
    r"""A long short-term memory cell with compressed weights; drop-in for ``torch.nn.LSTMCell``.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi}) \\
        f = \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf}) \\
        g = \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}) \\
        o = \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho}) \\
        c' = f \odot c + i \odot g \\
        h' = o \odot \tanh(c') \\
        \end{array}

    Args:
        input_size: the number of expected features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        bias: if ``False``, the cell has no ``b_ih`` and ``b_hh``. Default: ``True``.
        device, dtype: factory arguments, as in ``torch.nn``.
        proj_size: if ``> 0``, ``h' = W_hr h'`` of size ``proj_size`` (as in ``torch.nn.LSTM``;
            ``torch.nn.LSTMCell`` has no projection). Default: 0.
        format: format of ``W_ih`` (``4*hidden_size x input_size``), a key of
            :data:`kcprnn.FORMATS`. Default: ``"kcp"``.
        hidden_format: format of ``W_hh`` (and ``W_hr``). Default: ``"dense"``.
        hidden_modes: modes of ``hidden_size``; the gates are folded into the first one to give
            ``W_ih``'s ``out_modes`` (``[4,4,4,4] -> [16,4,4,4]``) unless ``out_modes`` is given.
        hidden_options: options for ``hidden_format`` (``rank``, modes, ...).
        **options: options of ``format`` for ``W_ih`` (``in_modes``, ``out_modes``, ``rank``, ...).
            Without a ``rank``, a compressed matrix's size comes from one budget for the cell:
            1/32 of the compressed matrices' dense parameters, split evenly, none above 1/4 of
            itself (:func:`kcprnn.budget.split_budget`, as in :class:`~kcprnn.LSTM`).

    Inputs: input, (h_0, c_0)
        - **input** of shape ``(batch, input_size)`` or ``(input_size)``.
        - **h_0**, **c_0** of shape ``(batch, hidden_size)`` or ``(hidden_size)``; zeros if omitted.

    Outputs: (h_1, c_1), of the shapes of ``h_0`` and ``c_0``.

    Attributes:
        weight_ih: :class:`~kcprnn.FactorizedMatrix` ``(4*hidden_size, input_size)``, gates
            ``(i, f, g, o)`` stacked on the rows.
        weight_hh: :class:`~kcprnn.FactorizedMatrix` ``(4*hidden_size, hidden_size)``.
        bias_ih, bias_hh: ``(4*hidden_size)``.

    Examples::

        >>> cell = LSTMCell(10, 20, format="dense")
        >>> h, c = cell(torch.randn(3, 10))
        >>> h.shape
        torch.Size([3, 20])
    """

    mode = "LSTM"
    num_gates = 4
    torch_class = nn.LSTMCell

    def state_sizes(self) -> tuple[int, ...]:
        return (self.output_size, self.hidden_size)

    def _dense_step(self, x: Tensor, state: State, weights: _Pair | None = None) -> State:
        w_ih, w_hh = dense_weights(self) if weights is None else weights
        b = self._parameters  # faster than nn.Module.__getattr__, on every step
        return torch.lstm_cell(x, state, w_ih, w_hh, b["bias_ih"], b["bias_hh"])

    def step(self, gates_x: Tensor, state: State) -> State:
        h, c = state
        return lstm_step(gates_x, h, c, self.weight_hh, self.bias_hh, self.weight_hr)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("LSTMCell: hx must be a tuple (h_0, c_0)")
        h, c = self._forward(input, None if hx is None else tuple(hx))
        return h, c


class GRUCell(RNNCellBase):
    r"""A gated recurrent unit cell with compressed weights; drop-in for ``torch.nn.GRUCell``.

    .. math::
        \begin{array}{ll}
        r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})) \\
        h' = (1 - z) \odot n + z \odot h
        \end{array}

    Args: as :class:`LSTMCell` (without ``proj_size``); the gates ``(r, z, n)`` are 3 blocks.

    Inputs: input, hidden
        - **input** of shape ``(batch, input_size)`` or ``(input_size)``.
        - **hidden** of shape ``(batch, hidden_size)`` or ``(hidden_size)``; zeros if omitted.

    Outputs: h', of the shape of ``hidden``.

    Examples::

        >>> cell = GRUCell(10, 20, format="dense")
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    mode = "GRU"
    num_gates = 3
    torch_class = nn.GRUCell

    def step(self, gates_x: Tensor, state: State) -> State:
        return (gru_step(gates_x, state[0], self.weight_hh, self.bias_hh),)

    def _dense_step(self, x: Tensor, state: State, weights: _Pair | None = None) -> State:
        w_ih, w_hh = dense_weights(self) if weights is None else weights
        b = self._parameters
        return (torch.gru_cell(x, state[0], w_ih, w_hh, b["bias_ih"], b["bias_hh"]),)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,) = self._forward(input, None if hx is None else (hx,))
        return h


class RNNCell(RNNCellBase):
    r"""An Elman RNN cell with compressed weights; drop-in for ``torch.nn.RNNCell``.

    .. math::
        h' = \tanh(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})

    Args: as :class:`GRUCell`, plus
        nonlinearity: ``"tanh"`` or ``"relu"``. Default: ``"tanh"``.

    Inputs: input, hidden, as :class:`GRUCell`. Outputs: h'.

    Examples::

        >>> cell = RNNCell(10, 20, nonlinearity="relu", format="dense")
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    mode = "RNN"
    num_gates = 1
    torch_class = nn.RNNCell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__(
            input_size, hidden_size, bias, device, dtype, nonlinearity=nonlinearity, **options
        )
        self.nonlinearity = nonlinearity

    def step(self, gates_x: Tensor, state: State) -> State:
        return (rnn_step(gates_x, state[0], self.weight_hh, self.bias_hh, self.nonlinearity),)

    def _dense_step(self, x: Tensor, state: State, weights: _Pair | None = None) -> State:
        w_ih, w_hh = dense_weights(self) if weights is None else weights
        cell = torch.rnn_relu_cell if self.nonlinearity == "relu" else torch.rnn_tanh_cell
        b = self._parameters
        return (cell(x, state[0], w_ih, w_hh, b["bias_ih"], b["bias_hh"]),)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,) = self._forward(input, None if hx is None else (hx,))
        return h

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"
