"""One-step recurrent cells whose weights are stored in tensor formats.

Pure step functions on top (``lstm_step``, ``gru_step``, ``rnn_step``): they take the input
projection of the step already computed (``gates_x = W_ih x + b_ih``), so that a multi-step
caller (:mod:`kcprnn.rnn.recurrent`) can do the input-to-hidden product of all time steps at once
and keep only the hidden-to-hidden work in its time loop. Below them, the option helpers that
fold the gates into the output modes (KCP.md section 1), and the cell modules
:class:`LSTMCell`, :class:`GRUCell`, :class:`RNNCell`: drop-ins for ``torch.nn``'s cells.

Gate order is ``torch.nn``'s: LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``, stacked on the output rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..formats import FORMATS, FactorizedMatrix, make_matrix
from ..formats._base import resolve_dtype
from ..formats._ops import linear_nt, weight_grad

__all__ = [
    "GRUCell",
    "LSTMCell",
    "RNNCell",
    "fold_gates",
    "gru_sequence",
    "gru_step",
    "hidden_matrix_options",
    "input_matrix_options",
    "lstm_sequence",
    "lstm_step",
    "rnn_step",
]

State = tuple[Tensor, ...]
MatrixFactory = Callable[[str, int, int, dict[str, Any]], FactorizedMatrix]
"""``factory(kind, in_features, out_features, options)`` -> matrix; ``kind`` is ``"ih"``, ``"hh"``
or ``"hr"``. The constructors use :func:`make_matrix`; ``from_torch`` decomposes trained weights."""

# --- step functions ---------------------------------------------------------------------------


def lstm_step(
    gates_x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
    weight_hr: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the precomputed input projection.

    Args:
        gates_x: ``W_ih x + b_ih``, shape ``(b, 4h)``, gates ``(i, f, g, o)``.
        h: previous hidden state ``(b, p)`` (``p = proj_size`` or ``h``).
        c: previous cell state ``(b, h)``.
        weight_hh: ``(b, p) -> (b, 4h)``.
        bias_hh: ``(4h,)`` or ``None``.
        weight_hr: optional projection ``(b, h) -> (b, p)``.

    Returns:
        ``(h', c')`` of shapes ``(b, p)`` and ``(b, h)``.
    """
    gates = gates_x + weight_hh(h)  # (b, 4h)
    if bias_hh is not None:
        gates = gates + bias_hh  # (b, 4h)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (b, h)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (b, h)
    h = torch.sigmoid(o) * torch.tanh(c)  # (b, h)
    if weight_hr is not None:
        h = weight_hr(h)  # (b, p)
    return h, c


def gru_step(
    gates_x: Tensor,
    h: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step from the precomputed input projection ``gates_x = W_ih x + b_ih``
    ``(b, 3h)``, gates ``(r, z, n)``; ``b_hn`` stays inside the reset gate as in ``torch.nn``.
    Returns ``h'`` ``(b, h)``."""
    gates_h = weight_hh(h)  # (b, 3h)
    if bias_hh is not None:
        gates_h = gates_h + bias_hh  # (b, 3h)
    xr, xz, xn = gates_x.chunk(3, dim=1)  # 3 x (b, h)
    hr, hz, hn = gates_h.chunk(3, dim=1)  # 3 x (b, h)
    r = torch.sigmoid(xr + hr)  # (b, h)
    z = torch.sigmoid(xz + hz)  # (b, h)
    n = torch.tanh(xn + r * hn)  # (b, h)
    return n + z * (h - n)  # (b, h)


def rnn_step(
    gates_x: Tensor,
    h: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman step ``act(gates_x + W_hh h + b_hh)``; ``gates_x`` ``(b, h)`` -> ``(b, h)``."""
    pre = gates_x + weight_hh(h)  # (b, h)
    if bias_hh is not None:
        pre = pre + bias_hh  # (b, h)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)  # (b, h)


def _recurrent_weight_grad(grad: Tensor, h_prev: Tensor) -> Tensor:
    """``grad.T @ h_prev``: ``(n, g)``, ``(n, h)`` -> ``(g, h)``, one GEMM over all steps
    (:func:`~kcprnn.formats._ops.linear_nt`; batch 16 x 6 steps, hidden 256: 254 -> 165 us),
    or the blocked :func:`~kcprnn.formats._ops.weight_grad` over many rows (faster from some
    16k rows on)."""
    if grad.shape[0] > 4096:
        return weight_grad(grad, h_prev)  # (g, h)
    return linear_nt(grad.t(), h_prev.t())  # (g, h)


def _is_zero(h: Tensor) -> bool:
    """Whether a CPU state is all zeros (a cheap check there; on accelerators it would wait for
    the device, so they always run the product)."""
    return h.device.type == "cpu" and not bool(h.any())


def _lstm_forward(
    gates: Tensor, h: Tensor, c: Tensor, weight: Tensor, order: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM recurrence over precomputed ``gates`` ``(t, b, 4h)`` (input projection and both
    biases), in place: ``gates`` comes back activated (``i, f, o`` sigmoids, ``g`` tanh). Returns
    ``(hs, cs, gates)``, ``hs`` and ``cs`` ``(t, b, h)`` indexed by time."""
    hidden = h.shape[1]
    hs = gates.new_empty(gates.shape[0], gates.shape[1], hidden)  # (t, b, h)
    cs = torch.empty_like(hs)  # (t, b, h)
    skip = _is_zero(h)  # the usual zero initial state: no first recurrent GEMM
    for t in order:
        g = gates[t] if skip else gates[t].add_(linear_nt(h, weight))  # (b, 4h)
        skip = False
        g[:, : 2 * hidden].sigmoid_()  # i, f
        g[:, 2 * hidden : 3 * hidden].tanh_()  # g
        g[:, 3 * hidden :].sigmoid_()  # o
        i, f, gg, o = g.chunk(4, dim=1)  # 4 x (b, h)
        c = torch.mul(f, c, out=cs[t]).addcmul_(i, gg)  # (b, h)
        h = torch.mul(o, torch.tanh(c), out=hs[t])  # (b, h)
    return hs, cs, gates


class _LSTMSequence(torch.autograd.Function):
    """A whole single-direction LSTM layer over equal-length sequences, with a hand-written
    backward through time: a few fused operations per step instead of autograd's graph, and the
    recurrent weight's gradient as one GEMM over all steps."""

    @staticmethod
    def forward(
        ctx,
        gates_x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        gates = gates_x.reshape(steps, b, 4 * hidden)  # (t, b, 4h)
        gates = gates + bias if bias is not None else gates.clone()  # (t, b, 4h)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        hs, cs, acts = _lstm_forward(gates, h0, c0, weight, order)
        ctx.acts, ctx.cs, ctx.reverse, ctx.has_bias = acts, cs, reverse, bias is not None
        ctx.save_for_backward(h0, c0, weight, hs)
        last = order[-1] if steps else None
        h_n = hs[last].clone() if steps else h0.clone()  # (b, h)
        c_n = cs[last].clone() if steps else c0.clone()  # (b, h)
        return hs.view(steps * b, hidden), h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        h0, c0, weight, hs = ctx.saved_tensors
        acts, cs, reverse = ctx.acts, ctx.cs, ctx.reverse
        steps, b, four_h = acts.shape
        hidden = four_h // 4
        grad_hs = grad_hs.reshape(steps, b, hidden)  # (t, b, h)
        # the previous state of every step, indexed by time
        if reverse:
            h_prev = torch.cat([hs[1:], h0[None]])  # (t, b, h)
            c_prev = torch.cat([cs[1:], c0[None]])  # (t, b, h)
        else:
            h_prev = torch.cat([h0[None], hs[:-1]])  # (t, b, h)
            c_prev = torch.cat([c0[None], cs[:-1]])  # (t, b, h)
        i, f, gg, o = acts.chunk(4, dim=2)  # 4 x (t, b, h)
        tc = torch.tanh(cs)  # (t, b, h)
        o_dtc = o * (1 - tc * tc)  # (t, b, h): d c / d h through h = o tanh(c)
        # what dc multiplies for the i, f, g gates, and the activations' derivatives
        by_dc = torch.stack([gg, c_prev, i], dim=2)  # (t, b, 3, h)
        deriv = acts * (1 - acts)  # (t, b, 4h): sigmoid'
        deriv[..., 2 * hidden : 3 * hidden] = 1 - gg * gg  # tanh'
        dgates = torch.empty_like(acts)  # (t, b, 4h)
        dh, dc = grad_hn.clone(), grad_cn.clone()  # (b, h)
        order = range(steps) if reverse else range(steps - 1, -1, -1)
        for t in order:
            dh += grad_hs[t]
            dc.addcmul_(dh, o_dtc[t])
            d = dgates[t]  # (b, 4h)
            torch.mul(dh, tc[t], out=d[:, 3 * hidden :])  # d o
            torch.mul(dc[:, None], by_dc[t], out=d[:, : 3 * hidden].view(b, 3, hidden))  # i, f, g
            d.mul_(deriv[t])  # pre-activation gradients
            dc = dc * f[t]
            if t != order[-1] or ctx.needs_input_grad[1]:  # the first step's only for h0
                dh = linear_nt(d, weight.t())  # (b, h)
        flat = dgates.view(steps * b, four_h)  # (n, 4h)
        grad_w = (
            _recurrent_weight_grad(flat, h_prev.view(steps * b, hidden))
            if ctx.needs_input_grad[3]
            else None
        )  # (4h, h)
        grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None  # (4h,)
        return flat, dh if ctx.needs_input_grad[1] else None, dc, grad_w, grad_bias, None


def lstm_sequence(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """A single-direction LSTM layer over equal-length sequences with a dense recurrent weight.

    Args:
        gates_x: ``W_ih x + b_ih`` of all steps, time-major rows ``(t b, 4h)``.
        h0, c0: initial states ``(b, h)``.
        weight: ``W_hh`` ``(4h, h)``; bias: ``b_hh`` ``(4h,)`` or ``None``.
        reverse: run from the last step to the first.

    Returns:
        ``(outputs (t b, h), h_n (b, h), c_n (b, h))``; the same numbers as :func:`lstm_step`
        step by step, with a hand-written backward through time (double backward is not
        supported).
    """
    return _LSTMSequence.apply(gates_x, h0, c0, weight, bias, reverse)


class _GRUSequence(torch.autograd.Function):
    """A whole single-direction GRU layer over equal-length sequences with a hand-written
    backward through time (as :class:`_LSTMSequence`)."""

    @staticmethod
    def forward(
        ctx, gates_x: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        gx = gates_x.reshape(steps, b, 3 * hidden)  # (t, b, 3h)
        gh = gx.new_empty(steps, b, 3 * hidden)  # (t, b, 3h): W_hh h + b_hh of every step
        rz = gx.new_empty(steps, b, 2 * hidden)  # (t, b, 2h): the r and z gates
        ns = gx.new_empty(steps, b, hidden)  # (t, b, h)
        hs = gx.new_empty(steps, b, hidden)  # (t, b, h)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        h = h0
        skip = _is_zero(h0)  # the usual zero initial state: no first recurrent GEMM
        for t in order:
            if skip:
                g = gh[t].zero_() if bias is None else gh[t].copy_(bias)  # (b, 3h)
                skip = False
            elif bias is None:
                g = gh[t].copy_(linear_nt(h, weight))  # (b, 3h)
            else:
                g = torch.add(linear_nt(h, weight), bias, out=gh[t])  # (b, 3h)
            gate = torch.add(gx[t, :, : 2 * hidden], g[:, : 2 * hidden], out=rz[t]).sigmoid_()
            r, z = gate.chunk(2, dim=1)  # 2 x (b, h)
            n = torch.addcmul(gx[t, :, 2 * hidden :], r, g[:, 2 * hidden :], out=ns[t]).tanh_()
            h = torch.addcmul(n, z, h - n, out=hs[t])  # (b, h)
        ctx.rz, ctx.ns, ctx.gh, ctx.reverse = rz, ns, gh, reverse
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h0, weight, hs)
        h_n = hs[order[-1]].clone() if steps else h0.clone()  # (b, h)
        return hs.view(steps * b, hidden), h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs: Tensor, grad_hn: Tensor):
        h0, weight, hs = ctx.saved_tensors
        rz, ns, gh, reverse = ctx.rz, ctx.ns, ctx.gh, ctx.reverse
        steps, b, hidden = ns.shape
        grad_hs = grad_hs.reshape(steps, b, hidden)  # (t, b, h)
        if reverse:
            h_prev = torch.cat([hs[1:], h0[None]])  # (t, b, h)
        else:
            h_prev = torch.cat([h0[None], hs[:-1]])  # (t, b, h)
        r, z = rz.chunk(2, dim=2)  # 2 x (t, b, h)
        one_minus_z = 1 - z  # (t, b, h)
        tanh_deriv = 1 - ns * ns  # (t, b, h)
        rz_deriv = rz * (1 - rz)  # (t, b, 2h)
        h_minus_n = h_prev - ns  # (t, b, h)
        dgx = torch.empty_like(gh)  # (t, b, 3h): gradients of the input projections
        dgh = torch.empty_like(gh)  # (t, b, 3h): gradients of W_hh h + b_hh
        dh = grad_hn.clone()  # (b, h)
        order = range(steps) if reverse else range(steps - 1, -1, -1)
        for t in order:
            dh += grad_hs[t]
            dx, dhh = dgx[t], dgh[t]  # (b, 3h)
            dpre_n = torch.mul(dh, one_minus_z[t], out=dx[:, 2 * hidden :]).mul_(tanh_deriv[t])
            torch.mul(dpre_n, gh[t, :, 2 * hidden :], out=dx[:, :hidden])  # d r
            torch.mul(dh, h_minus_n[t], out=dx[:, hidden : 2 * hidden])  # d z
            dx[:, : 2 * hidden].mul_(rz_deriv[t])  # pre-activation gradients of r and z
            dhh[:, : 2 * hidden] = dx[:, : 2 * hidden]
            torch.mul(dpre_n, r[t], out=dhh[:, 2 * hidden :])
            if t != order[-1] or ctx.needs_input_grad[1]:  # the first step's only for h0
                dh = (dh * z[t]).add_(linear_nt(dhh, weight.t()))  # (b, h)
        flat_x = dgx.view(steps * b, 3 * hidden)  # (n, 3h)
        flat_h = dgh.view(steps * b, 3 * hidden)  # (n, 3h)
        grad_w = (
            _recurrent_weight_grad(flat_h, h_prev.view(steps * b, hidden))
            if ctx.needs_input_grad[2]
            else None
        )  # (3h, h)
        grad_bias = flat_h.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return flat_x, dh if ctx.needs_input_grad[1] else None, grad_w, grad_bias, None


def gru_sequence(
    gates_x: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """A single-direction GRU layer over equal-length sequences with a dense recurrent weight:
    ``gates_x`` ``W_ih x + b_ih`` ``(t b, 3h)`` (gates ``r, z, n``), ``h0`` ``(b, h)``, ``weight``
    ``W_hh`` ``(3h, h)``, ``bias`` ``b_hh`` (``b_hn`` stays inside the reset gate, as in
    ``torch.nn``). Returns ``(outputs (t b, h), h_n (b, h))``, the numbers of :func:`gru_step`
    step by step, with a hand-written backward through time (no double backward)."""
    return _GRUSequence.apply(gates_x, h0, weight, bias, reverse)


# --- options: gate folding ----------------------------------------------------------------------


def _flat_product(modes: Sequence[Any]) -> int:
    return math.prod(_flat_product(m) if isinstance(m, Sequence) else m for m in modes)


def _check_modes(modes: Sequence[Any], size: int, name: str, size_name: str) -> list[Any]:
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or len(modes) == 0:
        raise TypeError(
            f"{name} must be a non-empty sequence of ints (or of int sequences), got {modes!r}"
        )
    if _flat_product(modes) != size:
        raise ValueError(
            f"the product of {name} must equal {size_name}: {name}={list(modes)} multiply to "
            f"{_flat_product(modes)}, but {size_name}={size}"
        )
    return [list(m) if isinstance(m, Sequence) else m for m in modes]


def fold_gates(modes: Sequence[Any], num_gates: int) -> list[Any]:
    """Fold ``num_gates`` stacked blocks into the first mode: ``J_1 <- G * J_1``.

    For nested (Kronecker-factored) modes the first factor of the first mode is multiplied.

    Example:
        >>> fold_gates([4, 4, 4, 4], 4)
        [16, 4, 4, 4]
        >>> fold_gates([[2, 2], [2, 2]], 3)
        [[6, 2], [2, 2]]
    """
    first = modes[0]
    if isinstance(first, Sequence):
        first = [num_gates * first[0], *first[1:]]
    else:
        first = num_gates * first
    return [first, *(list(m) if isinstance(m, Sequence) else m for m in modes[1:])]


def input_matrix_options(
    options: dict[str, Any],
    num_gates: int,
    hidden_modes: Sequence[Any] | None,
) -> dict[str, Any]:
    """Options of an input-to-hidden matrix: ``options`` with ``out_modes`` derived from
    ``hidden_modes`` by :func:`fold_gates` unless ``out_modes`` is given explicitly."""
    opts = dict(options)
    if hidden_modes is not None and "out_modes" not in opts:
        opts["out_modes"] = fold_gates(hidden_modes, num_gates)
    return opts


def hidden_matrix_options(
    options: dict[str, Any],
    in_features: int,
    hidden_size: int,
    num_gates: int,
    hidden_modes: Sequence[Any] | None,
) -> dict[str, Any]:
    """Options of a hidden-to-hidden matrix ``(G*hidden, in_features)``.

    Flat ``hidden_modes`` tensorize it as ``in_modes=hidden_modes`` (when ``in_features`` is
    ``hidden_size``) and ``out_modes=fold_gates(hidden_modes)``; nested (Kronecker-factored)
    modes describe the input-to-hidden matrix only. ``options`` (``hidden_options``) win.
    """
    opts = dict(options)
    if hidden_modes is not None and not any(isinstance(m, Sequence) for m in hidden_modes):
        if in_features == hidden_size:
            opts.setdefault("in_modes", list(hidden_modes))
            opts.setdefault("out_modes", fold_gates(hidden_modes, num_gates))
    return opts


def _check_format(format: object, name: str) -> str:
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown {name} {format!r}; choose one of {sorted(FORMATS)}")
    return format


# --- cells --------------------------------------------------------------------------------------


class _CellBase(nn.Module):
    """Shared parts of the three cells: parameters, checks, init, counting."""

    num_gates: ClassVar[int] = 1

    weight_ih: FactorizedMatrix
    weight_hh: FactorizedMatrix
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
        format: str = "kcp",
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        _check_format(format, "format")
        _check_format(hidden_format, "hidden_format")
        factory_kwargs = {"device": device, "dtype": resolve_dtype(dtype)}

        def factory(kind: str, in_f: int, out_f: int, opts: dict[str, Any]) -> FactorizedMatrix:
            fmt = format if kind == "ih" else hidden_format
            return make_matrix(fmt, in_f, out_f, **factory_kwargs, **opts)

        self._build(
            input_size,
            hidden_size,
            bias,
            proj_size,
            factory,
            hidden_modes,
            options,
            hidden_options or {},
            factory_kwargs,
        )
        self.reset_parameters()

    def _build(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        proj_size: int,
        factory: MatrixFactory,
        hidden_modes: Sequence[Any] | None,
        options: dict[str, Any],
        hidden_options: dict[str, Any],
        factory_kwargs: dict[str, Any],
    ) -> None:
        """Create the matrices through ``factory`` and the biases (uninitialized)."""
        _check_size(input_size, "input_size")
        _check_size(hidden_size, "hidden_size")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got bias={bias!r}")
        if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size should be a non-negative int, got proj_size={proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size, got proj_size={proj_size}, "
                f"hidden_size={hidden_size}"
            )
        if hidden_modes is not None:
            hidden_modes = _check_modes(hidden_modes, hidden_size, "hidden_modes", "hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.bias = bias
        g, out_size = self.num_gates, self.num_gates * hidden_size
        state_in = proj_size or hidden_size
        self.weight_ih = factory(
            "ih", input_size, out_size, input_matrix_options(options, g, hidden_modes)
        )
        self.weight_hh = factory(
            "hh",
            state_in,
            out_size,
            hidden_matrix_options(hidden_options, state_in, hidden_size, g, hidden_modes),
        )
        if proj_size:
            self.weight_hr = factory("hr", hidden_size, proj_size, dict(hidden_options))
        else:
            self.weight_hr = None
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(out_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(out_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

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
        raise NotImplementedError

    def state_sizes(self) -> tuple[int, ...]:
        """Feature sizes of the state tensors (``(output_size,)`` or ``(output_size, hidden)``)."""
        return (self.output_size,)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if not self.bias:
            s += ", bias=False"
        return s

    # --- forward -----------------------------------------------------------------------------

    def _forward(self, input: Tensor, hx: State | None) -> State:
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.shape[-1]}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)  # (b, i)
        b = x.shape[0]
        if hx is None:
            state = tuple(x.new_zeros(b, s) for s in self.state_sizes())
        else:
            state = []
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
                state.append(t)
            state = tuple(state)
        new = self.step(self.input_projection(x), state)  # tuple of (b, s)
        if not batched:
            new = tuple(t.squeeze(0) for t in new)
        return new

    # --- conversion --------------------------------------------------------------------------

    @classmethod
    def from_torch(
        cls,
        cell: nn.Module,
        format: str = "kcp",
        *,
        hidden_format: str = "dense",
        hidden_modes: Sequence[Any] | None = None,
        hidden_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> _CellBase:
        """Compress a trained ``torch.nn`` cell of the same kind.

        The input-to-hidden weight goes through ``FORMATS[format].from_dense`` (exact for
        ``"dense"``); the hidden-to-hidden weight through ``FORMATS[hidden_format].from_dense``
        (exact copy by default); both biases are copied.
        """
        _check_format(format, "format")
        _check_format(hidden_format, "hidden_format")
        _check_torch_kind(cls, cell)
        weights = {"ih": cell.weight_ih, "hh": cell.weight_hh}
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        factory = _from_dense_factory(weights, format, hidden_format)
        kwargs = {"device": cell.weight_ih.device, "dtype": cell.weight_ih.dtype}
        out._build(
            cell.input_size,
            cell.hidden_size,
            cell.bias,
            0,
            factory,
            hidden_modes,
            options,
            hidden_options or {},
            kwargs,
        )
        out._set_extra_from_torch(cell)
        if cell.bias:
            with torch.no_grad():
                out.bias_ih.copy_(cell.bias_ih)
                out.bias_hh.copy_(cell.bias_hh)
        return out

    def _set_extra_from_torch(self, cell: nn.Module) -> None:
        """Copy non-weight settings (the RNN cell's nonlinearity)."""


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {name}={value}")
    return value


_TORCH_KINDS = {
    "LSTMCell": nn.LSTMCell,
    "GRUCell": nn.GRUCell,
    "RNNCell": nn.RNNCell,
    "LSTM": nn.LSTM,
    "GRU": nn.GRU,
    "RNN": nn.RNN,
}


def _check_torch_kind(cls: type, module: nn.Module) -> None:
    expected = _TORCH_KINDS[cls.__name__]
    if not isinstance(module, expected):
        raise TypeError(
            f"{cls.__name__}.from_torch expects a torch.nn.{expected.__name__}, "
            f"got {type(module).__name__}"
        )


def _from_dense_factory(
    weights: dict[str, Tensor], format: str, hidden_format: str
) -> MatrixFactory:
    """A factory that decomposes the given trained weights (by role) instead of initializing."""

    def factory(kind: str, in_f: int, out_f: int, opts: dict[str, Any]) -> FactorizedMatrix:
        w = weights[kind].detach()
        if tuple(w.shape) != (out_f, in_f):
            raise ValueError(f"weight {kind} has shape {tuple(w.shape)}, expected {(out_f, in_f)}")
        fmt = format if kind == "ih" else hidden_format
        try:
            return FORMATS[fmt].from_dense(w, **opts)
        except NotImplementedError as err:
            raise NotImplementedError(
                f"cannot convert the {kind} weight to format {fmt!r}: {err}"
            ) from err

    return factory


class LSTMCell(_CellBase):
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

    num_gates = 4

    def state_sizes(self) -> tuple[int, ...]:
        return (self.output_size, self.hidden_size)

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


class GRUCell(_CellBase):
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

    num_gates = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        if options.get("proj_size", 0):
            raise ValueError("proj_size is only supported by LSTM cells")
        super().__init__(input_size, hidden_size, bias, device, dtype, **options)

    def step(self, gates_x: Tensor, state: State) -> State:
        return (gru_step(gates_x, state[0], self.weight_hh, self.bias_hh),)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,) = self._forward(input, None if hx is None else (hx,))
        return h


class RNNCell(_CellBase):
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

    num_gates = 1

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
        if options.get("proj_size", 0):
            raise ValueError("proj_size is only supported by LSTM cells")
        _check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, bias, device, dtype, **options)
        self.nonlinearity = nonlinearity

    def _set_extra_from_torch(self, cell: nn.Module) -> None:
        self.nonlinearity = _check_nonlinearity(cell.nonlinearity)

    def step(self, gates_x: Tensor, state: State) -> State:
        return (rnn_step(gates_x, state[0], self.weight_hh, self.bias_hh, self.nonlinearity),)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,) = self._forward(input, None if hx is None else (hx,))
        return h

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"


def _check_nonlinearity(value: object) -> str:
    if value not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity {value!r}. Select from 'tanh' or 'relu'.")
    return value  # type: ignore[return-value]
