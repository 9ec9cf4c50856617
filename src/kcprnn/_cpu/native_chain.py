"""A format's chain (:mod:`kcprnn.formats._chain`) in one call of the compiled kernel each way
(:file:`native_chain.cpp`), as one autograd node.

:func:`chain_layout` turns a :class:`~kcprnn.formats._chain.ChainPlan` and a number of rows into
the kernel's int64 records (each step's two packings with their strides, its GEMM sizes, its
offsets in one workspace, and whether the step reads a state that already lies transposed in
place) and the buffer sizes; it is kept on the plan per row count. The
forward fills the workspace (every step's packed state and tensor), which the backward reads.
A second derivative (``create_graph``) runs the chain's torch operations instead, whose graph
reaches the inputs.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import native

if TYPE_CHECKING:
    from ..formats._chain import ChainPlan

__all__ = [
    "ChainLayout",
    "chain_layout",
    "declare",
    "native_chain",
    "pointers",
    "run_backward",
    "run_forward",
    "takes",
    "workspace",
]

MAX_AXES = 16  # kMaxAxes in native_chain.cpp
_PACK = 1 + 2 * MAX_AXES
_RECORD = 2 * _PACK + 8  # kRecord
_P = ctypes.c_void_p
_SIGNATURES = {
    "kcprnn_chain_forward": [ctypes.c_int, _P, _P, _P, _P, ctypes.c_int64, _P, _P],
    "kcprnn_chain_backward": [ctypes.c_int, *[_P] * 8, ctypes.c_int64, *[_P] * 4],
}
_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}


def declare(lib: ctypes.CDLL) -> None:
    """Declare the chain functions' ctypes signatures on the loaded library."""
    for name in ("kcprnn_chain_record", "kcprnn_chain_max_axes"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    assert lib.kcprnn_chain_record() == _RECORD and lib.kcprnn_chain_max_axes() == MAX_AXES
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, name + suffix)
            fn.restype = None
            fn.argtypes = argtypes


def _strides(shape: Sequence[int]) -> list[int]:
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= size
    return out[::-1]


def _pack(shape: Sequence[int], perm: Sequence[int]) -> list[int] | None:
    """The record of a permuted copy of a contiguous ``shape``: axes of size 1 dropped, axes
    that stay adjacent merged, no axes where the copy is the identity; ``None`` past
    ``MAX_AXES``."""
    strides = _strides(shape)
    axes: list[tuple[int, int]] = []
    for size, stride in ((shape[a], strides[a]) for a in perm if shape[a] != 1):
        if axes and axes[-1][1] == size * stride:
            axes[-1] = (axes[-1][0] * size, stride)
        else:
            axes.append((size, stride))
    if len(axes) > MAX_AXES:
        return None
    if len(axes) <= 1 and (not axes or axes[0][1] == 1):
        axes = []
    pad = [0] * (MAX_AXES - len(axes))
    return [len(axes), *(s for s, _ in axes), *pad, *(t for _, t in axes), *pad]


@dataclass(frozen=True)
class ChainLayout:
    """The kernel's records for one plan and row count, and its buffer sizes."""

    records: Tensor  # int64, the steps' records then the output's packing
    workspace: int  # every step's A, W and next state
    state: int  # the largest state after a step
    a: int  # the largest packed state
    w: int  # the largest packed tensor
    macs: int  # of the forward's GEMMs


def chain_layout(plan: ChainPlan, rows: int) -> ChainLayout | None:
    """``plan``'s records at ``rows`` rows (kept on the plan); ``None`` where a packing has more
    than ``MAX_AXES`` axes of size above 1."""
    if rows in plan.native:
        return plan.native[rows]
    records: list[int] = []
    shape = [rows, *plan.in_sizes]  # the current state's shape
    offset, state, big_a, big_w = 0, 0, 0, 0
    layout: ChainLayout | None = None
    for step in plan.steps:
        a = _pack(shape, step.perm_a)
        w = _pack(step.view, step.perm_b)
        if a is None or w is None:
            break
        at = _pack(shape, step.perm_at)
        trans = int(a[0] != 0 and at is not None and at[0] == 0)  # the state lies as (n, k, m)
        if trans and at is not None:
            a = at
        sizes = (step.n * rows * step.m * step.k, step.n * step.k * step.p)
        z = step.n * rows * step.m * step.p
        records += [*a, *w, step.n, rows * step.m, step.k, step.p]
        records += [offset, offset + sizes[0], offset + sizes[0] + sizes[1], trans]
        offset += sizes[0] + sizes[1] + z
        state, big_a, big_w = max(state, z), max(big_a, sizes[0]), max(big_w, sizes[1])
        shape = [rows if s == -1 else s for s in step.out_shape]
    else:
        out = _pack(shape, plan.out_perm)
        if out is not None:
            with torch.inference_mode(False):
                table = torch.tensor([*records, *out], dtype=torch.int64)
            layout = ChainLayout(table, offset, state, big_a, big_w, plan.macs(rows))
    plan.native[rows] = layout
    return layout


@functools.cache
def _functions(dtype: torch.dtype) -> tuple[Any, Any]:
    """The kernel's forward and backward for ``dtype``, looked up once."""
    lib = native._require()
    suffix = _SUFFIX[dtype]
    return getattr(lib, "kcprnn_chain_forward" + suffix), getattr(
        lib, "kcprnn_chain_backward" + suffix
    )


def pointers(tensors: Sequence[Tensor | None]) -> Any:
    """The tensors' addresses as the kernel reads them (``None``: a null pointer)."""
    return (_P * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def workspace(x: Tensor, layout: ChainLayout) -> Tensor:
    """A workspace for one forward and its backward on ``x``'s rows: the forward's packed
    operands and states, then the backward's two states, an A and a W."""
    return x.new_empty(layout.workspace + 2 * layout.state + layout.a + layout.w)


def run_forward(
    plan: ChainPlan, layout: ChainLayout, x: Tensor, addresses: Any, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The kernel's forward on contiguous rows ``x`` with the tensors at ``addresses`` (in the
    chain's order, :func:`pointers`), no autograd: the output ``(b, out_features)`` and the
    workspace that :func:`run_backward` reads (it also reads ``x``, which must stay alive)."""
    cols = plan.out_features
    out = x.new_empty(x.shape[0], cols)
    ws = workspace(x, layout)
    fn = _functions(x.dtype)[0]
    fn(len(plan.steps), layout.records.data_ptr(), x.data_ptr(), addresses, _address(bias), cols,
       out.data_ptr(), ws.data_ptr())  # fmt: skip
    native._count(layout.macs)
    return out, ws  # (b, out_features), (workspace,)


def run_backward(
    plan: ChainPlan,
    layout: ChainLayout,
    ws: Tensor,
    grad: Tensor,
    x: Tensor,
    addresses: Any,
    grads: Sequence[Tensor | None],
    grad_x: Tensor | None,
    grad_bias: Tensor | None = None,
) -> None:
    """The kernel's backward of :func:`run_forward` (its ``ws``, ``x`` and ``addresses``) for
    the output gradient ``grad`` ``(b, out_features)``: writes the tensors' gradients into
    ``grads`` (``None``: not wanted), the rows' into ``grad_x`` and the bias's into
    ``grad_bias`` where given."""
    size = x.element_size()
    base = ws.data_ptr() + layout.workspace * size
    g1 = base + layout.state * size
    ga = g1 + layout.state * size
    gw = ga + layout.a * size
    fn = _functions(x.dtype)[1]
    fn(len(plan.steps), layout.records.data_ptr(), grad.contiguous().data_ptr(), x.data_ptr(),
       addresses, ws.data_ptr(), pointers(grads), _address(grad_x), _address(grad_bias),
       plan.out_features, base, g1, ga, gw)  # fmt: skip


class _NativeChain(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context, as elsewhere: one call binds the arguments once
    @staticmethod
    def forward(
        ctx, plan: ChainPlan, layout: ChainLayout, x: Tensor, bias: Tensor | None, *tensors: Tensor
    ) -> Tensor:
        addresses = pointers(tensors)
        out, ws = run_forward(plan, layout, x, addresses, bias)
        ctx.plan, ctx.layout, ctx.ws, ctx.addresses = plan, layout, ws, addresses
        ctx.save_for_backward(x, bias, *tensors)
        return out  # (b, out_features)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        plan: ChainPlan = ctx.plan
        x, bias, *tensors = ctx.saved_tensors
        need_x, need_bias, *wanted = ctx.needs_input_grad[2:]
        if torch.is_grad_enabled():  # a second derivative: the chain on torch operations
            from ..formats._chain import chain_forward

            given = [x, *([bias] if need_bias else []), *tensors]
            needs = [need_x, *([True] if need_bias else []), *wanted]
            out = chain_forward(plan, x, tensors)[0]  # tensors in the chain's order
            out = out if bias is None else out + bias
            inputs = [t for t, need in zip(given, needs, strict=True) if need]
            found = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
            grad_x = next(found) if need_x else None
            grad_bias = next(found) if need_bias else None
            return (None, None, grad_x, grad_bias, *(next(found) if w else None for w in wanted))
        grads = [torch.empty_like(t) if w else None for t, w in zip(tensors, wanted, strict=True)]
        grad_x = torch.empty_like(x) if need_x else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        run_backward(plan, ctx.layout, ctx.ws, grad, x, ctx.addresses, grads, grad_x, grad_bias)
        return (None, None, grad_x, grad_bias, *grads)


def takes(plan: ChainPlan, tensors: Sequence[Tensor], dtype: torch.dtype) -> bool:
    """Whether the kernel takes ``tensors`` (in the chain's order) for ``plan`` with rows of
    ``dtype``: float32 or float64 on the CPU, every tensor contiguous, of that dtype and of its
    step's size, and the kernels built."""
    if dtype not in _SUFFIX or not native.available() or len(tensors) != len(plan.steps):
        return False
    for t, step in zip(tensors, plan.steps, strict=True):
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            return False
        if t.numel() != math.prod(step.view):
            return False
    return True


def native_chain(
    x: Tensor, plan: ChainPlan, tensors: Sequence[Tensor], bias: Tensor | None = None
) -> Tensor | None:
    """``x @ W.T`` (``+ bias``) through ``plan`` in the compiled kernel, one autograd node;
    ``None`` where it cannot run (not float32 or float64 on the CPU, a tensor not contiguous,
    of another dtype or not of its step's size (:func:`takes`), no kernel, a packing past
    ``MAX_AXES``)."""
    if not x.is_cpu or not takes(plan, tensors, x.dtype):
        return None
    if bias is not None and (
        bias.dtype != x.dtype
        or not bias.is_cpu
        or not bias.is_contiguous()
        or bias.shape != (plan.out_features,)
    ):
        return None
    layout = chain_layout(plan, x.shape[0])
    if layout is None:
        return None
    return _NativeChain.apply(plan, layout, x.contiguous(), bias, *tensors)  # (b, out_features)
