"""Whole single-direction LSTM, GRU and Elman layers over equal-length sequences, each one
autograd node with a hand-written backward through time.

:func:`lstm_sequence`, :func:`gru_sequence` and :func:`rnn_sequence` compute the same numbers as
:func:`~kcprnn.rnn.lstm_step`, :func:`~kcprnn.rnn.gru_step` and :func:`~kcprnn.rnn.rnn_step`
applied step by step, but run a few fused in-place operations per step instead of autograd's
graph, skip the first recurrent product when the initial state is zero (on the CPU, where
checking is cheap), and compute the recurrent weight's gradient once per sequence, as one product
over all steps. Double backward is not supported.

The recurrent product is dense (``W_hh`` a tensor) or a Kronecker sum (:mod:`kcprnn.rnn.kron`:
the small factor matrices of a KCP or CP ``W_hh`` as the inputs, so gradients flow to the factors
through them): each step then multiplies by the factors, and their gradients come from one
structured product over all ``t*b`` rows. With a Kronecker sum in float32 on the CPU, the loop
itself (the products and the gate arithmetic of every step, forward and backward) runs in one
call of the compiled kernel (:mod:`kcprnn._cpu.native`) where it can be built; with a dense
``W_hh`` each step is two calls, its product on oneDNN and the rest compiled
(:mod:`kcprnn._cpu.native_dense`); elsewhere, and with ``KCPRNN_NATIVE=0``, the same loop runs
on torch ops. The buffers the compiled loops fill
(activations, states, gradients) come from a per-thread pool and are reused once nothing refers
to them (:mod:`kcprnn._cpu.buffers`; :func:`release_buffers` returns them to the system), and
:func:`input_projection` writes a layer's input projections into the same pool.

Shape comments: ``t`` time steps, ``b`` batch, ``h`` hidden size, ``n = t*b`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cpu import native_rnn
from .._cpu.buffers import pooled_empty, release_buffers
from .._cpu.cost import default_cost_model
from .._cpu.ops import linear_nt, linear_terms, onednn_gemm_wins, weight_grad_onednn
from ._fused_base import (
    _Dense,
    _empty,
    _factor_rows,
    _fresh,
    _is_zero,
    _Kron,
    _native_backward_buffers,
    _native_weight_grads,
    _previous,
    _product,
    _rows,
    _some,
)
from ._fused_gru import _GRUSequence, _RNNSequence
from .kron import KronLayout

__all__ = [
    "fused_sequence",
    "gru_sequence",
    "input_projection",
    "lstm_sequence",
    "release_buffers",
    "rnn_sequence",
]


def _lstm_forward(
    gates: Tensor, h: Tensor, c: Tensor, prod: _Dense | _Kron, order: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM recurrence over precomputed ``gates`` ``(t, b, 4h)`` (input projection and both
    biases), in place: ``gates`` comes back activated (``i, f, o`` sigmoids, ``g`` tanh). Returns
    ``(hs, cs, tanh(cs), gates)``, the first three ``(t, b, h)`` indexed by time."""
    hidden = c.shape[1]
    hs = gates.new_empty(gates.shape[0], gates.shape[1], hidden)  # (t, b, h)
    cs = torch.empty_like(hs)  # (t, b, h)
    tcs = torch.empty_like(hs)  # (t, b, h): tanh(c)
    skip = _is_zero(h)  # the usual zero initial state: no first recurrent product
    for t in order:
        g = gates[t] if skip else prod.add_(gates[t], h)  # (b, 4h)
        skip = False
        g[:, : 2 * hidden].sigmoid_()  # i, f
        g[:, 2 * hidden : 3 * hidden].tanh_()  # g
        g[:, 3 * hidden :].sigmoid_()  # o
        i, f, gg, o = g.chunk(4, dim=1)  # 4 x (b, h)
        c = torch.mul(f, c, out=cs[t]).addcmul_(i, gg)  # (b, h)
        h = torch.mul(o, torch.tanh(c, out=tcs[t]), out=hs[t])  # (b, h)
    return hs, cs, tcs, gates


def lstm_compiled(
    gx: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    prod: _Dense | _Kron,
    reverse: bool,
    needs: Sequence[bool] = (),
    new=_empty,
    skip: bool | None = None,
    keep: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The LSTM recurrence on the compiled kernels (``prod.compiled`` holds; ``h0``, ``c0``
    contiguous) over the input projections ``gx`` ``(t b, 4h)`` (or a ``(t, b, 4h)`` view with
    unit stride along the last axis): ``(acts, hs, cs, tcs, x_fm)``, buffers from
    ``new(like, *shape)``, ``x_fm`` the factor-major states where a Kronecker sum's factor
    gradients (``needs``) are wanted; ``skip``: whether ``h0`` is zero, where the caller
    knows (else checked); ``keep``: whether a backward will read ``acts``, ``cs`` and ``tcs``
    (without one they hold one step's gates and two steps' states, the steps alternating, the
    last step's cell state in row ``(t - 1) % 2``)."""
    b, hidden = h0.shape
    steps = gx.shape[0] if gx.dim() == 3 else (gx.shape[0] // b if b else 0)
    acts = new(gx, steps if keep else min(steps, 1), b, 4 * hidden)  # (t, b, 4h)
    hs = new(gx, steps, b, hidden)  # (t, b, h)
    cs, tcs = (new(gx, steps if keep else min(steps, 2), b, hidden) for _ in range(2))  # (t, b, h)
    x_fm = _factor_rows(prod, hs, needs) if keep else None
    skip = _is_zero(h0) if skip is None else skip
    native_rnn.lstm_forward(gx, bias, acts, h0, c0, hs, cs, tcs, reverse, skip, prod.args(), x_fm)
    return acts, hs, cs, tcs, x_fm


class _LSTMSequence(torch.autograd.Function):
    """A whole single-direction LSTM layer over equal-length sequences, with a hand-written
    backward through time: a few fused operations per step instead of autograd's graph, and the
    recurrent weights' gradients once over all steps."""

    @staticmethod
    def forward(
        ctx,
        gates_x: Tensor,
        h0: Tensor,
        c0: Tensor,
        bias: Tensor | None,
        reverse: bool,
        spec: KronLayout | None,
        keep: bool,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prod = _product(spec, weights)
        ctx.native = prod.compiled(gates_x, h0, c0, *_some(bias))
        if ctx.native:
            h0, c0 = h0.contiguous(), c0.contiguous()
            acts, hs, cs, tcs, ctx.x_fm = lstm_compiled(
                _rows(gates_x), bias, h0, c0, prod, reverse, ctx.needs_input_grad[7:], keep=keep
            )
        else:
            gates = gates_x.reshape(steps, b, 4 * hidden)  # (t, b, 4h)
            gates = gates + bias if bias is not None else gates.clone()  # (t, b, 4h)
            hs, cs, tcs, acts = _lstm_forward(gates, h0, c0, prod, order)
        ctx.acts, ctx.cs, ctx.tcs, ctx.reverse = acts, cs, tcs, reverse
        ctx.has_bias = bias is not None
        ctx.prod = prod
        ctx.save_for_backward(h0, c0, hs)
        last = order[-1] if steps else None
        h_n = hs[last].clone() if steps else h0.clone()  # (b, h)
        if steps and ctx.native and not keep:  # the last step's cell state: its scratch row
            last = (steps - 1) % 2
        c_n = cs[last].clone() if steps else c0.clone()  # (b, h)
        return hs.view(steps * b, hidden), h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs: Tensor, grad_hn: Tensor, grad_cn: Tensor):
        h0, c0, hs = ctx.saved_tensors
        acts, cs, tc, reverse, prod = ctx.acts, ctx.cs, ctx.tcs, ctx.reverse, ctx.prod
        steps, b, four_h = acts.shape
        hidden = four_h // 4
        grad_hs = grad_hs.reshape(steps, b, hidden)  # (t, b, h)
        if ctx.native:
            dgates = _empty(acts, *acts.shape)  # (t, b, 4h)
            d_fm, dbias = _native_backward_buffers(ctx, acts, 3)
            dh, dc = _fresh(grad_hn), _fresh(grad_cn)  # (b, h)
            need_h0 = ctx.needs_input_grad[1]
            native_rnn.lstm_backward(
                acts,
                cs,
                tc,
                c0,
                grad_hs.contiguous(),
                dh,
                dc,
                dgates,
                reverse,
                need_h0,
                prod.args_t(),
                d_fm,
                dbias,
            )
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[7:], dgates, h0, hs)
            return _lstm_grads(ctx, dgates, grad_w, dbias, dh, dc)
        h_prev = _previous(hs, h0, reverse)  # (t, b, h)
        c_prev = _previous(cs, c0, reverse)  # (t, b, h)
        i, f, gg, o = acts.chunk(4, dim=2)  # 4 x (t, b, h)
        o_dtc = torch.addcmul(o, o * tc, tc, value=-1)  # (t, b, h): d c / d h via o tanh(c)
        # what dc multiplies for the i, f, g gates, and the activations' derivatives
        by_dc = torch.stack([gg, c_prev, i], dim=2)  # (t, b, 3, h)
        deriv = torch.addcmul(acts, acts, acts, value=-1)  # (t, b, 4h): sigmoid'
        torch.mul(gg, gg, out=deriv[..., 2 * hidden : 3 * hidden]).neg_().add_(1)  # tanh'
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
                dh = prod.back(d)  # (b, h)
        flat = dgates.view(steps * b, four_h)  # (n, 4h)
        grad_w = prod.grads(flat, h_prev.view(steps * b, hidden), ctx.needs_input_grad[7:])
        grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None  # (4h,)
        return _lstm_grads(ctx, dgates, grad_w, grad_bias, dh, dc)


def _lstm_grads(
    ctx,
    dgates: Tensor,
    grad_w: Sequence[Tensor | None],
    grad_bias: Tensor | None,
    dh: Tensor,
    dc: Tensor,
) -> tuple:
    """What :meth:`_LSTMSequence.backward` returns, from the pre-activation gradients
    ``dgates`` ``(t, b, 4h)``, the weights' and the bias's, and those of ``h0`` and ``c0``."""
    steps, b, four_h = dgates.shape
    grad_h0 = dh if ctx.needs_input_grad[1] else None
    return dgates.view(steps * b, four_h), grad_h0, dc, grad_bias, None, None, None, *grad_w


class _InputProjection(torch.autograd.Function):
    """``x @ W.T + b`` on MKL into a pooled buffer (:func:`~kcprnn._cpu.buffers.pooled_empty`),
    or on oneDNN where that prices lower (:func:`~kcprnn._cpu.ops.onednn_gemm_wins`), with
    ``F.linear``'s gradients (the weight's likewise on either)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (n, i)
        (n, i), g = rows.shape, weight.shape[0]
        model = default_cost_model()
        if onednn_gemm_wins(*linear_terms(n, i, g), model, x.dtype):
            out = linear_nt(rows, weight, bias)  # (n, g)
        else:
            out = pooled_empty((n, g), x.dtype, x.device)  # (n, g)
            if bias is None:
                torch.mm(rows, weight.t(), out=out)
            else:
                torch.addmm(bias, rows, weight.t(), out=out)
        ctx.model = model
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, weight.shape[0])  # (n, g)
        grad_x = None
        if ctx.needs_input_grad[0]:  # oneDNN's product where it runs (faster than MKL's here)
            grad_x = linear_nt(grad, weight.t().contiguous()).view(ctx.shape)  # (..., i)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_onednn(grad, rows, ctx.model)  # (g, i)
            if grad_w is None:
                grad_w = grad.t().mm(rows)  # (g, i)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (g,)
        return grad_x, grad_w, grad_b


def input_projection(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for the input projections of a fused recurrence: on the
    CPU the result is written into a buffer reused between calls of the same shapes (fresh
    memory is paid for in page faults, about as much as the product itself at the speech size:
    :mod:`kcprnn._cpu.buffers`), except where oneDNN's product, which allocates its own, prices
    lower (on CPUs where MKL runs its generic kernels). ``x`` ``(..., i)``, ``weight``
    ``(g, i)``, ``bias`` ``(g,)`` or ``None``; returns ``(..., g)``, contiguous, with
    ``F.linear``'s gradients (no double backward). Elsewhere, and for inputs ``F.linear``
    would reject, it is ``F.linear``."""
    if (
        x.device.type != "cpu"
        or x.dim() < 1
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or x.dtype != weight.dtype
        or (bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype))
    ):
        return F.linear(x, weight, bias)
    return _InputProjection.apply(x, weight, bias)


def _backward_follows(*tensors: Tensor | None) -> bool:
    """Whether a backward can reach ``tensors``' recurrence (grad mode on and one of them
    requires grad): without one the compiled loops keep only a step's buffers."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_sequence(
    mode: str,
    gates_x: Tensor,
    state: tuple[Tensor, ...],
    weights: Sequence[Tensor],
    bias: Tensor | None = None,
    reverse: bool = False,
    kron: KronLayout | None = None,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One direction of a fused ``mode`` (``"LSTM"``, ``"GRU"``, ``"RNN"``) layer.

    ``weights`` is ``(W_hh,)`` for a dense recurrent matrix (``kron=None``), or the Kronecker
    sum's factor matrices (:func:`~kcprnn.rnn.kron_terms`) with their ``kron`` layout. Returns
    ``(outputs (t b, h), final state)``.
    """
    if mode == "LSTM":
        keep = _backward_follows(gates_x, *state, bias, *weights)
        out, h, c = _LSTMSequence.apply(
            gates_x, state[0], state[1], bias, reverse, kron, keep, *weights
        )
        return out, (h, c)
    if mode == "GRU":
        keep = _backward_follows(gates_x, state[0], bias, *weights)
        out, h = _GRUSequence.apply(gates_x, state[0], bias, reverse, kron, keep, *weights)
        return out, (h,)
    if mode == "RNN":
        relu = nonlinearity == "relu"
        out, h = _RNNSequence.apply(gates_x, state[0], bias, reverse, relu, kron, *weights)
        return out, (h,)
    raise ValueError(f"mode must be 'LSTM', 'GRU' or 'RNN', got mode={mode!r}")


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
        ``(outputs (t b, h), h_n (b, h), c_n (b, h))``; the same numbers as
        :func:`~kcprnn.rnn.lstm_step` step by step, with a hand-written backward through time
        (double backward is not supported).
    """
    return _LSTMSequence.apply(gates_x, h0, c0, bias, reverse, None, True, weight)


def gru_sequence(
    gates_x: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """A single-direction GRU layer over equal-length sequences with a dense recurrent weight:
    ``gates_x`` ``W_ih x + b_ih`` ``(t b, 3h)`` (gates ``r, z, n``), ``h0`` ``(b, h)``, ``weight``
    ``W_hh`` ``(3h, h)``, ``bias`` ``b_hh`` (``b_hn`` stays inside the reset gate, as in
    ``torch.nn``). Returns ``(outputs (t b, h), h_n (b, h))``, the numbers of
    :func:`~kcprnn.rnn.gru_step` step by step, with a hand-written backward through time (no
    double backward)."""
    return _GRUSequence.apply(gates_x, h0, bias, reverse, None, True, weight)


def rnn_sequence(
    gates_x: Tensor,
    h0: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """A single-direction Elman layer over equal-length sequences with a dense recurrent weight:
    ``gates_x`` ``W_ih x + b_ih`` ``(t b, h)``, ``h0`` ``(b, h)``, ``weight`` ``W_hh`` ``(h, h)``,
    ``bias`` ``b_hh``, ``nonlinearity`` ``"tanh"`` or ``"relu"``. Returns
    ``(outputs (t b, h), h_n (b, h))``, the numbers of :func:`~kcprnn.rnn.rnn_step` step by
    step, with a hand-written backward through time (no double backward)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return _RNNSequence.apply(gates_x, h0, bias, reverse, nonlinearity == "relu", None, weight)
