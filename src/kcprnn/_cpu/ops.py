"""GEMM routing: which implementation runs each product of the formats on this machine.

:func:`tall_linear` is ``F.linear`` for the first contraction of a factorized product: many rows,
a few outputs. In float32 on CPU both its forward and its weight gradient run on kcprnn's
compiled kernel (:mod:`.native`) where :func:`native_covers` the shape; elsewhere its forward is
``F.linear`` (oneDNN from ``onednn_min_out`` outputs), and its backward computes the weight
gradient, a product whose inner dimension is the huge row count, as a sum of partial products
over blocks of rows (BLAS parallelizes over the two small dimensions, not over the long inner
one). :func:`linear_nt` is ``a @ b.T`` without autograd, on oneDNN's inner product for float32
on CPU (the recurrent products of the fused LSTM/GRU).

Every threshold comes from a :class:`~kcprnn._cpu.cost.CostModel` passed in (default
:func:`~kcprnn._cpu.cost.default_cost_model`). Deciding a route never builds the compiled
kernels: :func:`native_covers` answers from the model, :func:`native_fits` (run time) also
asks whether the kernel can run.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native as _native
from .cost import CostModel, default_cost_model

__all__ = [
    "blocked_weight_grad",
    "gemm_price",
    "linear_terms",
    "linear_nt",
    "native_covers",
    "native_fits",
    "onednn_available",
    "onednn_covers",
    "onednn_gemm_wins",
    "onednn_weight_grad",
    "scratch",
    "tall_forward_transposed",
    "tall_linear",
    "weight_grad",
    "weight_grad_onednn",
    "weight_grad_terms",
]

_ONEDNN_LINEAR: Any
try:  # oneDNN's fp32 inner product (Inductor's CPU linear); absent from builds without oneDNN
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _ONEDNN_LINEAR = None


def linear_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b.T`` (plus ``bias`` ``(n,)`` if given) for ``a`` ``(m, k)`` and ``b`` ``(n, k)``
    (any strides), without autograd.

    On CPU in float32 it runs oneDNN's inner product when torch has it (and
    ``torch.backends.mkldnn.enabled``): where MKL takes its generic (non-AVX-512) path, oneDNN
    runs the recurrent products of the fused LSTM/GRU faster. Elsewhere, and whenever a
    gradient is needed, it is ``a.mm(b.t())``. Not every shape gains: :func:`tall_linear` sends
    only the shapes :func:`onednn_covers` here.
    """
    if _onednn_fits(a, b):
        return _ONEDNN_LINEAR(a, b, bias, "none", [], "")  # (m, n)
    return a.mm(b.t()) if bias is None else torch.addmm(bias, a, b.t())  # (m, n)


def onednn_available() -> bool:
    """Whether :func:`linear_nt` and tall products can use oneDNN in this process."""
    return _ONEDNN_LINEAR is not None and bool(torch.backends.mkldnn.enabled)


def _onednn_fits(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`linear_nt` may run ``a @ b.T`` on oneDNN."""
    return (
        _ONEDNN_LINEAR is not None
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.shape[1] > 0
        and bool(torch.backends.mkldnn.enabled)
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )


def gemm_price(macs: int, made: tuple[int, ...], copied: int, model: CostModel) -> float:
    """The price of a large float32 product of a sequence's rows (``macs`` MACs; on oneDNN it
    allocates blocks of ``made`` elements and copies ``copied`` elements of transposed
    operands) on the cheaper of MKL (``macs``: it writes into memory kept between calls) and,
    where ``model.onednn``, oneDNN (``macs * onednn_gemm``, ``onednn_call``, ``onednn_copy``
    per copied element and ``fault`` per element of each block above ``rnn_torch_mmap``
    elements, which glibc maps fresh at every call)."""
    if not (model.onednn and model.onednn_gemm < 1.0):
        return float(macs)
    faults = sum(n for n in made if n > model.rnn_torch_mmap)
    price = macs * model.onednn_gemm + model.onednn_call + copied * model.onednn_copy
    return min(float(macs), price + faults * model.fault)


def linear_terms(rows: int, f: int, g: int) -> tuple[int, tuple[int, ...], int]:
    """:func:`gemm_price`'s terms of ``x @ W.T`` for ``x`` ``(rows, f)`` and ``W`` ``(g, f)``:
    its MACs, oneDNN's fresh ``(rows, g)`` output, no copy."""
    return rows * f * g, (rows * g,), 0


def weight_grad_terms(rows: int, g: int, f: int) -> tuple[int, tuple[int, ...], int]:
    """:func:`gemm_price`'s terms of ``grad.T @ x`` for ``grad`` ``(rows, g)`` and ``x``
    ``(rows, f)`` as :func:`weight_grad_onednn` runs it: its MACs, the narrower operand copied
    transposed by oneDNN (a fresh block; the other enters as the weights it reorders) and, where
    that is ``x``, the ``(f, g)`` result transposed."""
    if f <= g:
        return rows * g * f, (rows * f,), rows * f + f * g
    return rows * g * f, (rows * g,), rows * g


def onednn_gemm_wins(
    macs: int, made: tuple[int, ...], copied: int, model: CostModel, dtype: torch.dtype
) -> bool:
    """Whether such a product (:func:`gemm_price`) prices lower on oneDNN than on MKL, in
    ``dtype`` (float32 only) where oneDNN runs (:func:`onednn_available`)."""
    return (
        dtype == torch.float32
        and gemm_price(macs, made, copied, model) < macs
        and onednn_available()
    )


def weight_grad_onednn(grad: Tensor, x: Tensor, model: CostModel) -> Tensor | None:
    """``grad.T @ x`` (``(n, g)``, ``(n, f)`` -> ``(g, f)``) on oneDNN
    (:func:`onednn_weight_grad`) where it prices lower (:func:`onednn_gemm_wins` with
    :func:`weight_grad_terms`); ``None`` elsewhere."""
    (n, g), f = grad.shape, x.shape[1]
    if grad.device.type != "cpu" or not onednn_gemm_wins(
        *weight_grad_terms(n, g, f), model, grad.dtype
    ):
        return None
    return onednn_weight_grad(grad, x)  # (g, f)


def onednn_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` (``(n, g)``, ``(n, f)`` -> ``(g, f)``, contiguous) by
    :func:`linear_nt` (oneDNN's inner product where it runs).

    oneDNN copies its inner product's source operand transposed into fresh memory and reorders
    the weights from any strides, so the wider operand enters as the weights: with fewer inputs
    ``f`` than gate rows ``g`` it runs as ``(x.T @ grad).T`` (over 4,800 rows of 1,024 gates the
    source's copy would be 20 MB, most of it page faults) and only the small ``(f, g)`` result
    is transposed; else as ``grad.T @ x``."""
    if x.shape[1] <= grad.shape[1]:
        return linear_nt(x.t(), grad.t()).t().contiguous()  # (g, f)
    return linear_nt(grad.t(), x.t())  # (g, f)


def onednn_covers(rows: int, f: int, g: int, model: CostModel) -> bool:
    """Whether a tall product of ``rows`` rows, ``f`` inputs and ``g`` outputs runs on oneDNN
    (:func:`tall_linear`, where the compiled kernel does not): ``model.onednn``,
    ``onednn_min_out`` outputs or more, and ``tall_min_rows`` rows or ``onednn_min_inner``
    inputs over ``onednn_min_size`` input elements."""
    return (
        model.onednn
        and g >= model.onednn_min_out
        and (
            rows >= model.tall_min_rows
            or (f >= model.onednn_min_inner and rows * f >= model.onednn_min_size)
        )
        and onednn_available()
    )


def native_covers(rows: int, f: int, g: int, model: CostModel) -> bool:
    """Whether ``model`` plans a float32 product of ``rows`` rows, ``f`` inputs and ``g``
    outputs on the compiled kernel: ``model.kernels``, at least ``native_min_size`` input
    elements and at most ``native_max_out`` outputs (more than half that only on rows of at
    most ``native_long_row`` values, whose blocks of rows stay in cache between passes). Never
    builds the kernel: the answer does not depend on whether it can be built."""
    return (
        model.kernels
        and g <= model.native_max_out
        and (g <= model.native_max_out // 2 or f <= model.native_long_row)
        and rows * f >= model.native_min_size
    )


def native_fits(x: Tensor, weight: Tensor, model: CostModel | None = None) -> bool:
    """Whether ``x @ weight.T`` (``x`` ``(..., f)``, ``weight`` ``(g, f)``) runs on the compiled
    kernel now: :func:`native_covers` the shape, float32 on CPU, no autograd, and the kernel
    can run (built on first use)."""
    model = default_cost_model() if model is None else model
    g, f = weight.shape
    return (
        x.shape[-1] == f
        and native_covers(x.numel() // max(f, 1), f, g, model)
        and _native.fits(x, weight)
    )


def _tall_forward(x: Tensor, weight: Tensor, model: CostModel) -> Tensor:
    """``F.linear(x, weight)`` without autograd: on the compiled kernel where
    :func:`native_fits`, else on oneDNN where it :func:`onednn_covers` the shape (elsewhere
    MKL is faster)."""
    if native_fits(x, weight, model):
        out = x.new_empty(1, x.shape[0], weight.shape[0])  # (1, m, g)
        return _native.tall_matmul(x.unsqueeze(0), weight, out)[0]  # (m, g)
    if onednn_covers(x.shape[0], x.shape[1], weight.shape[0], model):
        return linear_nt(x, weight)  # (m, g)
    return F.linear(x, weight)  # (m, g)


def tall_forward_transposed(
    x: Tensor, weight: Tensor, model: CostModel | None = None
) -> Tensor | None:
    """``F.linear(x, weight).transpose(1, 2)`` as a contiguous ``(B, g, E)`` tensor, for ``x``
    ``(B, E, f)`` and ``weight`` ``(g, f)``, written in that layout by the compiled kernel
    (saving the transposing copy); ``None`` where the kernel does not run the product
    (:func:`native_fits`): the caller transposes."""
    if not native_fits(x, weight, model):
        return None
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[1])  # (B, g, E)
    _native.tall_matmul(x, weight, out.transpose(1, 2))
    return out  # (B, g, E)


def weight_grad(grad: Tensor, x: Tensor, model: CostModel | None = None) -> Tensor:
    """``grad.T @ x`` for ``grad`` ``(m, g)`` and ``x`` ``(m, f)``: ``(g, f)``. On the compiled
    kernel where it :func:`native_covers` the shape (float32 on CPU), else as a sum over
    blocks of rows when ``m`` is large (:func:`blocked_weight_grad`)."""
    model = default_cost_model() if model is None else model
    if native_covers(x.shape[0], x.shape[1], grad.shape[1], model) and _native.fits(x, grad):
        return _native.tall_weight_grad(grad, x)  # (g, f)
    return blocked_weight_grad(grad, x, model)  # (g, f)


def blocked_weight_grad(grad: Tensor, x: Tensor, model: CostModel | None = None) -> Tensor:
    """``grad.T @ x`` on torch: one GEMM below ``tall_min_rows`` rows, else ``tall_blocks``
    partial products summed."""
    model = default_cost_model() if model is None else model
    m, blocks = x.shape[0], model.tall_blocks
    if m < model.tall_min_rows or m < blocks:
        return grad.t().mm(x)  # (g, f)
    step = m // blocks
    head = step * blocks
    gb = grad[:head].reshape(blocks, step, -1).transpose(1, 2)  # (c, g, step)
    out = torch.bmm(gb, x[:head].view(blocks, step, -1)).sum(0)  # (g, f)
    if head < m:
        out = out + grad[head:].t().mm(x[head:])  # (g, f)
    return out


class _TallLinear(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: with setup_context, every apply binds the
    # arguments through inspect.signature (tens of microseconds)
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, model: CostModel) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.model = model
        return _tall_forward(x, weight, model)  # (m, g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None  # (m, f)
        grad_w = weight_grad(grad, x, ctx.model) if ctx.needs_input_grad[1] else None  # (g, f)
        return grad_x, grad_w, None


def tall_linear(x: Tensor, weight: Tensor, model: CostModel | None = None) -> Tensor:
    """``F.linear(x, weight)`` for ``x`` ``(m, f)`` and ``weight`` ``(g, f)``, whose weight
    gradient is computed by :func:`weight_grad`. x must be contiguous (it is a view of the input
    in the products that use it)."""
    model = default_cost_model() if model is None else model
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _tall_forward(x, weight, model)  # (m, g)
    if x.shape[0] < model.tall_min_rows:
        return F.linear(x, weight)  # (m, g)
    return _TallLinear.apply(x.contiguous(), weight, model)  # (m, g)


_SCRATCH = threading.local()


def scratch(
    slot: int, shape: tuple[int, ...], like: Tensor, model: CostModel | None = None
) -> Tensor | None:
    """A buffer of ``shape`` (``like``'s dtype and device) reused between calls: slot ``slot`` of
    this thread's CPU buffers, or ``None`` on other devices or beyond ``model.scratch_max``
    elements.

    For the gathering copies of inference products, whose results a GEMM reads at once and
    drops. Fresh allocations of that size are served by glibc with new pages, returned to the
    system on free (``mmap``, or a heap trim above the trim threshold) and page-faulted in again
    at every call. Callers must not let the buffer escape (no autograd graph, nothing returned
    or saved): the next call overwrites it."""
    numel = 1
    for n in shape:
        numel *= n
    limit = (default_cost_model() if model is None else model).scratch_max
    if like.device.type != "cpu" or numel > limit:
        return None
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of that mode
            buf = buffers[slot] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)
