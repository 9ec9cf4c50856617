"""KCP's factor matrices ``A_p = Σ_r ⊗_d F_d[p, r]`` of several Kronecker factors as one
autograd node: each on the compiled kernel (``native_factor.cpp``, built into the one library of
:mod:`kcprnn._cpu.native`; forward and backward each in one call) where it is small, else by
two GEMMs (:func:`gemm_build`, :func:`gemm_grads`; torch operations without autograd nodes).

On torch operations with autograd the same matrix is a few dozen small operators and their
nodes (:func:`kcprnn.formats.kcp.algebra.factor_dense_torch`), about 0.17 ms forward and
backward for a cell's factor of a few thousand entries, whatever its size, and for a factor of
a default cell's rank (hundreds) several milliseconds, mostly in reshapes, broadcasts and the
autograd engine; a training step of a compressed cell builds several. :func:`in_one_node`
says where the node runs: plain float32 or float64 tensors on the CPU, no graph being traced
(``torch.compile``, ``torch.export``, a dispatch mode) or transformed (``torch.func``);
:func:`applies` which factors take the kernel (small enough, :data:`MAX_WORK`, and the library
built). A backward that records a graph (second derivatives) runs on torch operations.
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

__all__ = [
    "GEMMS",
    "MAX_WORK",
    "RowGrads",
    "applies",
    "declare",
    "factor_dense",
    "gemm_build",
    "gemm_grads",
    "halves",
    "in_one_node",
    "kernel_build",
    "kernel_grads",
    "unblock",
    "work",
    "work_limit",
]

MAX_WORK = 1 << 15
"""Largest ``P R J I`` (the multiply-adds of one pass) built here for a factor of two modes;
16 times that for three modes, doubled for each further mode (:func:`work_limit`): the loops
take about 0.4-1 ns a multiply-add forward and backward on one thread, the torch operations
0.1-0.2 ms in launches, then one GEMM for two modes (at BLAS speed, faster from about 60,000)
and one per further mode over ever larger operands (the kernel is faster up to about 800,000
for three modes and 1-2 million for four; ``benchmarks/bench_factor_dense.py``)."""

GEMMS = True
"""Whether a factor matrix the kernel does not take (:func:`applies`) is built in the node by
GEMMs; ``False``: on torch operations with autograd (:func:`in_one_node` then holds only where
the kernel takes every factor)."""

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "kcprnn_factor_dense": [ctypes.c_int, _P, _P, _I64, _I64, _P, _P],
    "kcprnn_factor_dense_grad": [ctypes.c_int, _P, _P, _I64, _I64, _P, _P, _P],
    "kcprnn_kcp_row_grads": [_P] * 14,
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


def _eager_plain(factor: Sequence[Tensor]) -> bool:
    """Tensors ``(P, R, J_d, I_d)`` of one dtype, float32 or float64, plain (not a subclass) on
    the CPU, with nothing traced or transformed."""
    if torch.compiler.is_compiling():  # first: what follows is not for dynamo to trace
        return False
    first = factor[0]
    if any(
        f.dtype != first.dtype or not f.is_cpu or f.dim() != 4 or type(f) not in _PLAIN
        for f in factor
    ):
        return False  # a tensor subclass (fake, functional) is being traced
    return (
        first.dtype in _SUFFIX
        and not torch._C._are_functorch_transforms_active()
        and _get_current_dispatch_mode() is None  # nor traced by a dispatch mode (make_fx)
    )


def work(factor: Sequence[Tensor]) -> int:
    """``P R J I`` of ``factor`` (``(P, R, J_d, I_d)`` each): the multiply-adds of one pass of
    its build."""
    p, r = factor[0].shape[:2]
    return p * r * math.prod(f.shape[2] * f.shape[3] for f in factor)


def _takes(factor: Sequence[Tensor]) -> bool:
    """Whether the kernel takes ``factor`` (checked to be eager and plain): at most
    :func:`work_limit` entries times terms and rank, the library built."""
    return 0 < work(factor) <= work_limit(len(factor)) and native.available()


def applies(factor: Sequence[Tensor]) -> bool:
    """Whether :func:`factor_dense` builds ``factor`` on the compiled kernel: tensors
    ``(P, R, J_d, I_d)`` of one dtype, float32 or float64, on the CPU, at most
    :func:`work_limit` entries times terms and rank,
    nothing traced or transformed, the library built."""
    return _eager_plain(factor) and _takes(factor)


def in_one_node(factor: Sequence[Tensor]) -> bool:
    """Whether :func:`factor_dense` may build ``factor`` in its node: eager, plain float32 or
    float64 tensors on the CPU, and the kernel takes it or the GEMMs are on (:data:`GEMMS`)."""
    return _eager_plain(factor) and (GEMMS or _takes(factor))


def halves(factor: Sequence[Tensor]) -> int:
    """Where a factor's modes split in two groups for one GEMM between them (:func:`gemm_build`,
    :func:`kcprnn.formats.kcp.algebra.factor_dense_torch`): the first group's mode count, the
    split whose larger group is smallest."""
    sizes = [f.shape[2] * f.shape[3] for f in factor]
    return min(range(1, len(factor)), key=lambda k: max(math.prod(sizes[:k]), math.prod(sizes[k:])))


def _suffix_products(rows: Sequence[Tensor]) -> list[Tensor]:
    """For rows ``rows[d]`` ``(q, s_d)``: ``out[k] = rows[k] ⊙ ... ⊙ rows[-1]`` ``(q, s_k ...)``,
    each row pair's outer product flattened with the later mode innermost. Formed from the
    last mode on, so that each product's inner axis is everything after it (not one mode's
    few entries: a broadcast over a short inner axis runs several times slower)."""
    out = [rows[-1]]
    for f in reversed(rows[:-1]):
        q = f.shape[0]
        out.append((f[:, :, None] * out[-1][:, None, :]).reshape(q, -1))  # (q, s_k ...)
    return out[::-1]


def _suffix_grads(grad: Tensor, rows: Sequence[Tensor], suffixes: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of ``rows`` from the gradient ``grad`` ``(q, Π s_d)`` of their product
    ``suffixes[0]`` (:func:`_suffix_products`): mode by mode, the rest contracted away. Each
    contraction is a broadcast product and a sum: as batched matrix-vector products (``q``
    products of a few dozen entries) MKL took up to 3.5x longer at some of these shapes."""
    out = []
    for k, f in enumerate(rows[:-1]):
        rest = suffixes[k + 1]  # (q, s_{k+1} ...)
        g = grad.view(f.shape[0], f.shape[1], rest.shape[1])  # (q, s_k, s_{k+1} ...)
        out.append((g * rest[:, None, :]).sum(2))  # (q, s_k)
        grad = (g * f[:, :, None]).sum(1)  # (q, s_{k+1} ...)
    out.append(grad)
    return out


def unblock(m: Tensor, factor: Sequence[Tensor]) -> Tensor:
    """The matrix ``(P, J, I)`` of ``factor`` from ``m`` ``(P, ...)`` in the blocked order
    ``(J_1, I_1, J_2, I_2, ...)``: one reorder."""
    p, d = m.shape[0], len(factor)
    axes = [s for f in factor for s in f.shape[2:]]  # J_1, I_1, J_2, I_2, ...
    m = m.reshape(p, *axes).permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2))
    return m.reshape(p, math.prod(axes[0::2]), math.prod(axes[1::2]))  # (P, J, I)


def gemm_build(factor: Sequence[Tensor]) -> tuple[Tensor, Any]:
    """``A_p = Σ_r ⊗_d F_d[p, r]`` ``(P, J, I)`` of ``factor`` (``(P, R, J_d, I_d)`` each) and
    what :func:`gemm_grads` needs: the modes split in two groups, each group's Kronecker
    products per rank formed flat (every mode's ``(J_d, I_d)`` block whole), the sum over the
    rank one batched GEMM between the groups (``P R`` times the matrix's entries), the result
    reordered once. No autograd graph is recorded."""
    with torch.no_grad():
        if len(factor) == 1:
            return factor[0].sum(1), None  # (P, J, I)
        p, r = factor[0].shape[:2]
        half = halves(factor)
        rows = [f.reshape(p * r, -1) for f in factor]  # (p r, J_d I_d)
        left, right = _suffix_products(rows[:half]), _suffix_products(rows[half:])
        m = torch.bmm(left[0].view(p, r, -1).transpose(1, 2), right[0].view(p, r, -1))
        return unblock(m, factor), (rows, half, left, right)  # (P, J, I)


def gemm_grads(factor: Sequence[Tensor], saved: Any, grad: Tensor) -> list[Tensor]:
    """The gradients of ``factor`` from the gradient ``grad`` ``(P, J, I)`` of its matrix built
    by :func:`gemm_build` (``saved``: what it returned besides the matrix): the gradient
    reordered into the groups' blocked order once, two batched GEMMs for the groups' Kronecker
    products (``P R`` times the matrix's entries each), then each group's modes by broadcast
    products and sums (:func:`_suffix_grads`)."""
    with torch.no_grad():
        first = factor[0]
        if saved is None:
            return [grad.unsqueeze(1).expand(first.shape).contiguous()]  # (P, R, J, I)
        rows, half, left, right = saved
        p, r = first.shape[:2]
        d = len(factor)
        axes = [s for f in factor for s in f.shape[2:]]  # J_1, I_1, J_2, I_2, ...
        blocked = [a for k in range(d) for a in (1 + k, 1 + d + k)]  # back to J_1, I_1, ...
        g = grad.reshape(p, *axes[0::2], *axes[1::2]).permute(0, *blocked)
        g = g.reshape(p, left[0].shape[1], right[0].shape[1])  # (P, left, right)
        dl = torch.bmm(right[0].view(p, r, -1), g.transpose(1, 2))  # (P, R, left)
        dr = torch.bmm(left[0].view(p, r, -1), g)  # (P, R, right)
        grads = _suffix_grads(dl.view(p * r, -1), rows[:half], left)
        grads += _suffix_grads(dr.view(p * r, -1), rows[half:], right)
        return [gk.view(f.shape) for gk, f in zip(grads, factor, strict=True)]


def _build(plan: _Plan, fs: Sequence[Tensor]) -> Tensor:
    out = fs[0].new_empty(plan.shape)  # (P, J, I)
    plan.build(*plan.head, _pointers(fs), out.data_ptr())
    return out


def _grads(plan: _Plan, fs: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    grads = [torch.empty_like(f) for f in fs]
    plan.grad(*plan.head, _pointers(fs), grad.data_ptr(), _pointers(grads))
    return grads


def kernel_build(factor: Sequence[Tensor]) -> tuple[Tensor, Any]:
    """``A_p = Σ_r ⊗_d F_d[p, r]`` ``(P, J, I)`` of ``factor`` on the kernel, without autograd,
    and what :func:`kernel_grads` needs. Call only where :func:`applies` holds."""
    plan = _plan_of(factor)
    return _build(plan, [f.detach().contiguous() for f in factor]), plan


def kernel_grads(plan: Any, factor: Sequence[Tensor], grad: Tensor) -> list[Tensor]:
    """The gradients of ``factor`` (contiguous, as :func:`kernel_build` was given them) from the
    gradient ``grad`` ``(P, J, I)`` of its matrix; ``plan``: what :func:`kernel_build`
    returned besides the matrix."""
    return _grads(plan, factor, grad.contiguous())


class RowGrads:
    """The CP factors' gradients of a Kronecker sum of one term and two factors, ``y = (A_0 ⊗
    A_1) x``, at one row, in one call of the kernel (``kcprnn_kcp_row_grads``): the factor
    matrices' gradients ``G A_1 X^T`` and ``G^T A_0 X`` from the row and its output gradient
    (each gathered into the factors' order), then each factor's build backward
    (:func:`kernel_grads`). Made once per version of the weights from the factor matrices
    ``mats`` ``(1, J_n, I_n)``, the contiguous CP factors ``groups`` they were built from by
    :func:`kernel_build` (``plans``: what it returned besides them), and the gathers
    ``in_index`` (the row's entry at each factor-major position) and ``out_index`` (the
    output gradient's), ``None`` where the order is the natural one."""

    def __init__(
        self,
        mats: Sequence[Tensor],
        groups: Sequence[Sequence[Tensor]],
        plans: Sequence[Any],
        in_index: Tensor | None,
        out_index: Tensor | None,
    ) -> None:
        a0, a1 = (m.detach().contiguous() for m in mats)
        i64 = torch.int64
        dims = torch.tensor([a0.shape[1], a0.shape[2], a1.shape[1], a1.shape[2]], dtype=i64)
        nd = (ctypes.c_int * 2)(*[len(g) for g in groups])
        ranks = torch.tensor([g[0].shape[1] for g in groups], dtype=i64)
        blocks = (_P * 2)(*[plan.head[1] for plan in plans])
        offsets = (_P * 2)(*[plan.head[2] for plan in plans])
        factors = [_pointers(g) for g in groups]
        index = [None if t is None else t.to(i64).contiguous() for t in (in_index, out_index)]
        self._keep = (a0, a1, dims, nd, ranks, blocks, offsets, factors, index, groups, plans)
        # the outputs, one after another, as runs of equal shapes: (entries, count, shape)
        self.runs: list[tuple[int, int, tuple[int, ...]]] = []
        for f in (f for g in groups for f in g):
            if self.runs and self.runs[-1][2] == tuple(f.shape):
                n, count, shape = self.runs[-1]
                self.runs[-1] = (n, count + 1, shape)
            else:
                self.runs.append((f.numel(), 1, tuple(f.shape)))
        self.total = sum(n * count for n, count, _ in self.runs)
        self.fn = getattr(native._require(), "kcprnn_kcp_row_grads" + _SUFFIX[a0.dtype])
        self.args = (
            *[None if t is None else t.data_ptr() for t in index], dims.data_ptr(),
            a0.data_ptr(), a1.data_ptr(), nd, blocks, offsets, ranks.data_ptr(), *factors,
        )  # fmt: skip
        self.like = a0

    def __call__(self, x: Tensor, grad: Tensor) -> list[Tensor]:
        """The CP factors' gradients (every factor's modes in order) from the row ``x`` ``(1,
        I)`` and its output gradient ``grad`` ``(1, J)``, both contiguous, in natural order."""
        flat = self.like.new_empty(self.total)
        self.fn(*self.args, x.data_ptr(), grad.data_ptr(), flat.data_ptr())
        out: list[Tensor] = []
        start = 0
        for n, count, shape in self.runs:  # a run of equal shapes in one unbind
            out.extend(flat[start : start + n * count].view(count, *shape).unbind(0))
            start += n * count
        return out


class _FactorDense(torch.autograd.Function):
    """The factor matrices of several Kronecker factors (``sizes[k]`` CP factors each, given
    flat) as one autograd node, each on the kernel where it takes it, else by GEMMs. It keeps
    its inputs itself (not as saved tensors, which a backward frees), so that any number of
    backward passes may go through one build, as through a parameter: the steps of a cell share
    one build per version of the weights. An input changed in place since the build fails the
    backward, as autograd fails it for saved tensors."""

    @staticmethod
    def forward(
        ctx: Any,
        torch_path: Callable[[list[Tensor]], Tensor],
        sizes: tuple[int, ...],
        *flat: Tensor,
    ) -> tuple[Tensor, ...]:
        groups = [[f.contiguous() for f in group] for group in _groups(flat, sizes)]
        # per group: the kernel's plan, or what the GEMMs' backward needs
        ctx.plans, outs = [], []
        for group in groups:
            if _takes(group):
                plan = _plan_of(group)
                ctx.plans.append(plan)
                outs.append(_build(plan, group))
            else:
                out, saved = gemm_build(group)
                ctx.plans.append(saved)
                outs.append(out)
        ctx.flat, ctx.groups, ctx.sizes, ctx.torch_path = flat, groups, sizes, torch_path
        ctx.versions = [f._version for f in flat]
        ctx.set_materialize_grads(False)  # an unused factor matrix gets no gradient
        return tuple(outs)

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
            elif isinstance(plan, _Plan):
                out.extend(_grads(plan, group, grad.contiguous()))
            else:
                out.extend(gemm_grads(group, plan, grad))
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
    CP factors ``F_d``), all in one autograd node (the compiled kernel where :func:`applies`,
    else GEMMs); ``torch_path`` computes one of them on torch operations (for second
    derivatives). Call only where :func:`in_one_node` holds for each."""
    sizes = tuple(len(f) for f in factors)
    return list(_FactorDense.apply(torch_path, sizes, *[t for f in factors for t in f]))
