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
call of the compiled kernel (:mod:`kcprnn._cpu.native`) where it can be built; elsewhere, and
with ``KCPRNN_NATIVE=0``, the same loop runs on torch ops.

Shape comments: ``t`` time steps, ``b`` batch, ``h`` hidden size, ``n = t*b`` rows.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import default_cost_model, native, native_rnn
from .._cpu.ops import linear_nt, weight_grad
from .kron import KronLayout, kron_apply, kron_grads, kron_grads_dense_first

__all__ = ["fused_sequence", "gru_sequence", "lstm_sequence", "rnn_sequence"]


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


class _Dense:
    """The recurrent products with a dense ``W_hh`` ``(g, h)``."""

    def __init__(self, weights: Sequence[Tensor]) -> None:
        (self.weight,) = weights

    def add_(self, out: Tensor, h: Tensor) -> Tensor:
        """``out += h @ W.T`` in place; ``out`` ``(b, g)``."""
        return out.add_(linear_nt(h, self.weight))

    def set_(self, out: Tensor, h: Tensor, bias: Tensor | None) -> Tensor:
        """``out = h @ W.T (+ bias)``."""
        if bias is None:
            return out.copy_(linear_nt(h, self.weight))
        return torch.add(linear_nt(h, self.weight), bias, out=out)

    def back(self, d: Tensor) -> Tensor:
        """``d @ W``: ``(b, g) -> (b, h)``."""
        return linear_nt(d, self.weight.t())

    def grads(self, grad: Tensor, h_prev: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        """The weights' gradients from all steps' ``grad`` ``(n, g)`` and inputs ``(n, h)``."""
        return [_recurrent_weight_grad(grad, h_prev) if needs[0] else None]


class _Kron:
    """The recurrent products with a Kronecker-sum ``W_hh`` (:func:`~kcprnn.rnn.kron_apply`)."""

    def __init__(self, layout: KronLayout, weights: Sequence[Tensor]) -> None:
        self.layout, self.mats = layout, list(weights)
        self.index = layout.indices(self.mats[0].device)
        self._t: tuple[list[Tensor], KronLayout, tuple[Tensor | None, Tensor | None]] | None
        self._t = None

    def compiled(self, *tensors: Tensor) -> bool:
        """Whether the compiled recurrence kernels run this product with ``tensors``: all
        float32 on the CPU, and the kernels built."""
        return (
            all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (*self.mats, *tensors))
            and native.available()
        )

    def args(self) -> native_rnn.KronArgs:
        """``W`` for the compiled kernels."""
        return native_rnn.KronArgs(self.mats, *self.index)

    def args_t(self) -> native_rnn.KronArgs:
        """``W.T`` for the compiled kernels."""
        layout = self.layout.transposed()
        mats = [a.transpose(1, 2) for a in self.mats]
        return native_rnn.KronArgs(mats, *layout.indices(self.mats[0].device))

    def add_(self, out: Tensor, h: Tensor) -> Tensor:
        return out.add_(kron_apply(h, self.mats, self.layout, self.index))

    def set_(self, out: Tensor, h: Tensor, bias: Tensor | None) -> Tensor:
        y = kron_apply(h, self.mats, self.layout, self.index)  # (b, g)
        return out.copy_(y) if bias is None else torch.add(y, bias, out=out)

    def back(self, d: Tensor) -> Tensor:
        if self._t is None:
            layout = self.layout.transposed()
            mats = [a.transpose(1, 2).contiguous() for a in self.mats]
            self._t = (mats, layout, layout.indices(d.device))
        return kron_apply(d, *self._t)  # (b, h)

    def grads_fm(self, grad: Tensor, x: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        """The factors' gradients from all steps' ``grad`` ``(t, b, g)`` and inputs ``x``
        ``(t, b, h)``, both in factor-major order (as the compiled kernels write them)."""
        n = grad.shape[0] * grad.shape[1]
        grad, x = grad.view(n, -1), x.view(n, -1)
        if kron_grads_dense_first([tuple(a.shape) for a in self.mats], n):
            # the whole matrix's gradient in one GEMM, then the factors' from it as from the
            # rows of an identity
            dense = torch.matmul(grad.t(), x)  # (g, h): one GEMM over all rows
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)  # (h, h)
            return kron_grads(eye, dense.t(), self.mats, needs)
        return kron_grads(x, grad, self.mats, needs)

    def grads(self, grad: Tensor, h_prev: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        in_index, out_index = self.index
        if in_index is not None:  # both sides in factor-major order
            h_prev = h_prev.index_select(1, in_index)  # (n, h)
        if out_index is not None:
            grad = grad.index_select(1, torch.argsort(out_index))  # (n, g)
        return kron_grads(h_prev, grad, self.mats, needs)


def _some(t: Tensor | None) -> tuple[Tensor, ...]:
    return () if t is None else (t,)


def _rows(x: Tensor) -> Tensor:
    """``x`` ``(n, f)`` with unit stride along ``f`` (a copy only where it has not)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _product(spec: KronLayout | None, weights: Sequence[Tensor]) -> _Dense | _Kron:
    return _Dense(weights) if spec is None else _Kron(spec, weights)


def _previous(hs: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """The state before every step, indexed by time: ``(t, b, .)``."""
    if reverse:
        return torch.cat([hs[1:], h0[None]])
    return torch.cat([h0[None], hs[:-1]])


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
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prod = _product(spec, weights)
        ctx.native = isinstance(prod, _Kron) and prod.compiled(gates_x, h0, c0, *_some(bias))
        if ctx.native:
            assert isinstance(prod, _Kron)
            h0, c0, gx = h0.contiguous(), c0.contiguous(), _rows(gates_x)
            acts = gx.new_empty(steps, b, 4 * hidden)  # (t, b, 4h)
            hs = gx.new_empty(steps, b, hidden)  # (t, b, h)
            cs, tcs = torch.empty_like(hs), torch.empty_like(hs)  # (t, b, h)
            skip = _is_zero(h0)
            ctx.x_fm = torch.empty_like(hs) if any(ctx.needs_input_grad[6:]) else None
            native_rnn.lstm_forward(
                gx, bias, acts, h0, c0, hs, cs, tcs, reverse, skip, prod.args(), ctx.x_fm
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
            dgates = torch.empty_like(acts)  # (t, b, 4h)
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
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[6:])
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
        grad_w = prod.grads(flat, h_prev.view(steps * b, hidden), ctx.needs_input_grad[6:])
        grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None  # (4h,)
        return _lstm_grads(ctx, dgates, grad_w, grad_bias, dh, dc)


SCRATCH_MAX = 1 << 24
"""Elements of the largest buffer a thread keeps between backward passes for the gradient rows
that only the factor gradients read (larger ones are allocated at every call)."""

_SCRATCH = threading.local()


def _scratch(like: Tensor) -> Tensor:
    """An uninitialised tensor of ``like``'s shape, dtype and device that the caller drops
    before the next call on this thread: a buffer kept between calls up to :data:`SCRATCH_MAX`
    elements. Large fresh buffers come from the system as new pages, whose first writes cost
    about as much as the recurrence's backward loop itself at the speech size."""
    numel = like.numel()
    if numel > SCRATCH_MAX or like.device.type != "cpu":
        return torch.empty_like(like)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = _SCRATCH.buf = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(like.shape)


def _native_backward_buffers(
    ctx, like: Tensor, bias_at: int
) -> tuple[Tensor | None, Tensor | None]:
    """For a compiled backward: the factor-major gradient rows ``(t, b, g)`` when the factors'
    gradients are wanted (the forward kept their inputs; a reused buffer, read only by the
    factor gradients), and the bias gradient ``(g,)`` (zero) when wanted (``bias_at``: the
    bias's input position)."""
    d_fm = _scratch(like) if ctx.x_fm is not None else None
    wanted = ctx.has_bias and ctx.needs_input_grad[bias_at]
    dbias = like.new_zeros(like.shape[2]) if wanted else None
    return d_fm, dbias


def _native_weight_grads(ctx, d_fm: Tensor | None, needs: Sequence[bool]) -> list[Tensor | None]:
    if d_fm is None:
        return [None] * len(needs)
    return ctx.prod.grads_fm(d_fm, ctx.x_fm, needs)


def _fresh(grad: Tensor) -> Tensor:
    """A contiguous copy of an incoming gradient, for a kernel to overwrite."""
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)


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
    return dgates.view(steps * b, four_h), grad_h0, dc, grad_bias, None, None, *grad_w


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
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        b, hidden = h0.shape
        steps = gates_x.shape[0] // b if b else 0
        gh = gates_x.new_empty(steps, b, 3 * hidden)  # (t, b, 3h): W_hh h + b_hh of every step
        rz = gates_x.new_empty(steps, b, 2 * hidden)  # (t, b, 2h): the r and z gates
        ns = gates_x.new_empty(steps, b, hidden)  # (t, b, h)
        hs = gates_x.new_empty(steps, b, hidden)  # (t, b, h)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prod = _product(spec, weights)
        ctx.native = isinstance(prod, _Kron) and prod.compiled(gates_x, h0, *_some(bias))
        if ctx.native:
            assert isinstance(prod, _Kron)
            h0 = h0.contiguous()
            bias = None if bias is None else bias.contiguous()
            skip = _is_zero(h0)
            ctx.x_fm = torch.empty_like(hs) if any(ctx.needs_input_grad[5:]) else None
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
            dgx = torch.empty_like(gh)  # (t, b, 3h): gradients of the input projections
            dgh = torch.empty_like(gh)  # (t, b, 3h): gradients of W_hh h + b_hh
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
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[5:])
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
        grad_w = prod.grads(flat_h, h_prev.view(steps * b, hidden), ctx.needs_input_grad[5:])
        grad_bias = flat_h.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return _gru_grads(ctx, dgx, grad_w, grad_bias, dh)


def _gru_grads(
    ctx, dgx: Tensor, grad_w: Sequence[Tensor | None], grad_bias: Tensor | None, dh: Tensor
) -> tuple:
    """What :meth:`_GRUSequence.backward` returns, from the gradients of the input projections
    ``(t, b, 3h)``, the weights', the bias's and ``h0``'s."""
    steps, b, three_h = dgx.shape
    grad_h0 = dh if ctx.needs_input_grad[1] else None
    return dgx.view(steps * b, three_h), grad_h0, grad_bias, None, None, *grad_w


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
        ctx.native = isinstance(prod, _Kron) and prod.compiled(gates_x, h0, *_some(bias))
        if ctx.native:
            assert isinstance(prod, _Kron)
            h0 = h0.contiguous()
            bias = None if bias is None else bias.contiguous()
            hs = gates_x.new_empty(steps, b, hidden)  # (t, b, h)
            skip = _is_zero(h0)
            ctx.x_fm = torch.empty_like(hs) if any(ctx.needs_input_grad[6:]) else None
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
        dpre = torch.empty_like(hs)  # (t, b, h)
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
            grad_w = _native_weight_grads(ctx, d_fm, ctx.needs_input_grad[6:])
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
        out, h, c = _LSTMSequence.apply(gates_x, state[0], state[1], bias, reverse, kron, *weights)
        return out, (h, c)
    if mode == "GRU":
        out, h = _GRUSequence.apply(gates_x, state[0], bias, reverse, kron, *weights)
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
    return _LSTMSequence.apply(gates_x, h0, c0, bias, reverse, None, weight)


def gru_sequence(
    gates_x: Tensor, h0: Tensor, weight: Tensor, bias: Tensor | None = None, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """A single-direction GRU layer over equal-length sequences with a dense recurrent weight:
    ``gates_x`` ``W_ih x + b_ih`` ``(t b, 3h)`` (gates ``r, z, n``), ``h0`` ``(b, h)``, ``weight``
    ``W_hh`` ``(3h, h)``, ``bias`` ``b_hh`` (``b_hn`` stays inside the reset gate, as in
    ``torch.nn``). Returns ``(outputs (t b, h), h_n (b, h))``, the numbers of
    :func:`~kcprnn.rnn.gru_step` step by step, with a hand-written backward through time (no
    double backward)."""
    return _GRUSequence.apply(gates_x, h0, bias, reverse, None, weight)


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
