"""The compiled recurrences of :mod:`kcprnn._cpu.native_rnn` with a dense hidden-to-hidden
matrix: each step's product ``W_hh h`` runs on oneDNN's inner product, with ``W_hh`` packed once
per call after the first :data:`PACK_AFTER` steps (:class:`DenseArgs`), and the rest of the
step (the gate arithmetic of every row, the bias, the bias gradient) in one call of the compiled
step (``kcprnn_*_step`` in ``native_rnn.cpp``), two calls per step in all instead of about a
dozen torch operations.

On this kind of CPU (AVX-512 without Intel's MKL fast path) the packed product is the fastest
GEMM torch ships for ``(16, 512) @ (512, 2048)``: about 0.32 ms against 0.42 ms for oneDNN on
the unpacked weight and 0.46 ms for MKL (``benchmarks/results/recurrence/dense-loop/``).

The loops take the checked tensors from :mod:`kcprnn._cpu.native_rnn`'s functions, which call
them when their ``kron`` argument is a :class:`DenseArgs`.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from . import native
from .ops import linear_nt

__all__ = [
    "PACK_AFTER",
    "SMALL_MM_ELEMENTS",
    "SMALL_MM_IN",
    "DenseArgs",
    "declare",
    "small_product",
]

_PACK: Any
_PACKED_LINEAR: Any
try:  # oneDNN's weight packing and its fp32 inner product on the packed weight
    _PACK = torch.ops.mkldnn._reorder_linear_weight
    _PACKED_LINEAR = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _PACK = _PACKED_LINEAR = None


PACK_AFTER = 8
"""Products a :class:`DenseArgs` runs on the weight as it is before packing it for oneDNN:
packing costs about ten products' saving (0.25 ms for 1,024 x 256, 1 ms for 2,048 x 512), so a
short sequence (the video layer's 6 frames) never pays it."""


SMALL_MM_ELEMENTS = 65_536
"""A ``W`` of at most this many elements and at most :data:`SMALL_MM_IN` columns is multiplied
by ``torch.mm``, never packed: oneDNN's packed product costs about 12-17 us a call beyond its
arithmetic, which ``torch.mm`` does not pay (per step at 16-64 rows: ``128 -> 512`` 23-58 us
against 33-69 packed, ``256 -> 256`` 22-59 against 30-66, ``384 -> 128`` 21-49 against 27-52),
while from 512 columns, or ``256 -> 768`` and up, the packed product is as fast or faster
(``512 -> 128`` at 16 rows: 28 us against 36; ``benchmarks/ab_small_recurrent_gemm.py``)."""

SMALL_MM_IN = 384
"""The most columns a ``W`` multiplied by ``torch.mm`` has (:data:`SMALL_MM_ELEMENTS`)."""


def small_product(in_features: int, out_features: int) -> bool:
    """Whether :class:`DenseArgs` multiplies a ``W`` ``(out_features, in_features)`` by
    ``torch.mm`` unpacked (:data:`SMALL_MM_ELEMENTS`, :data:`SMALL_MM_IN`)."""
    return in_features <= SMALL_MM_IN and in_features * out_features <= SMALL_MM_ELEMENTS


class DenseArgs:
    """A dense ``W`` ``(out, in)`` as the recurrence loops take it: :meth:`mul` computes
    ``x @ W.T`` by ``torch.mm`` for a small ``W`` (:data:`SMALL_MM_ELEMENTS`), else on
    :func:`~kcprnn._cpu.ops.linear_nt`, and from the call after :data:`PACK_AFTER` on ``W``
    packed for oneDNN where torch can (float32 on the CPU with oneDNN enabled)."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight.detach()
        self.out_features, self.in_features = self.weight.shape
        self._packed: Tensor | None = None
        self._plain: Tensor | None = None
        self._calls = 0
        self._small = small_product(self.in_features, self.out_features)
        self._pack = (
            not self._small
            and _PACK is not None
            and bool(torch.backends.mkldnn.enabled)
            and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu"
        )

    def mul(self, x: Tensor) -> Tensor:
        """``x @ W.T``: ``(m, in)`` -> ``(m, out)``, a new contiguous tensor."""
        if self._small:
            return torch.mm(x, self.weight.t())  # (m, out)
        self._calls += 1
        if self._pack and self._packed is None and self._calls > PACK_AFTER:
            try:
                self._packed = _PACK(self.weight.contiguous(), max(x.shape[0], 1))
            except RuntimeError:  # pragma: no cover - a build whose packing refuses the shape
                self._pack = False
        if self._packed is not None:
            return _PACKED_LINEAR(x, self._packed, None, "none", [], "")  # (m, out)
        if self._plain is None:
            self._plain = self.weight.contiguous()  # (out, in): W.T's view copied once
        return linear_nt(x, self._plain).contiguous()  # (m, out)

    def macs(self, rows: int) -> int:
        """Multiply-accumulates of one product over ``rows`` rows."""
        return rows * self.in_features * self.out_features


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _forward(step, gx, strides, bias, h0, hs, reverse, skip, w, tail) -> None:
    """A forward loop: ``step(s, steps, batch, hidden, gx, ldx, ldt, bias, a, *tail)`` for every
    iteration ``s`` (``strides``: ``(ldx, ldt)``, the input projections' row strides along the
    batch and along time), ``a`` the product ``W_hh h`` of the state before it (``h0``, then the
    ``hs`` the steps write; skipped at the first where ``skip``)."""
    steps, b, h = hs.shape
    head = (gx.data_ptr(), *strides, _p(bias))
    state = h0
    for s in range(steps):
        a = None if s == 0 and skip else w.mul(state)  # (b, g)
        step(s, steps, b, h, *head, _p(a), *tail)
        state = hs[steps - 1 - s if reverse else s]


def _backward(step, head, tail, grads, reverse, need_h0, w_t) -> Tensor | None:
    """A backward loop: ``step(s, steps, batch, hidden, *head, a, *tail)`` for every iteration
    ``s``, ``a`` the previous iteration's ``W_hh^T d`` (``None`` at the first) with ``d`` its
    rows of ``grads`` ``(t, b, g)``; returns the last product (the gradient reaching ``h0``) when
    ``need_h0``, else ``None``."""
    steps, b, _ = grads.shape
    h = w_t.out_features
    ptrs = [t.data_ptr() for t in head]
    a: Tensor | None = None
    for s in range(steps):
        step(s, steps, b, h, *ptrs, _p(a), *tail)
        if s < steps - 1 or need_h0:  # the step's rows: time steps-1-s, or s in reverse
            a = w_t.mul(grads[s if reverse else steps - 1 - s])  # (b, h)
    return a if need_h0 and steps else None


def lstm_forward(lib, gx, strides, bias, gates, h0, c0, hs, cs, tcs, reverse, skip, w, keep):
    """:func:`kcprnn._cpu.native_rnn.lstm_forward` with a dense ``W_hh`` ``w``."""
    tail = [t.data_ptr() for t in (gates, c0, hs, cs, tcs)] + [int(reverse), int(keep)]
    _forward(lib.kcprnn_lstm_forward_step, gx, strides, bias, h0, hs, reverse, skip, w, tail)


def lstm_backward(lib, acts, cs, tcs, c0, grad_hs, dh, dc, dgates, dbias, reverse, need_h0, w_t):
    """:func:`kcprnn._cpu.native_rnn.lstm_backward` with a dense ``W_hh.T`` ``w_t``."""
    tail = (dh.data_ptr(), dc.data_ptr(), dgates.data_ptr(), _p(dbias), int(reverse))
    head = (acts, cs, tcs, c0, grad_hs)
    last = _backward(lib.kcprnn_lstm_backward_step, head, tail, dgates, reverse, need_h0, w_t)
    if last is not None:
        dh.copy_(last)


def gru_forward(lib, gx, strides, bias, h0, gh, rz, ns, hs, reverse, skip, w, keep) -> None:
    """:func:`kcprnn._cpu.native_rnn.gru_forward` with a dense ``W_hh`` ``w``."""
    tail = [t.data_ptr() for t in (h0, gh, rz, ns, hs)] + [int(reverse), int(keep)]
    _forward(lib.kcprnn_gru_forward_step, gx, strides, bias, h0, hs, reverse, skip, w, tail)


def gru_backward(lib, rz, ns, gh, hs, h0, grad_hs, dh, dgx, dgh, dbias, reverse, need_h0, w_t):
    """:func:`kcprnn._cpu.native_rnn.gru_backward` with a dense ``W_hh.T`` ``w_t``."""
    tail = (dh.data_ptr(), dgx.data_ptr(), dgh.data_ptr(), _p(dbias), int(reverse))
    head = (rz, ns, gh, hs, h0, grad_hs)
    last = _backward(lib.kcprnn_gru_backward_step, head, tail, dgh, reverse, need_h0, w_t)
    if last is not None:
        dh.add_(last)  # the GRU step adds the product to dh's direct path


def rnn_forward(lib, gx, strides, bias, hs, h0, reverse, relu, skip, w) -> None:
    """:func:`kcprnn._cpu.native_rnn.rnn_forward` with a dense ``W_hh`` ``w``."""
    tail = (hs.data_ptr(), int(reverse), int(relu))
    _forward(lib.kcprnn_rnn_forward_step, gx, strides, bias, h0, hs, reverse, skip, w, tail)


def rnn_backward(lib, hs, grad_hs, dh, dpre, dbias, reverse, relu, need_h0, w_t) -> None:
    """:func:`kcprnn._cpu.native_rnn.rnn_backward` with a dense ``W_hh.T`` ``w_t``."""
    tail = (dh.data_ptr(), dpre.data_ptr(), _p(dbias), int(reverse), int(relu))
    last = _backward(lib.kcprnn_rnn_backward_step, (hs, grad_hs), tail, dpre, reverse, need_h0, w_t)
    if last is not None:
        dh.copy_(last)


_P, _I64, _INT = native._P, native._I64, native._INT
_SIGNATURES: dict[str, list] = {
    # s, steps, batch, hidden, gx, ldx, ldt, bias, a, gates, c0, hs, cs, tcs, reverse, keep
    "kcprnn_lstm_forward_step": [*[_I64] * 4, _P, _I64, _I64, *[_P] * 7, _INT, _INT],
    # s, steps, batch, hidden, acts, cs, tcs, c0, grad_hs, a, dh, dc, dgates, dbias, reverse
    "kcprnn_lstm_backward_step": [*[_I64] * 4, *[_P] * 10, _INT],
    # s, steps, batch, hidden, gx, ldx, ldt, bias, a, h0, gh, rz, ns, hs, reverse, keep
    "kcprnn_gru_forward_step": [*[_I64] * 4, _P, _I64, _I64, *[_P] * 7, _INT, _INT],
    # s, steps, batch, hidden, rz, ns, gh, hs, h0, grad_hs, a, dh, dgx, dgh, dbias, reverse
    "kcprnn_gru_backward_step": [*[_I64] * 4, *[_P] * 11, _INT],
    # s, steps, batch, hidden, gx, ldx, ldt, bias, a, hs, reverse, relu
    "kcprnn_rnn_forward_step": [*[_I64] * 4, _P, _I64, _I64, _P, _P, _P, _INT, _INT],
    # s, steps, batch, hidden, hs, grad_hs, a, dh, dpre, dbias, reverse, relu
    "kcprnn_rnn_backward_step": [*[_I64] * 4, *[_P] * 6, _INT, _INT],
}


def declare(lib: ctypes.CDLL) -> None:
    """Declare the step functions' ctypes signatures on the loaded library."""
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = argtypes
