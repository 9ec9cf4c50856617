"""GEMM primitives shared by the formats.

:func:`tall_linear` is ``F.linear`` for the first contraction of a factorized product: many rows,
a few outputs. In float32 on CPU, both its forward and its weight gradient run on kcprnn's
compiled kernel (:mod:`._native`) where :func:`native_covers` the shape: MKL runs these
products at about 3x the time of reading the input, the kernel at 1.3-1.6x. Elsewhere its
forward is ``F.linear`` (oneDNN from ``ONEDNN_MIN_OUT`` outputs), and its backward computes the
weight gradient, a product whose inner dimension is the huge row count, as a sum of partial
products over blocks of rows: a single ``grad.T @ x`` over 15,360 rows (2 outputs, 360 inputs)
runs at a third of the speed of the blocked form on 2 threads (0.92 ms against 0.31 ms, torch
2.13), since BLAS parallelizes over the two small dimensions, not over the long inner one.

:func:`linear_nt` is ``a @ b.T`` without autograd, on oneDNN's inner product for float32 on CPU
where that beats MKL (the recurrent products of the fused LSTM/GRU).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native

__all__ = [
    "SCRATCH_MAX",
    "TALL_BLOCKS",
    "blocked_weight_grad",
    "linear_nt",
    "native_covers",
    "onednn_available",
    "onednn_covers",
    "scratch",
    "tall_forward_transposed",
    "tall_linear",
    "weight_grad",
]

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
    return (
        _ONEDNN_LINEAR is not None
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.shape[1] > 0
        and torch.backends.mkldnn.enabled
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )


ONEDNN_MIN_OUT = 8
"""Tall products with at least this many outputs run on oneDNN (:func:`tall_linear`): 15,360 x
360 rows at 2 threads, MKL/oneDNN ms: 2 outputs 0.38/0.58, 4 0.47/0.51, 8 0.92/0.56,
16 1.36/0.59, 64 3.85/1.58, 256 13.9/6.0."""
ONEDNN_MIN_INNER, ONEDNN_MIN_SIZE = 32, 1 << 17
"""Below ``TALL_MIN_ROWS`` rows, oneDNN still runs products with at least ``ONEDNN_MIN_INNER``
inputs and ``ONEDNN_MIN_SIZE`` input elements. Measured at 2 threads, MKL/oneDNN us (rows x
inputs -> outputs): 1,536 x 600 -> 32 311/151, 384 x 600 -> 32 80/47, 1,536 x 96 -> 32 50/33,
1,536 x 360 -> 16 106/60; below: 96 x 600 -> 32 23/23, 192 x 360 -> 16 16/18, 1,536 x 20 -> 16
9.5/14.5."""


def onednn_covers(rows: int, f: int, g: int) -> bool:
    """Whether a tall product of ``rows`` rows, ``f`` inputs and ``g`` outputs runs on oneDNN
    (:func:`tall_linear`, where the compiled kernel does not): ``ONEDNN_MIN_OUT`` outputs or
    more, and ``TALL_MIN_ROWS`` rows or ``ONEDNN_MIN_INNER`` inputs over ``ONEDNN_MIN_SIZE``
    input elements."""
    return (
        g >= ONEDNN_MIN_OUT
        and (rows >= TALL_MIN_ROWS or (f >= ONEDNN_MIN_INNER and rows * f >= ONEDNN_MIN_SIZE))
        and onednn_available()
    )


def native_covers(rows: int, f: int, g: int) -> bool:
    """Whether a float32 product of ``rows`` rows, ``f`` inputs and ``g`` outputs runs on the
    compiled kernel (:mod:`._native`, when it is available): at least ``NATIVE_MIN_SIZE`` input
    elements and at most ``NATIVE_MAX_OUT`` outputs (8 only for rows of up to
    ``NATIVE_LONG_ROW`` values, whose blocks of rows stay in cache between passes)."""
    return (
        g <= NATIVE_MAX_OUT
        and (g <= NATIVE_MAX_OUT // 2 or f <= NATIVE_LONG_ROW)
        and rows * f >= NATIVE_MIN_SIZE
        and _native.available()
    )


def native_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` (``x`` ``(..., f)``, ``weight`` ``(g, f)``) runs on the compiled
    kernel: :func:`native_covers` the shape, float32 on CPU, no autograd."""
    g, f = weight.shape
    return (
        x.shape[-1] == f and native_covers(x.numel() // max(f, 1), f, g) and _native.fits(x, weight)
    )


NATIVE_MAX_OUT = 8
NATIVE_LONG_ROW = 4096
NATIVE_MIN_SIZE = 32768
"""The compiled kernel's range (:func:`native_covers`), from ``benchmarks/bench_tall.py`` at 2
threads (``benchmarks/results/tall``), us for MKL / oneDNN / kernel: 15,360 x 360 with 1 output
446/213/188, 2 374/498/184, 4 470/477/238, 8 897/483/396, 16 1,238/525/716; 96 x 57,600 with 8
outputs 1,369/586/864 (long rows: 8 outputs re-read them); 960 x 64 with 4 outputs
10.2/16.2/8.7; 192 x 8 with 2 outputs 4.3/11.6/5.6."""


def _tall_forward(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` without autograd: on the compiled kernel where
    :func:`native_fits`, else on oneDNN where it :func:`onednn_covers` the shape (elsewhere, e.g.
    1,536 x 20 -> 16, MKL is faster)."""
    if native_fits(x, weight):
        out = x.new_empty(1, x.shape[0], weight.shape[0])  # (1, m, g)
        return _native.tall_matmul(x.unsqueeze(0), weight, out)[0]  # (m, g)
    if onednn_covers(x.shape[0], x.shape[1], weight.shape[0]):
        return linear_nt(x, weight)  # (m, g)
    return F.linear(x, weight)  # (m, g)


def tall_forward_transposed(x: Tensor, weight: Tensor) -> Tensor | None:
    """``F.linear(x, weight).transpose(1, 2)`` as a contiguous ``(B, g, E)`` tensor, for ``x``
    ``(B, E, f)`` and ``weight`` ``(g, f)``, written in that layout by the compiled kernel
    (saving the transposing copy, 13 us of 300 at the UCF11 size); ``None`` where the kernel
    does not run the product (:func:`native_fits`): the caller transposes."""
    if not native_fits(x, weight):
        return None
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[1])  # (B, g, E)
    _native.tall_matmul(x, weight, out.transpose(1, 2))
    return out  # (B, g, E)


TALL_BLOCKS = 32
"""Blocks of rows of the weight gradient (32 and 128 measured equal, 8 slower, 1 slowest)."""
TALL_MIN_ROWS = 64 * TALL_BLOCKS  # fewer rows: one plain GEMM


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` for ``grad`` ``(m, g)`` and ``x`` ``(m, f)``: ``(g, f)``. On the compiled
    kernel where it :func:`native_covers` the shape (float32 on CPU; 15,360 x 360 rows, 2
    outputs: 0.20 ms against 0.32 blocked and 0.67 as one GEMM, ``benchmarks/bench_tall.py
    --grad``), else as a sum over blocks of rows when ``m`` is large."""
    if native_covers(x.shape[0], x.shape[1], grad.shape[1]) and _native.fits(x, grad):
        return _native.tall_weight_grad(grad, x)  # (g, f)
    return blocked_weight_grad(grad, x)  # (g, f)


def blocked_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` on torch: one GEMM below ``TALL_MIN_ROWS`` rows, else ``TALL_BLOCKS``
    partial products summed."""
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


SCRATCH_MAX = 1 << 22
"""Largest buffer (elements) :func:`scratch` keeps per slot and thread: 16 MB in float32."""
_SCRATCH = threading.local()


def scratch(slot: int, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """A buffer of ``shape`` (``like``'s dtype and device) reused between calls: slot ``slot`` of
    this thread's CPU buffers, or ``None`` on other devices or beyond ``SCRATCH_MAX`` elements.

    For the gathering copies of inference products, whose results a GEMM reads at once and
    drops. Fresh allocations of that size are served by glibc with new pages, returned to the
    system on free (``mmap``, or a heap trim above the trim threshold) and page-faulted in again
    at every call: KCP's interleaved layout at the UCF11 size, R = 4, 96 rows, measured 14.4 ms
    that way, 5.8 ms with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set. Callers
    must not let the buffer escape (no autograd graph, nothing returned or saved): the next call
    overwrites it."""
    numel = 1
    for n in shape:
        numel *= n
    if like.device.type != "cpu" or numel > SCRATCH_MAX:
        return None
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of that mode
            buf = buffers[slot] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)
