"""Python side of the compiled single cell step (``kcprnn_step*`` in ``native_rnn.cpp``, built
into the one library of :mod:`kcprnn._cpu.native`): one LSTM, GRU or Elman step with ``W_ih``
and ``W_hh`` each a Kronecker sum (KCP, CP) or a dense matrix, in one call.

A :class:`CellStep` is prepared once per version of the weights: the kernel plans both products
(factor order, expanded factors, index arrays) when it is made, and keeps pointers to the
tensors it reads, which the object holds. Calling it runs the input product, the recurrent
product, both biases and the cell's arithmetic for any number of rows on the calling thread.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import native
from .native_rnn import KronArgs

__all__ = ["MODES", "CellStep"]

MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
"""The cell kinds the kernel runs, by the name torch's recurrent kernels use."""

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

_NO_KRON = (0, 0, None, None, None, None)


def _operand(
    name: str, w: KronArgs | Tensor | None, rows: int, cols: int
) -> tuple[tuple, int | None, int]:
    """The kernel's arguments for one weight: the Kronecker-sum arguments, the dense matrix's
    pointer, and the matrix's multiply-accumulates per row."""
    if w is None:
        return _NO_KRON, None, 0
    if isinstance(w, KronArgs):
        if (w.out_features, w.in_features) != (rows, cols):
            raise ValueError(
                f"CellStep: {name} maps {w.in_features} -> {w.out_features} features, the cell "
                f"needs {cols} -> {rows}"
            )
        return w.args(), None, w.macs(1)
    if (
        tuple(w.shape) != (rows, cols)
        or w.dtype != torch.float32
        or w.device.type != "cpu"
        or not w.is_contiguous()
    ):
        raise ValueError(
            f"CellStep: {name} must be a contiguous float32 CPU matrix of shape {(rows, cols)}, "
            f"got {w.dtype} {tuple(w.shape)} on {w.device} (contiguous: {w.is_contiguous()})"
        )
    return _NO_KRON, w.data_ptr(), rows * cols


def _bias(name: str, b: Tensor | None, size: int) -> Tensor | None:
    if b is None:
        return None
    b = b.detach()
    if tuple(b.shape) != (size,) or b.dtype != torch.float32 or b.device.type != "cpu":
        raise ValueError(
            f"CellStep: {name} must be a float32 CPU vector of {size} entries, got {b.dtype} "
            f"{tuple(b.shape)} on {b.device}"
        )
    return b.contiguous()


def _state_ok(s: Tensor, rows: int, hidden: int) -> bool:
    return (
        s.is_cpu  # (a property: cheaper than building s.device)
        and s.dtype == torch.float32
        and s.is_contiguous()
        and s.shape == (rows, hidden)
    )


def _describe(t: Tensor | None) -> str:
    if t is None:
        return "None"
    return f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}"


class CellStep:
    """One prepared ``mode`` step (a key of :data:`MODES`) of a cell with ``hidden`` units and
    ``in_features`` inputs.

    ``ih`` and ``hh`` are the two weights, each a :class:`~kcprnn._cpu.native_rnn.KronArgs`
    (a Kronecker sum) or a dense float32 ``(gates * hidden, in)`` tensor; ``ih`` may be
    ``None``, and the caller then passes ``W_ih x + b_ih`` itself (``gx``). ``bias_ih`` and
    ``bias_hh`` are ``(gates * hidden,)`` or ``None``. The object keeps every tensor the kernel
    reads: prepare a new one when a weight changes."""

    def __init__(
        self,
        mode: str,
        hidden: int,
        in_features: int,
        ih: KronArgs | Tensor | None,
        bias_ih: Tensor | None,
        hh: KronArgs | Tensor,
        bias_hh: Tensor | None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"CellStep: mode must be one of {list(MODES)}, got {mode!r}")
        lib = native._require()
        gates = GATES[mode] * hidden
        ih_kron, w_ih, ih_macs = _operand("W_ih", ih, gates, in_features)
        hh_kron, w_hh, hh_macs = _operand("W_hh", hh, gates, hidden)
        b_ih = _bias("bias_ih", bias_ih, gates) if ih is not None else None
        b_hh = _bias("bias_hh", bias_hh, gates)
        self.mode, self.hidden, self.in_features, self.gates = mode, hidden, in_features, gates
        self.has_ih = ih is not None
        self.macs_per_row = ih_macs + hh_macs
        self._keep = (ih, hh, b_ih, b_hh)  # everything the kernel reads through its pointers
        handle = lib.kcprnn_step_new(
            MODES[mode],
            hidden,
            in_features,
            *ih_kron,
            w_ih,
            None if b_ih is None else b_ih.data_ptr(),
            *hh_kron,
            w_hh,
            None if b_hh is None else b_hh.data_ptr(),
        )
        self._handle = handle
        self._run = lib.kcprnn_step
        weakref.finalize(self, lib.kcprnn_step_free, handle)

    def __call__(
        self, x: Tensor | None, h: Tensor, c: Tensor | None = None, gx: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """The step on rows: ``x`` ``(b, in_features)`` float32 with unit stride along its last
        axis (or ``gx`` ``(b, gates * hidden)``, ``W_ih x + b_ih``, for a step prepared
        without ``W_ih``), ``h`` and, for an LSTM, ``c`` ``(b, hidden)``. Returns the new state,
        ``(h, c)`` for an LSTM, ``(h,)`` otherwise, as new tensors."""
        rows, lstm = h.shape[0], c is not None
        rows_in = x if self.has_ih else gx
        width = self.in_features if self.has_ih else self.gates
        if (
            rows_in is None
            or self.has_ih != (gx is None)
            or lstm != (self.mode == "LSTM")
            or rows_in.dim() != 2
            or rows_in.shape != (rows, width)
            or rows_in.dtype != torch.float32
            or not rows_in.is_cpu
            or (rows_in.stride(1) != 1 and width > 1)
            or not _state_ok(h, rows, self.hidden)
            or (lstm and not _state_ok(c, rows, self.hidden))  # type: ignore[arg-type]
        ):
            raise ValueError(
                f"CellStep ({self.mode}, prepared {'with' if self.has_ih else 'without'} W_ih): "
                f"expected {'x' if self.has_ih else 'gx'} ({rows}, {width}) float32 on the CPU "
                "with unit stride along the last axis (and not the other), and contiguous "
                f"float32 states ({rows}, {self.hidden}) (h, and c for an LSTM only); got x "
                f"{_describe(x)}, gx {_describe(gx)}, h {_describe(h)}, c {_describe(c)}"
            )
        h_out = torch.empty_like(h)  # (b, h)
        c_out = torch.empty_like(h) if lstm else None  # (b, h)
        native._count(rows * self.macs_per_row)
        self._run(
            self._handle,
            rows,
            None if x is None else x.data_ptr(),
            0 if x is None else x.stride(0),
            None if gx is None else gx.data_ptr(),
            0 if gx is None else gx.stride(0),
            h.data_ptr(),
            None if c is None else c.data_ptr(),
            h_out.data_ptr(),
            None if c_out is None else c_out.data_ptr(),
        )
        return (h_out, c_out) if c_out is not None else (h_out,)
