"""GEMM primitives shared by the formats.

:func:`tall_linear` is ``F.linear`` for the first contraction of a factorized product: many rows,
a few outputs. Its forward is ``F.linear``; its backward computes the weight gradient, a product
whose inner dimension is the huge row count, as a sum of partial products over blocks of rows.
A single ``grad.T @ x`` over 15,360 rows (2 outputs, 360 inputs) runs at a third of the speed
of the blocked form on 2 threads (0.92 ms against 0.31 ms, torch 2.13): BLAS parallelizes over
the two small dimensions, not over the long inner one. (oneDNN, timed alone on the same
product, was 10 % faster, but 10 % slower inside a forward and backward pass.)

:func:`linear_nt` is ``a @ b.T`` without autograd, on oneDNN's inner product for float32 on CPU
where that beats MKL (the recurrent products of the fused LSTM/GRU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TALL_BLOCKS", "linear_nt", "onednn_available", "tall_linear", "weight_grad"]

try:  # oneDNN's fp32 inner product (Inductor's CPU linear); absent from builds without oneDNN
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _ONEDNN_LINEAR = None


def linear_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for ``a`` ``(m, k)`` and ``b`` ``(n, k)`` (any strides), without autograd.

    On CPU in float32 it runs oneDNN's inner product when torch has it (and
    ``torch.backends.mkldnn.enabled``): on the AMD EPYC these benchmarks run on, MKL takes
    its generic (non-AVX-512) path and oneDNN is 1.5-2x faster for the recurrent products of
    the fused LSTM/GRU (16 x 256 @ 256 x 1024: 60 -> 38 us; the ``W_hh`` weight gradient,
    1024 x 96 @ 96 x 256: 228 -> 111 us). Elsewhere, and whenever a gradient is needed, it is
    ``a.mm(b.t())``. Not every shape gains: :func:`tall_linear` sends only products with
    ``ONEDNN_MIN_OUT`` outputs and ``TALL_MIN_ROWS`` rows or more here.
    """
    if _onednn_fits(a, b):
        return _ONEDNN_LINEAR(a, b, None, "none", [], "")  # (m, n)
    return a.mm(b.t())  # (m, n)


def onednn_available() -> bool:
    """Whether :func:`linear_nt` and tall products can use oneDNN in this process."""
    return _ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled


def _onednn_fits(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`linear_nt` may run ``a @ b.T`` on oneDNN."""
    return (_ONEDNN_LINEAR is not None and a.dtype == torch.float32
            and b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"
            and a.shape[1] > 0 and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


ONEDNN_MIN_OUT = 8
"""Tall products with at least this many outputs run on oneDNN (:func:`tall_linear`): 15,360 x
360 rows at 2 threads, MKL/oneDNN ms: 2 outputs 0.38/0.58, 4 0.47/0.51, 8 0.92/0.56,
16 1.36/0.59, 64 3.85/1.58, 256 13.9/6.0."""


def _tall_forward(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` without autograd, on oneDNN from ``ONEDNN_MIN_OUT`` outputs and
    ``TALL_MIN_ROWS`` rows (below, e.g. 1,536 x 20 -> 16, MKL is faster)."""
    if weight.shape[0] >= ONEDNN_MIN_OUT and x.shape[0] >= TALL_MIN_ROWS:
        return linear_nt(x, weight)  # (m, g)
    return F.linear(x, weight)  # (m, g)


TALL_BLOCKS = 32
"""Blocks of rows of the weight gradient (32 and 128 measured equal, 8 slower, 1 slowest)."""
TALL_MIN_ROWS = 64 * TALL_BLOCKS  # fewer rows: one plain GEMM


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` for ``grad`` ``(m, g)`` and ``x`` ``(m, f)``: ``(g, f)``, as a sum over
    blocks of rows when ``m`` is large."""
    m = x.shape[0]
    if m < TALL_MIN_ROWS:
        return grad.t().mm(x)  # (g, f)
    step = m // TALL_BLOCKS
    head = step * TALL_BLOCKS
    gb = grad[:head].reshape(TALL_BLOCKS, step, -1).transpose(1, 2)  # (c, g, step)
    out = torch.bmm(gb, x[:head].view(TALL_BLOCKS, step, -1)).sum(0)  # (g, f)
    if head < m:
        out = out + grad[head:].t().mm(x[head:])  # (g, f)
    return out


class _TallLinear(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: with setup_context, every apply binds the
    # arguments through inspect.signature (about 40 us)
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _tall_forward(x, weight)  # (m, g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (m, f)
        grad_w = weight_grad(grad, x) if ctx.needs_input_grad[1] else None  # (g, f)
        return grad_x, grad_w


def tall_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` for ``x`` ``(m, f)`` and ``weight`` ``(g, f)``, whose weight
    gradient is computed by :func:`weight_grad`. x must be contiguous (it is a view of the input
    in the products that use it)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _tall_forward(x, weight)  # (m, g)
    if x.shape[0] < TALL_MIN_ROWS:
        return F.linear(x, weight)  # (m, g)
    return _TallLinear.apply(x.contiguous(), weight)  # (m, g)

