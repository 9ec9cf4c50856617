"""Whole single-direction LSTM and GRU layers over equal-length sequences with a dense recurrent
weight, each one autograd node with a hand-written backward through time.

:func:`lstm_sequence` and :func:`gru_sequence` compute the same numbers as
:func:`~kcprnn.rnn.lstm_step` and :func:`~kcprnn.rnn.gru_step` applied step by step, but run a few
fused in-place operations per step instead of autograd's graph, skip the first recurrent product
when the initial state is zero (on the CPU, where checking is cheap), and compute the recurrent
weight's gradient as one product over all steps. Double backward is not supported.

Shape comments: ``t`` time steps, ``b`` batch, ``h`` hidden size, ``n = t*b`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import default_cost_model
from .._cpu.ops import linear_nt, weight_grad

__all__ = ["gru_sequence", "lstm_sequence"]


def _recurrent_weight_grad(grad: Tensor, h_prev: Tensor) -> Tensor:
    """``grad.T @ h_prev``: ``(n, g)``, ``(n, h)`` -> ``(g, h)``, the recurrent weight's gradient
    over all steps: one GEMM (:func:`~kcprnn._cpu.ops.linear_nt`), or the blocked
    :func:`~kcprnn._cpu.ops.weight_grad` over more rows than the cost model's
    ``recurrent_grad_blocked_rows``."""
    if grad.shape[0] > default_cost_model().recurrent_grad_blocked_rows:
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
        ``(outputs (t b, h), h_n (b, h), c_n (b, h))``; the same numbers as
        :func:`~kcprnn.rnn.lstm_step` step by step, with a hand-written backward through time
        (double backward is not supported).
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
    ``torch.nn``). Returns ``(outputs (t b, h), h_n (b, h))``, the numbers of
    :func:`~kcprnn.rnn.gru_step` step by step, with a hand-written backward through time (no
    double backward)."""
    return _GRUSequence.apply(gates_x, h0, weight, bias, reverse)
