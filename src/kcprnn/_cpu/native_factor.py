"""Python side of the compiled KCP factor matrix (``native_factor.cpp``, built into the one
library of :mod:`kcprnn._cpu.native`): ``A_p = Σ_r ⊗_d F_d[p, r]`` for one Kronecker factor,
forward and backward each in one call, as one autograd node.

On torch operations the same matrix is a few dozen small operators with their autograd nodes
(:func:`kcprnn.formats.kcp.algebra.factor_dense_torch`), about 0.17 ms forward and backward
for a cell's factor of a few thousand entries, whatever its size; a training step of a
compressed cell builds several. :func:`applies` says where this one runs instead: plain
float32 or float64 tensors on the CPU, no graph being traced (``torch.compile``,
``torch.export``, a dispatch mode) or transformed (``torch.func``), small enough
(:data:`MAX_WORK`), and the library built. A backward that records a graph (second
derivatives) runs on torch operations.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import native

__all__ = ["MAX_WORK", "applies", "declare", "factor_dense", "work_limit"]

MAX_WORK = 1 << 15
"""Largest ``P R J I`` (the multiply-adds of one pass) built here for a factor of two modes;
16 times that for three modes, doubled for each further mode (:func:`work_limit`): the loops
take about 0.4-1 ns a multiply-add forward and backward on one thread, the torch operations
0.1-0.2 ms in launches, then one GEMM for two modes (at BLAS speed, faster from about 60,000)
and one per further mode over ever larger operands (the kernel is faster up to about 800,000
for three modes and 1-2 million for four; ``benchmarks/bench_factor_dense.py``)."""

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "kcprnn_factor_dense": [ctypes.c_int, _P, _P, _I64, _I64, _P, _P],
    "kcprnn_factor_dense_grad": [ctypes.c_int, _P, _P, _I64, _I64, _P, _P, _P],
}
_SUFFIX = {torch.float32: "_f32", torch.float64: "_f64"}
_PLAIN = (Tensor, torch.nn.Parameter)


def declare(lib: ctypes.CDLL) -> None:
    """Declare the factor functions' ctypes signatures on the loaded library."""
    for name, argtypes in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, name + suffix)
            fn.restype = None
            fn.argtypes = argtypes


@functools.lru_cache(maxsize=256)
def _tables(shapes: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
    """For modes ``(J_d, I_d)``: each mode's block size ``J_d I_d`` and, for each entry of the
    blocked order ``(j_1 i_1, ..., j_D i_D)``, its flat position in the ``(J, I)`` matrix."""
    nd = len(shapes)
    with torch.inference_mode(False):
        flat = torch.arange(math.prod(j * i for j, i in shapes), dtype=torch.int64)
        axes = [s for pair in shapes for s in pair]  # J_1, I_1, J_2, I_2, ...
        # the (J, I) matrix's flat index, viewed with axes (J_1..J_D, I_1..I_D), read blocked
        matrix = flat.reshape(*axes[0::2], *axes[1::2])
        blocked = matrix.permute(*[a for d in range(nd) for a in (d, nd + d)])
        blocks = torch.tensor([j * i for j, i in shapes], dtype=torch.int64)
        return blocks, blocked.reshape(-1).contiguous()


def _pointers(tensors: Sequence[Tensor]) -> Any:
    return (_P * len(tensors))(*[t.data_ptr() for t in tensors])


class _Plan:
    """What the kernel needs for one shape of factor besides the tensors: the functions of the
    dtype, the tables (:func:`_tables`) and the output's shape."""

    def __init__(self, shapes: tuple[tuple[int, int], ...], p: int, r: int, dtype: Any) -> None:
        lib = native._require()
        self.build = getattr(lib, "kcprnn_factor_dense" + _SUFFIX[dtype])
        self.grad = getattr(lib, "kcprnn_factor_dense_grad" + _SUFFIX[dtype])
        blocks, offsets = _tables(shapes)
        self.head = (len(shapes), blocks.data_ptr(), offsets.data_ptr(), p, r)
        self._keep = (blocks, offsets)
        self.shape = (p, math.prod(j for j, _ in shapes), math.prod(i for _, i in shapes))


@functools.lru_cache(maxsize=256)
def _plan(shapes: tuple[tuple[int, int], ...], p: int, r: int, dtype: Any) -> _Plan:
    return _Plan(shapes, p, r, dtype)


def _plan_of(fs: Sequence[Tensor]) -> _Plan:
    first = fs[0]
    shapes = tuple([(f.shape[2], f.shape[3]) for f in fs])
    return _plan(shapes, first.shape[0], first.shape[1], first.dtype)


def work_limit(modes: int) -> int:
    """The largest ``P R J I`` built here for a factor of ``modes`` modes (:data:`MAX_WORK`)."""
    return MAX_WORK if modes <= 2 else MAX_WORK << (modes + 1)


def applies(factor: Sequence[Tensor]) -> bool:
    """Whether :func:`factor_dense` runs on the compiled kernel for ``factor``: tensors
    ``(P, R, J_d, I_d)`` of one dtype, float32 or float64, on the CPU, at most
    :func:`work_limit` entries times terms and rank,
    nothing traced or transformed, the library built."""
    if torch.compiler.is_compiling():  # first: what follows is not for dynamo to trace
        return False
    first = factor[0]
    if any(
        f.dtype != first.dtype or not f.is_cpu or f.dim() != 4 or type(f) not in _PLAIN
        for f in factor
    ):
        return False  # a tensor subclass (fake, functional) is being traced
    if first.dtype not in _SUFFIX:
        return False
    p, r = first.shape[:2]
    work = p * r * math.prod(f.shape[2] * f.shape[3] for f in factor)
    return (
        0 < work <= work_limit(len(factor))
        and not torch._C._are_functorch_transforms_active()
        and _get_current_dispatch_mode() is None  # nor traced by a dispatch mode (make_fx)
        and native.available()
    )


def _build(plan: _Plan, fs: Sequence[Tensor]) -> Tensor:
    out = fs[0].new_empty(plan.shape)  # (P, J, I)
    plan.build(*plan.head, _pointers(fs), out.data_ptr())
    return out


def _grads(plan: _Plan, fs: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    grads = [torch.empty_like(f) for f in fs]
    plan.grad(*plan.head, _pointers(fs), grad.data_ptr(), _pointers(grads))
    return grads


class _FactorDense(torch.autograd.Function):
    """The factor matrices of several Kronecker factors (``sizes[k]`` CP factors each, given
    flat) as one autograd node. It keeps its inputs itself (not as saved tensors, which a
    backward frees), so that any number of backward passes may go through one build, as
    through a parameter: the steps of a cell share one build per version of the weights. An
    input changed in place since the build fails the backward, as autograd fails it for saved
    tensors."""

    @staticmethod
    def forward(
        ctx: Any,
        torch_path: Callable[[list[Tensor]], Tensor],
        sizes: tuple[int, ...],
        *flat: Tensor,
    ) -> tuple[Tensor, ...]:
        groups = [[f.contiguous() for f in group] for group in _groups(flat, sizes)]
        ctx.plans = [_plan_of(group) for group in groups]
        ctx.flat, ctx.groups, ctx.sizes, ctx.torch_path = flat, groups, sizes, torch_path
        ctx.versions = [f._version for f in flat]
        ctx.set_materialize_grads(False)  # an unused factor matrix gets no gradient
        return tuple([_build(plan, g) for plan, g in zip(ctx.plans, groups, strict=True)])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        flat = ctx.flat
        for f, version in zip(flat, ctx.versions, strict=True):
            if f._version != version:
                raise RuntimeError(
                    f"kcprnn: a CP factor {tuple(f.shape)} of a KCP factor matrix was modified "
                    f"by an inplace operation after the matrix was built (version {version} -> "
                    f"{f._version}): build it again (call the module again) before backward"
                )
        if torch.is_grad_enabled():  # a graph of the backward: on torch operations
            used = [(k, g) for k, g in enumerate(grads) if g is not None]
            groups = _groups(flat, ctx.sizes)
            with torch.enable_grad():
                outs = [ctx.torch_path(list(groups[k])) for k, _ in used]
            got = torch.autograd.grad(
                outs, flat, [g for _, g in used], create_graph=True, allow_unused=True
            )
            return (None, None, *got)
        out: list[Tensor | None] = [None, None]
        for plan, group, grad in zip(ctx.plans, ctx.groups, grads, strict=True):
            if grad is None:
                out.extend([None] * len(group))
            else:
                out.extend(_grads(plan, group, grad.contiguous()))
        return tuple(out)


def _groups(flat: Sequence[Tensor], sizes: Sequence[int]) -> list[Sequence[Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append(flat[start : start + size])
        start += size
    return out


def factor_dense(
    factors: Sequence[Sequence[Tensor]], torch_path: Callable[[list[Tensor]], Tensor]
) -> list[Tensor]:
    """``A_p = Σ_r ⊗_d F_d[p, r]`` ``(P, J, I)`` of each Kronecker factor in ``factors`` (its
    CP factors ``F_d``) on the compiled kernel, all in one autograd node; ``torch_path``
    computes one of them on torch operations (for second derivatives). Call only where
    :func:`applies` holds for each."""
    sizes = tuple(len(f) for f in factors)
    return list(_FactorDense.apply(torch_path, sizes, *[t for f in factors for t in f]))
