"""Python side of the compiled recurrences (``native_rnn.cpp``, built into the one library of
:mod:`kcprnn._cpu.native`): a whole direction of an LSTM, GRU or Elman layer whose
hidden-to-hidden matrix is a Kronecker sum, forward and backward through time, in one call each.

Every function checks its tensors (float32, CPU, contiguous where the kernel needs it, shapes)
and raises ``ValueError`` naming the offending argument before calling the library; the library
is loaded (built on first use) by :func:`kcprnn._cpu.native.available`.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor

from . import native, native_dense
from .native_dense import DenseArgs

__all__ = [
    "KronArgs",
    "declare",
    "gru_backward",
    "gru_forward",
    "kron_apply",
    "lstm_backward",
    "lstm_forward",
    "rnn_backward",
    "rnn_forward",
]


class KronArgs:
    """A Kronecker sum ``W = Π_out (Σ_p A_p^(1) ⊗ ⋯ ⊗ A_p^(N)) Π_in^T`` as the recurrence
    kernels take it: ``mats`` ``N`` float32 tensors ``(P, J^(n), I^(n))`` in the product's
    order, ``in_index[m]`` the natural input index at factor-major position ``m`` and
    ``out_index[j]`` the factor-major position of natural output ``j`` (``None``: identity), as
    in :class:`kcprnn.rnn.kron.KronLayout`. Holds contiguous copies (or the tensors themselves)
    for as long as the kernels may read them."""

    def __init__(
        self, mats: list[Tensor], in_index: Tensor | None, out_index: Tensor | None
    ) -> None:
        if not mats:
            raise ValueError("KronArgs needs at least one factor matrix, got none")
        self.mats = [m.detach().contiguous() for m in mats]  # N x (P, J, I)
        terms = self.mats[0].shape[0]
        for m in self.mats:
            if m.dim() != 3 or m.shape[0] != terms or m.dtype != torch.float32:
                raise ValueError(
                    "KronArgs: factor matrices must be float32 (P, J, I) with the same P, got "
                    f"{[(tuple(a.shape), a.dtype) for a in mats]}"
                )
        self.terms = int(terms)
        self.in_features = math.prod(m.shape[2] for m in self.mats)
        self.out_features = math.prod(m.shape[1] for m in self.mats)
        sizes = [m.shape[2] for m in self.mats] + [m.shape[1] for m in self.mats]
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.ptrs = (ctypes.c_void_p * len(self.mats))(*[m.data_ptr() for m in self.mats])
        self.in_index = _index(in_index, self.in_features, "in_index")
        self.out_index = _index(out_index, self.out_features, "out_index")

    def args(self) -> tuple:
        """The trailing ctypes arguments of every recurrence kernel."""
        return (
            len(self.mats),
            self.terms,
            self.sizes.data_ptr(),
            self.ptrs,
            None if self.in_index is None else self.in_index.data_ptr(),
            None if self.out_index is None else self.out_index.data_ptr(),
        )

    def macs(self, rows: int) -> int:
        """Multiply-accumulates of one product over ``rows`` rows."""
        macs, pre, post = 0, self.in_features, 1
        for m in reversed(self.mats):
            j, i = m.shape[1], m.shape[2]
            pre //= i
            macs += self.terms * rows * pre * i * j * post
            post *= j
        return macs


def _index(index: Tensor | None, size: int, name: str) -> Tensor | None:
    if index is None:
        return None
    index = index.to(device="cpu", dtype=torch.int64).contiguous()
    if index.shape != (size,):
        raise ValueError(f"KronArgs: {name} must have {size} entries, got {tuple(index.shape)}")
    return index


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(name: str, shapes: dict[str, tuple[Tensor | None, tuple[int, ...]]]) -> None:
    """Every tensor contiguous float32 on the CPU with its expected shape."""
    for key, (t, shape) in shapes.items():
        if t is None:
            continue
        if (
            tuple(t.shape) != shape
            or t.dtype != torch.float32
            or t.device.type != "cpu"
            or not t.is_contiguous()
        ):
            raise ValueError(
                f"{name}: {key} must be contiguous float32 on the CPU of shape {shape}, got "
                f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})"
            )


def _rows(name: str, gx: Tensor, steps: int, batch: int, width: int) -> tuple[int, int]:
    """The row strides ``(ldx, ldt)`` along the batch and along time of input projections
    ``gx``: float32 on the CPU with unit stride along the last axis, either ``(steps batch,
    width)`` time-major rows or a ``(steps, batch, width)`` view with any strides (a
    batch-first input's projections transposed: no copy for the compiled steps)."""
    shape = (steps * batch, width) if gx.dim() == 2 else (steps, batch, width)
    if (
        tuple(gx.shape) != shape
        or gx.dtype != torch.float32
        or gx.device.type != "cpu"
        or (gx.stride(-1) != 1 and width > 1)
    ):
        raise ValueError(
            f"{name}: gx must be float32 on the CPU of shape {(steps * batch, width)} or "
            f"{(steps, batch, width)} with unit stride along the last axis, got {gx.dtype} "
            f"{tuple(gx.shape)} on {gx.device} with strides {gx.stride()}"
        )
    if gx.dim() == 2:
        return gx.stride(0), batch * gx.stride(0)
    return gx.stride(1), gx.stride(0)


def _time_major(gx: Tensor, steps: int, batch: int, ldx: int, ldt: int) -> tuple[Tensor, int]:
    """``gx`` as time-major rows and their stride, for the whole loops (copied where
    :func:`_rows` found another layout)."""
    if ldt == batch * ldx or steps * batch == 0:
        return gx, ldx
    return gx.reshape(steps * batch, -1).contiguous(), gx.shape[-1]


def _check_kron(name: str, kron: KronArgs | DenseArgs, in_features: int, out_features: int) -> None:
    if (kron.in_features, kron.out_features) != (in_features, out_features):
        raise ValueError(
            f"{name}: the recurrent matrix maps {kron.in_features} -> {kron.out_features} "
            f"features, the recurrence needs {in_features} -> {out_features}"
        )


def lstm_forward(
    gx: Tensor,
    bias: Tensor | None,
    gates: Tensor,
    h0: Tensor,
    c0: Tensor,
    hs: Tensor,
    cs: Tensor,
    tcs: Tensor,
    reverse: bool,
    skip_first: bool,
    kron: KronArgs | DenseArgs,
    x_fm: Tensor | None = None,
) -> None:
    """A whole LSTM direction over the input projections ``gx`` ``(t b, 4h)`` (time-major
    rows with unit stride along the last axis, or a ``(t, b, 4h)`` view: :func:`_rows`; gates
    ``i, f, g, o``) and ``bias`` ``(4h,)`` or ``None``: ``gates`` ``(t, b, 4h)`` receives the
    activated gates and ``hs``, ``cs``, ``tcs`` ``(t, b, h)`` the hidden states, the cell states
    and ``tanh`` of them, indexed by time. ``kron``: ``W_hh``; ``skip_first``: ``h0`` is zero
    (no first product); ``x_fm`` ``(t, b, h)``, where given, receives the state before every
    step (indexed by time) in the Kronecker sum's factor-major order, the rows its factor
    gradients multiply. Where no backward follows, ``gates`` may hold one step ``(1, b, 4h)``
    and ``cs``, ``tcs`` two ``(2, b, h)`` (the steps alternate; the last one's cell state is
    row ``(t - 1) % 2``)."""
    lib = native._require()
    steps, b, h = hs.shape
    keep = gates.shape[0] == steps  # else one step's scratch rows
    states = steps if keep else min(steps, 2)
    ldx, ldt = _rows("lstm_forward", gx, steps, b, 4 * h)
    _check(
        "lstm_forward",
        {
            "bias": (bias, (4 * h,)),
            "gates": (gates, (steps if keep else 1, b, 4 * h)),
            "h0": (h0, (b, h)),
            "c0": (c0, (b, h)),
            "hs": (hs, (steps, b, h)),
            "x_fm": (x_fm, (steps, b, h)),
            **{k: (v, (states, b, h)) for k, v in (("cs", cs), ("tcs", tcs))},
        },
    )
    _check_kron("lstm_forward", kron, h, 4 * h)
    native._count((steps - int(skip_first)) * kron.macs(b))
    if isinstance(kron, DenseArgs):
        lstm = native_dense.lstm_forward
        lstm(lib, gx, (ldx, ldt), bias, gates, h0, c0, hs, cs, tcs, reverse, skip_first, kron, keep)
        return
    gx, ldx = _time_major(gx, steps, b, ldx, ldt)
    lib.kcprnn_lstm_forward(
        steps,
        b,
        h,
        gx.data_ptr(),
        ldx,
        _ptr(bias),
        gates.data_ptr(),
        h0.data_ptr(),
        c0.data_ptr(),
        hs.data_ptr(),
        cs.data_ptr(),
        tcs.data_ptr(),
        _ptr(x_fm),
        int(reverse),
        int(skip_first),
        int(keep),
        *kron.args(),
    )


def lstm_backward(
    acts: Tensor,
    cs: Tensor,
    tcs: Tensor,
    c0: Tensor,
    grad_hs: Tensor,
    dh: Tensor,
    dc: Tensor,
    dgates: Tensor,
    reverse: bool,
    need_h0: bool,
    kron_t: KronArgs | DenseArgs,
    d_fm: Tensor | None = None,
    dbias: Tensor | None = None,
) -> None:
    """The backward through time of :func:`lstm_forward`: ``acts``, ``cs``, ``tcs`` its
    outputs, ``grad_hs`` ``(t, b, h)`` the outputs' gradients; ``dh``, ``dc`` ``(b, h)`` hold
    the gradients of ``h_n`` and ``c_n`` and receive those of ``h0`` (when ``need_h0``) and
    ``c0``; ``dgates`` ``(t, b, 4h)`` receives the pre-activation gradients. ``kron_t``:
    ``W_hh.T``. Where given, ``d_fm`` ``(t, b, 4h)`` receives ``dgates`` in ``W_hh``'s
    factor-major output order and ``dbias`` ``(4h,)`` (zeroed by the caller) its sum over all
    steps and rows."""
    lib = native._require()
    steps, b, g = acts.shape
    h = g // 4
    _check(
        "lstm_backward",
        {
            "acts": (acts, (steps, b, 4 * h)),
            "dgates": (dgates, (steps, b, 4 * h)),
            "d_fm": (d_fm, (steps, b, 4 * h)),
            "dbias": (dbias, (4 * h,)),
            **{k: (v, (steps, b, h)) for k, v in (("cs", cs), ("tcs", tcs), ("grad_hs", grad_hs))},
            **{k: (v, (b, h)) for k, v in (("c0", c0), ("dh", dh), ("dc", dc))},
        },
    )
    _check_kron("lstm_backward", kron_t, 4 * h, h)
    native._count((steps - 1 + int(need_h0)) * kron_t.macs(b))
    if isinstance(kron_t, DenseArgs):
        args = (acts, cs, tcs, c0, grad_hs, dh, dc, dgates, dbias, reverse, need_h0, kron_t)
        native_dense.lstm_backward(lib, *args)
        return
    lib.kcprnn_lstm_backward(
        steps,
        b,
        h,
        acts.data_ptr(),
        cs.data_ptr(),
        tcs.data_ptr(),
        c0.data_ptr(),
        grad_hs.data_ptr(),
        dh.data_ptr(),
        dc.data_ptr(),
        dgates.data_ptr(),
        _ptr(d_fm),
        _ptr(dbias),
        int(reverse),
        int(need_h0),
        *kron_t.args(),
    )


def gru_forward(
    gx: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    gh: Tensor,
    rz: Tensor,
    ns: Tensor,
    hs: Tensor,
    reverse: bool,
    skip_first: bool,
    kron: KronArgs | DenseArgs,
    x_fm: Tensor | None = None,
) -> None:
    """A whole GRU direction over the input projections ``gx`` ``(t b, 3h)`` (time-major
    rows with unit stride along the last axis, or a ``(t, b, 3h)`` view, gates ``r, z, n``;
    ``bias`` ``b_hh`` ``(3h,)`` or ``None``): ``gh`` ``(t, b, 3h)`` receives ``W_hh h + b_hh``
    of every step, ``rz`` ``(t, b, 2h)`` the ``r, z`` gates, ``ns`` and ``hs`` ``(t, b, h)``
    the candidates and hidden states; ``x_fm`` as in :func:`lstm_forward`. Where no backward
    follows, ``gh``, ``rz`` and ``ns`` may hold one step, ``(1, b, .)``, rewritten at every step
    (the memory traffic of the others saved)."""
    lib = native._require()
    steps, b, h = hs.shape
    ldx, ldt = _rows("gru_forward", gx, steps, b, 3 * h)
    keep = gh.shape[0] == steps  # else one step's scratch rows
    kept = steps if keep else 1
    _check(
        "gru_forward",
        {
            "gh": (gh, (kept, b, 3 * h)),
            "bias": (bias, (3 * h,)),
            "h0": (h0, (b, h)),
            "rz": (rz, (kept, b, 2 * h)),
            "ns": (ns, (kept, b, h)),
            "hs": (hs, (steps, b, h)),
            "x_fm": (x_fm, (steps, b, h)),
        },
    )
    _check_kron("gru_forward", kron, h, 3 * h)
    native._count((steps - int(skip_first)) * kron.macs(b))
    if isinstance(kron, DenseArgs):
        gru = native_dense.gru_forward
        gru(lib, gx, (ldx, ldt), bias, h0, gh, rz, ns, hs, reverse, skip_first, kron, keep)
        return
    gx, ldx = _time_major(gx, steps, b, ldx, ldt)
    lib.kcprnn_gru_forward(
        steps,
        b,
        h,
        gx.data_ptr(),
        ldx,
        _ptr(bias),
        h0.data_ptr(),
        gh.data_ptr(),
        rz.data_ptr(),
        ns.data_ptr(),
        hs.data_ptr(),
        _ptr(x_fm),
        int(reverse),
        int(skip_first),
        int(keep),
        *kron.args(),
    )


def gru_backward(
    rz: Tensor,
    ns: Tensor,
    gh: Tensor,
    hs: Tensor,
    h0: Tensor,
    grad_hs: Tensor,
    dh: Tensor,
    dgx: Tensor,
    dgh: Tensor,
    reverse: bool,
    need_h0: bool,
    kron_t: KronArgs | DenseArgs,
    d_fm: Tensor | None = None,
    dbias: Tensor | None = None,
) -> None:
    """The backward through time of :func:`gru_forward`: ``dh`` ``(b, h)`` holds the gradient
    of ``h_n`` and receives ``h0``'s (when ``need_h0``); ``dgx`` and ``dgh`` ``(t, b, 3h)``
    receive the gradients of the input projections and of ``W_hh h + b_hh``. ``kron_t``:
    ``W_hh.T``; ``d_fm`` and ``dbias`` as in :func:`lstm_backward`, of ``dgh``."""
    lib = native._require()
    steps, b, h = ns.shape
    _check(
        "gru_backward",
        {
            "rz": (rz, (steps, b, 2 * h)),
            **{k: (v, (steps, b, h)) for k, v in (("ns", ns), ("hs", hs), ("grad_hs", grad_hs))},
            **{
                k: (v, (steps, b, 3 * h))
                for k, v in (("gh", gh), ("dgx", dgx), ("dgh", dgh), ("d_fm", d_fm))
            },
            "dbias": (dbias, (3 * h,)),
            "h0": (h0, (b, h)),
            "dh": (dh, (b, h)),
        },
    )
    _check_kron("gru_backward", kron_t, 3 * h, h)
    native._count((steps - 1 + int(need_h0)) * kron_t.macs(b))
    if isinstance(kron_t, DenseArgs):
        args = (rz, ns, gh, hs, h0, grad_hs, dh, dgx, dgh, dbias, reverse, need_h0, kron_t)
        native_dense.gru_backward(lib, *args)
        return
    lib.kcprnn_gru_backward(
        steps,
        b,
        h,
        rz.data_ptr(),
        ns.data_ptr(),
        gh.data_ptr(),
        hs.data_ptr(),
        h0.data_ptr(),
        grad_hs.data_ptr(),
        dh.data_ptr(),
        dgx.data_ptr(),
        dgh.data_ptr(),
        _ptr(d_fm),
        _ptr(dbias),
        int(reverse),
        int(need_h0),
        *kron_t.args(),
    )


def rnn_forward(
    gx: Tensor,
    bias: Tensor | None,
    hs: Tensor,
    h0: Tensor,
    reverse: bool,
    relu: bool,
    skip_first: bool,
    kron: KronArgs | DenseArgs,
    x_fm: Tensor | None = None,
) -> None:
    """A whole Elman direction over the input projections ``gx`` ``(t b, h)`` (time-major rows
    with unit stride along the last axis, or a ``(t, b, h)`` view) and ``bias`` ``(h,)`` or
    ``None``: ``hs`` ``(t, b, h)`` receives the hidden states (``tanh``, or ``relu`` where
    ``relu``); ``x_fm`` as in :func:`lstm_forward`."""
    lib = native._require()
    steps, b, h = hs.shape
    ldx, ldt = _rows("rnn_forward", gx, steps, b, h)
    _check(
        "rnn_forward",
        {
            "bias": (bias, (h,)),
            "hs": (hs, (steps, b, h)),
            "h0": (h0, (b, h)),
            "x_fm": (x_fm, (steps, b, h)),
        },
    )
    _check_kron("rnn_forward", kron, h, h)
    native._count((steps - int(skip_first)) * kron.macs(b))
    if isinstance(kron, DenseArgs):
        strides = (ldx, ldt)
        native_dense.rnn_forward(lib, gx, strides, bias, hs, h0, reverse, relu, skip_first, kron)
        return
    gx, ldx = _time_major(gx, steps, b, ldx, ldt)
    lib.kcprnn_rnn_forward(
        steps,
        b,
        h,
        gx.data_ptr(),
        ldx,
        _ptr(bias),
        hs.data_ptr(),
        h0.data_ptr(),
        _ptr(x_fm),
        int(reverse),
        int(relu),
        int(skip_first),
        *kron.args(),
    )


def rnn_backward(
    hs: Tensor,
    grad_hs: Tensor,
    dh: Tensor,
    dpre: Tensor,
    reverse: bool,
    relu: bool,
    need_h0: bool,
    kron_t: KronArgs | DenseArgs,
    d_fm: Tensor | None = None,
    dbias: Tensor | None = None,
) -> None:
    """The backward through time of :func:`rnn_forward`: ``dh`` ``(b, h)`` holds the gradient
    of ``h_n`` and receives ``h0``'s (when ``need_h0``); ``dpre`` ``(t, b, h)`` receives the
    pre-activation gradients. ``kron_t``: ``W_hh.T``; ``d_fm`` and ``dbias`` as in
    :func:`lstm_backward`, of ``dpre``."""
    lib = native._require()
    steps, b, h = hs.shape
    _check(
        "rnn_backward",
        {
            **{
                k: (v, (steps, b, h))
                for k, v in (("hs", hs), ("grad_hs", grad_hs), ("dpre", dpre), ("d_fm", d_fm))
            },
            "dh": (dh, (b, h)),
            "dbias": (dbias, (h,)),
        },
    )
    _check_kron("rnn_backward", kron_t, h, h)
    native._count((steps - 1 + int(need_h0)) * kron_t.macs(b))
    if isinstance(kron_t, DenseArgs):
        args = (hs, grad_hs, dh, dpre, dbias, reverse, relu, need_h0, kron_t)
        native_dense.rnn_backward(lib, *args)
        return
    lib.kcprnn_rnn_backward(
        steps,
        b,
        h,
        hs.data_ptr(),
        grad_hs.data_ptr(),
        dh.data_ptr(),
        dpre.data_ptr(),
        _ptr(d_fm),
        _ptr(dbias),
        int(reverse),
        int(relu),
        int(need_h0),
        *kron_t.args(),
    )


def kron_apply(x: Tensor, kron: KronArgs) -> Tensor:
    """``x @ W.T`` ``(m, j)`` for rows ``x`` ``(m, i)`` (float32, CPU) on the kernel that the
    recurrences use for their products."""
    lib = native._require()
    x = x.contiguous()
    _check("kron_apply", {"x": (x, (x.shape[0], kron.in_features))})
    out = x.new_empty(x.shape[0], kron.out_features)
    native._count(kron.macs(x.shape[0]))
    lib.kcprnn_kron_apply(x.shape[0], x.data_ptr(), out.data_ptr(), *kron.args())
    return out


_I64, _P, _INT = native._I64, native._P, native._INT
_KRON = [_INT, _INT, _P, _P, _P, _P]  # factors, terms, sizes, matrix pointers, in/out index
_RNN_SIGNATURES: dict[str, list] = {
    # steps, batch, hidden, gx, ldx, bias, gates, h0, c0, hs, cs, tcs, x_fm, reverse, skip_first
    "kcprnn_lstm_forward": [_I64, _I64, _I64, _P, _I64, *[_P] * 8, _INT, _INT, _INT],
    # steps, batch, hidden, acts, cs, tcs, c0, grad_hs, dh, dc, dgates, d_fm, dbias, reverse,
    # need_h0
    "kcprnn_lstm_backward": [_I64, _I64, _I64, *[_P] * 10, _INT, _INT],
    # steps, batch, hidden, gx, ldx, bias, h0, gh, rz, ns, hs, x_fm, reverse, skip_first, keep
    "kcprnn_gru_forward": [_I64, _I64, _I64, _P, _I64, *[_P] * 7, _INT, _INT, _INT],
    # steps, batch, hidden, rz, ns, gh, hs, h0, grad_hs, dh, dgx, dgh, d_fm, dbias, reverse,
    # need_h0
    "kcprnn_gru_backward": [_I64, _I64, _I64, *[_P] * 11, _INT, _INT],
    # steps, batch, hidden, gx, ldx, bias, hs, h0, x_fm, reverse, relu, skip_first
    "kcprnn_rnn_forward": [_I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _INT, _INT, _INT],
    # steps, batch, hidden, hs, grad_hs, dh, dpre, d_fm, dbias, reverse, relu, need_h0
    "kcprnn_rnn_backward": [_I64, _I64, _I64, *[_P] * 6, _INT, _INT, _INT],
    # rows, x, y
    "kcprnn_kron_apply": [_I64, _P, _P],
}


def declare(lib: ctypes.CDLL) -> None:
    """Declare the ctypes signatures of the recurrences and the cell step on the loaded
    library."""
    for name, argtypes in _RNN_SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [*argtypes, *_KRON]
    # the cell step (native_step.py): mode, hidden, in, W_ih's Kronecker sum, w_ih, b_ih, then
    # W_hh's, w_hh, b_hh
    lib.kcprnn_step_new.restype = _P
    step_new: list[Any] = [_INT, _I64, _I64, *_KRON, _P, _P, *_KRON, _P, _P]
    lib.kcprnn_step_new.argtypes = step_new
    lib.kcprnn_step_free.restype = None
    lib.kcprnn_step_free.argtypes = [_P]
    # step, rows, x, ldx, gx, ldgx, h, c, h_out, c_out
    lib.kcprnn_step.restype = None
    lib.kcprnn_step.argtypes = [_P, _I64, _P, _I64, _P, _I64, _P, _P, _P, _P]
