"""What the fused recurrences of :mod:`kcprnn.rnn.fused` share: the recurrent products
(dense ``W_hh`` or a Kronecker sum, the latter also for the compiled kernels), the buffers the
compiled loops fill, and small helpers.

Shape comments: ``t`` time steps, ``b`` batch, ``h`` hidden size, ``n = t*b`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import default_cost_model, native, native_dense, native_rnn
from .._cpu.buffers import pooled_empty, scratch
from .._cpu.ops import linear_nt, onednn_weight_grad, weight_grad_onednn
from .kron import (
    KronLayout,
    kron_apply,
    kron_grads,
    kron_grads_dense_first,
    kron_grads_from_dense,
)


def _recurrent_weight_grad(grad: Tensor, h_prev: Tensor) -> Tensor:
    """``grad.T @ h_prev``: ``(n, g)``, ``(n, h)`` -> ``(g, h)``, the recurrent weight's gradient
    over all steps in one GEMM: oneDNN's (:func:`~kcprnn._cpu.ops.onednn_weight_grad`), or torch's
    ``mm`` over more rows than the cost model's ``recurrent_grad_mm_rows`` (faster there) unless
    oneDNN's product prices lower there (:func:`~kcprnn._cpu.ops.weight_grad_onednn`)."""
    model = default_cost_model()
    if grad.shape[0] > model.recurrent_grad_mm_rows:
        fast = weight_grad_onednn(grad, h_prev, model)
        return grad.t().mm(h_prev) if fast is None else fast  # (g, h)
    return onednn_weight_grad(grad, h_prev)  # (g, h)


def _is_zero(h: Tensor) -> bool:
    """Whether a CPU state is all zeros (a cheap check there; on accelerators it would wait for
    the device, so they always run the product)."""
    return h.device.type == "cpu" and not bool(h.any())


def _native_ok(*tensors: Tensor) -> bool:
    """Whether the compiled recurrences can run on ``tensors``: float32 on the CPU, and the
    kernels built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and (
        native.available()
    )


class _Dense:
    """The recurrent products with a dense ``W_hh`` ``(g, h)``."""

    def __init__(self, weights: Sequence[Tensor]) -> None:
        (self.weight,) = weights

    def compiled(self, *tensors: Tensor) -> bool:
        """Whether the compiled recurrence steps run with ``tensors`` (as :meth:`_Kron.compiled`),
        each step's product on oneDNN (:class:`~kcprnn._cpu.native_dense.DenseArgs`)."""
        return _native_ok(self.weight, *tensors)

    def args(self) -> native_dense.DenseArgs:
        """``W`` for the compiled steps."""
        return native_dense.DenseArgs(self.weight)

    def args_t(self) -> native_dense.DenseArgs:
        """``W.T`` for the compiled steps."""
        return native_dense.DenseArgs(self.weight.t())

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
        self._out_inverse: Tensor | None = None  # natural -> factor-major outputs, made once

    def compiled(self, *tensors: Tensor) -> bool:
        """Whether the compiled recurrence kernels run this product with ``tensors``: all
        float32 on the CPU, and the kernels built."""
        return _native_ok(*self.mats, *tensors)

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
        model = default_cost_model()
        if kron_grads_dense_first([tuple(a.shape) for a in self.mats], n, model):
            # the whole matrix's gradient in one GEMM, then the factors' from it
            dense = _recurrent_weight_grad(grad, x)  # (g, h): one GEMM over all rows
            return kron_grads_from_dense(dense, self.mats, needs)
        return kron_grads(x, grad, self.mats, needs)

    def grads(self, grad: Tensor, h_prev: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        in_index, out_index = self.index
        if in_index is not None:  # both sides in factor-major order
            h_prev = h_prev.index_select(1, in_index)  # (n, h)
        if out_index is not None:
            if self._out_inverse is None:
                self._out_inverse = torch.argsort(out_index)
            grad = grad.index_select(1, self._out_inverse)  # (n, g)
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


def _native_backward_buffers(
    ctx, like: Tensor, bias_at: int
) -> tuple[Tensor | None, Tensor | None]:
    """For a compiled backward: the factor-major gradient rows ``(t, b, g)`` when the factors'
    gradients are wanted (the forward kept their inputs; a reused buffer, read only by the
    factor gradients), and the bias gradient ``(g,)`` (zero) when wanted (``bias_at``: the
    bias's input position)."""
    d_fm = scratch(like) if ctx.x_fm is not None else None
    wanted = ctx.has_bias and ctx.needs_input_grad[bias_at]
    dbias = like.new_zeros(like.shape[2]) if wanted else None
    return d_fm, dbias


def _native_weight_grads(
    ctx, d_fm: Tensor | None, needs: Sequence[bool], grad: Tensor, h0: Tensor, hs: Tensor
) -> list[Tensor | None]:
    """The recurrent weights' gradients after a compiled backward: a Kronecker sum's from the
    factor-major rows ``d_fm`` and ``ctx.x_fm``; a dense ``W_hh``'s from all steps' gradients
    ``grad`` ``(t, b, g)`` and the states before every step (``h0``, ``hs`` ``(t, b, h)``)."""
    if isinstance(ctx.prod, _Dense):
        if not any(needs):
            return [None] * len(needs)
        n = grad.shape[0] * grad.shape[1]
        h_prev = _previous(hs, h0, ctx.reverse).view(n, hs.shape[2])  # (n, h)
        return ctx.prod.grads(grad.view(n, grad.shape[2]), h_prev, needs)
    if d_fm is None:
        return [None] * len(needs)
    return ctx.prod.grads_fm(d_fm, ctx.x_fm, needs)


def _factor_rows(prod: _Dense | _Kron, like: Tensor, needs: Sequence[bool]) -> Tensor | None:
    """For a compiled forward: the buffer ``like`` ``(t, b, h)`` receives the state before every
    step in factor-major order, where a Kronecker sum's factor gradients are wanted."""
    return _empty(like, *like.shape) if isinstance(prod, _Kron) and any(needs) else None


def _empty(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised ``shape`` tensor of ``like``'s dtype and device for a compiled loop to
    fill: a pooled buffer (:func:`~kcprnn._cpu.buffers.pooled_empty`), warm after the first
    call of the same shapes."""
    return pooled_empty(shape, like.dtype, like.device)


def _fresh(grad: Tensor) -> Tensor:
    """A contiguous copy of an incoming gradient, for a kernel to overwrite."""
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device).copy_(grad)
