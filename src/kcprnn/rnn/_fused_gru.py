"""The fused GRU and Elman layers of :mod:`kcprnn.rnn.fused` (one direction over
equal-length sequences, one autograd node with a hand-written backward through time each).

Shape comments: ``t`` time steps, ``b`` batch, ``h`` hidden size, ``n = t*b`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import native_rnn
from ._fused_base import (
    _empty,
    _factor_rows,
    _fresh,
    _is_zero,
    _native_backward_buffers,
    _native_weight_grads,
    _previous,
    _product,
    _rows,
    _some,
)
from .kron import KronLayout


class _GRUSequence(torch.autograd.Function):
    """A whole single-direction GRU layer over equal-length sequences with a hand-written
    backward through time (as :class:`_LSTMSequence`)."""

    @staticmethod
    def forward(
        ctx,
        gates_x: Tensor,
        h0: Tensor,
        bias: Tensor | None,
        reverse: bool,
        spec: KronLayout | None,
        keep: bool,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prod = _product(spec, weights)
        ctx.native = prod.compiled(gates_x, h0, *_some(bias))
        new = _empty if ctx.native else lambda like, *shape: like.new_empty(shape)
        # what the backward reads, of every step; with no backward to come (keep False) the
        # compiled loop rewrites one step's rows instead
        kept = steps if keep or not ctx.native else min(steps, 1)
        gh = new(gates_x, kept, b, 3 * hidden)  # (t, b, 3h): W_hh h + b_hh of every step
        rz = new(gates_x, kept, b, 2 * hidden)  # (t, b, 2h): the r and z gates
        ns = new(gates_x, kept, b, hidden)  # (t, b, h)
        hs = new(gates_x, steps, b, hidden)  # (t, b, h)
        if ctx.native:
            h0 = h0.contiguous()
            bias = None if bias is None else bias.contiguous()
            skip = _is_zero(h0)
            ctx.x_fm = _factor_rows(prod, hs, ctx.needs_input_grad[6:]) if keep else None
            native_rnn.gru_forward(
                _rows(gates_x), bias, h0, gh, rz, ns, hs, reverse, skip, prod.args(), ctx.x_fm
            )
        else:
            gx = gates_x.reshape(steps, b, 3 * hidden)  # (t, b, 3h)
            h = h0
            skip = _is_zero(h0)  # the usual zero initial state: no first recurrent product
            for t in order:
                if skip:
                    g = gh[t].zero_() if bias is None else gh[t].copy_(bias)  # (b, 3h)
                    skip = False
                else:
                    g = prod.set_(gh[t], h, bias)  # (b, 3h)
                gate = torch.add(gx[t, :, : 2 * hidden], g[:, : 2 * hidden], out=rz[t])
                r, z = gate.sigmoid_().chunk(2, dim=1)  # 2 x (b, h)
                n = torch.addcmul(gx[t, :, 2 * hidden :], r, g[:, 2 * hidden :], out=ns[t])
                n.tanh_()
                h = torch.addcmul(n, z, h - n, out=hs[t])  # (b, h)
        ctx.rz, ctx.ns, ctx.gh, ctx.reverse, ctx.prod = rz, ns, gh, reverse, prod
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h0, hs)
        h_n = hs[order[-1]].clone() if steps else h0.clone()  # (b, h)
        return hs.view(steps * b, hidden), h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs: Tensor, grad_hn: Tensor):
        h0, hs = ctx.saved_tensors
        rz, ns, gh, reverse, prod = ctx.rz, ctx.ns, ctx.gh, ctx.reverse, ctx.prod
        steps, b, hidden = ns.shape
        grad_hs = grad_hs.reshape(steps, b, hidden)  # (t, b, h)
        if ctx.native:
            dgx = _empty(gh, *gh.shape)  # (t, b, 3h): gradients of the input projections
            dgh = _empty(gh, *gh.shape)  # (t, b, 3h): gradients of W_hh h + b_hh
            d_fm, dbias = _native_backward_buffers(ctx, gh, 2)
            dh = _fresh(grad_hn)  # (b, h)
            need_h0 = ctx.needs_input_grad[1]
            native_rnn.gru_backward(
                rz,
                ns,
                gh,
                hs,
                h0,
                grad_hs.contiguous(),
                dh,
                dgx,
                dgh,
                reverse,
                need_h0,
                prod.args_t(),
                d_fm,
                dbias,
            )
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[6:], dgh, h0, hs)
            return _gru_grads(ctx, dgx, grad_w, dbias, dh)
        h_prev = _previous(hs, h0, reverse)  # (t, b, h)
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
                dh = (dh * z[t]).add_(prod.back(dhh))  # (b, h)
        flat_h = dgh.view(steps * b, 3 * hidden)  # (n, 3h)
        grad_w = prod.grads(flat_h, h_prev.view(steps * b, hidden), ctx.needs_input_grad[6:])
        grad_bias = flat_h.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return _gru_grads(ctx, dgx, grad_w, grad_bias, dh)


def _gru_grads(
    ctx, dgx: Tensor, grad_w: Sequence[Tensor | None], grad_bias: Tensor | None, dh: Tensor
) -> tuple:
    """What :meth:`_GRUSequence.backward` returns, from the gradients of the input projections
    ``(t, b, 3h)``, the weights', the bias's and ``h0``'s."""
    steps, b, three_h = dgx.shape
    grad_h0 = dh if ctx.needs_input_grad[1] else None
    return dgx.view(steps * b, three_h), grad_h0, grad_bias, None, None, None, *grad_w


class _RNNSequence(torch.autograd.Function):
    """A whole single-direction Elman layer (``tanh`` or ``relu``) over equal-length sequences
    with a hand-written backward through time (as :class:`_LSTMSequence`)."""

    @staticmethod
    def forward(
        ctx,
        gates_x: Tensor,
        h0: Tensor,
        bias: Tensor | None,
        reverse: bool,
        relu: bool,
        spec: KronLayout | None,
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prod = _product(spec, weights)
        ctx.native = prod.compiled(gates_x, h0, *_some(bias))
        if ctx.native:
            h0 = h0.contiguous()
            bias = None if bias is None else bias.contiguous()
            hs = _empty(gates_x, steps, b, hidden)  # (t, b, h)
            skip = _is_zero(h0)
            ctx.x_fm = _factor_rows(prod, hs, ctx.needs_input_grad[6:])
            native_rnn.rnn_forward(
                _rows(gates_x), bias, hs, h0, reverse, relu, skip, prod.args(), ctx.x_fm
            )
        else:
            hs = gates_x.reshape(steps, b, hidden)  # (t, b, h)
            hs = hs + bias if bias is not None else hs.clone()  # (t, b, h): pre-activations
            h = h0
            skip = _is_zero(h0)
            for t in order:
                pre = hs[t] if skip else prod.add_(hs[t], h)  # (b, h)
                skip = False
                h = pre.relu_() if relu else pre.tanh_()  # (b, h), in place
        ctx.reverse, ctx.relu, ctx.prod, ctx.has_bias = reverse, relu, prod, bias is not None
        ctx.save_for_backward(h0, hs)
        h_n = hs[order[-1]].clone() if steps else h0.clone()  # (b, h)
        return hs.view(steps * b, hidden), h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_hs: Tensor, grad_hn: Tensor):
        h0, hs = ctx.saved_tensors
        reverse, prod = ctx.reverse, ctx.prod
        steps, b, hidden = hs.shape
        grad_hs = grad_hs.reshape(steps, b, hidden)  # (t, b, h)
        dpre = _empty(hs, *hs.shape) if ctx.native else torch.empty_like(hs)  # (t, b, h)
        flat = dpre.view(steps * b, hidden)  # (n, h)
        if ctx.native:
            d_fm, grad_bias = _native_backward_buffers(ctx, hs, 2)
            dh = _fresh(grad_hn)  # (b, h)
            need_h0 = ctx.needs_input_grad[1]
            native_rnn.rnn_backward(
                hs,
                grad_hs.contiguous(),
                dh,
                dpre,
                reverse,
                ctx.relu,
                need_h0,
                prod.args_t(),
                d_fm,
                grad_bias,
            )
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[6:], dpre, h0, hs)
        else:
            deriv = (hs > 0).to(hs.dtype) if ctx.relu else 1 - hs * hs  # (t, b, h)
            dh = grad_hn.clone()  # (b, h)
            order = range(steps) if reverse else range(steps - 1, -1, -1)
            for t in order:
                dh += grad_hs[t]
                d = torch.mul(dh, deriv[t], out=dpre[t])  # (b, h)
                if t != order[-1] or ctx.needs_input_grad[1]:
                    dh = prod.back(d)  # (b, h)
            h_prev = _previous(hs, h0, reverse).view(steps * b, hidden)  # (n, h)
            grad_w = prod.grads(flat, h_prev, ctx.needs_input_grad[6:])
            grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_h0 = dh if ctx.needs_input_grad[1] else None
        return flat, grad_h0, grad_bias, None, None, None, *grad_w
