"""Dense reconstruction by halves: the formats' ``to_dense`` as GEMMs that write ``W`` in place.

Every format here writes ``W[(j_L, j_R), (i_L, i_R)]`` (the modes split into a leading and a
trailing group, ``j = (j_L, j_R)`` and ``i = (i_L, i_R)`` row-major) as a sum over a joining
index ``s``:

    ``W[(j_L, j_R), (i_L, i_R)] = Σ_s L[s, j_L, i_L] R[s, j_R, i_R]``

(CP: ``s`` the rank; Tucker and BT: the blocks and the first mode's rank, ``L`` the first
factor; HT: the root's right rank; TT and TR close their ring the same way in ``_ring``).
The cost is :func:`join_halves`: GEMMs with inner dimension ``S``, ``J I S`` MACs, computed
in cache-sized slabs that are copied into ``W``'s natural layout as they come; its backward
copies the gradient of ``W`` back slab by slab and runs two GEMMs per slab, which reads the
gradient once and is the cheapest contraction of a dense gradient back to the halves.

:func:`outer_rows` and :func:`outer_grads` are the per-rank outer products a CP half is made
of and their gradients; :func:`merged_to_half` and :func:`half_to_merged` move a half between
merged-mode order and the ``(s, j, i)`` layout the join takes.

Shape comments: ``s`` the joining index, ``a``/``b`` the leading group's out/in size,
``c``/``d`` the trailing group's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "join_halves",
    "join_halves_backward",
    "join_halves_plain",
    "half_to_merged",
    "kron_rows",
    "merged_to_half",
    "needs_graph",
    "outer_grads",
    "outer_rows",
]


JOIN_CHUNK_ELEMENTS = 1 << 18
"""Entries of the product's slab that :func:`join_halves` computes per GEMM (1 MiB in
float32): each slab stays in cache while it is copied into ``W``, and no buffer the size of
``W`` other than ``W`` itself (or its gradient's copy) is ever allocated."""


def _slabs(a: int, row: int) -> list[tuple[int, int]]:
    """Ranges of the leading out-index ``a`` whose slab, ``row`` entries per ``a``, fits
    :data:`JOIN_CHUNK_ELEMENTS`."""
    step = max(1, JOIN_CHUNK_ELEMENTS // max(1, row))
    return [(lo, min(a, lo + step)) for lo in range(0, a, step)]


def join_halves_plain(left: Tensor, right: Tensor) -> Tensor:
    """:func:`join_halves` as one GEMM and one copy in plain operators, differentiated by
    autograd: the halves' gradients then come as ``(a b, s)`` products viewed as ``(s, a, b)``,
    which suits halves that are themselves views of ``(x, s)`` frames (HT's)."""
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    w = left.reshape(s, a * b).mT @ right.reshape(s, c * d)  # (a b, c d)
    return w.view(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)  # (a c, b d)


def _join(left: Tensor, right: Tensor) -> Tensor:
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    slabs = _slabs(a, b * c * d)
    if len(slabs) == 1 or torch.compiler.is_compiling():
        return join_halves_plain(left, right)
    lm, rm = left.reshape(s, a * b), right.reshape(s, c * d)
    w = torch.empty(a, c, b, d, dtype=torch.result_type(left, right), device=left.device)
    for lo, hi in slabs:
        z = lm[:, lo * b : hi * b].mT @ rm  # (n b, c d): one slab, in cache
        w[lo:hi].copy_(z.view(hi - lo, b, c, d).transpose(1, 2))  # (n, c, b, d)
    return w.view(a * c, b * d)  # (a c, b d)


def join_halves_backward(grad: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`join_halves` with respect to ``left`` and ``right`` for the gradient
    ``grad`` ``(a c, b d)`` of ``W``: per slab of ``a``, the slab of ``grad`` copied into the
    product's layout (in cache) and one GEMM per half, written in that half's own layout
    ``(s, a, b)`` / ``(s, c, d)``. With autograd recording (a second derivative) it is the same
    in one slab of plain differentiable operations."""
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    lm, rm = left.reshape(s, a * b), right.reshape(s, c * d)
    g = grad.reshape(a, c, b, d)
    slabs = _slabs(a, b * c * d)
    if len(slabs) == 1 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        gm = g.transpose(1, 2).reshape(a * b, c * d)  # (a b, c d)
        return (rm @ gm.mT).view(s, a, b), (lm @ gm).view(s, c, d)
    grad_left = torch.empty(s, a * b, dtype=lm.dtype, device=lm.device)
    grad_right = torch.zeros(s, c * d, dtype=rm.dtype, device=rm.device)
    for lo, hi in slabs:
        gm = g[lo:hi].transpose(1, 2).reshape((hi - lo) * b, c * d)  # (n b, c d)
        grad_left[:, lo * b : hi * b] = rm @ gm.mT  # (s, n b)
        grad_right.addmm_(lm[:, lo * b : hi * b], gm)  # (s, c d)
    return grad_left.view(s, a, b), grad_right.view(s, c, d)


class _JoinHalves(torch.autograd.Function):
    """:func:`join_halves` with :func:`join_halves_backward` as its backward (autograd's own
    would return the halves' gradients transposed, which the small operations before the join
    then read strided). The backward is written in differentiable operations, so second
    derivatives work too."""

    @staticmethod
    def forward(ctx, left: Tensor, right: Tensor) -> Tensor:
        ctx.save_for_backward(left, right)
        return _join(left, right)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        left, right = ctx.saved_tensors
        return join_halves_backward(grad, left, right)


def needs_graph(*tensors: Tensor) -> bool:
    """Whether a reconstruction from ``tensors`` records autograd outside of ``torch.compile``
    and ``torch.export`` (which trace the plain operators instead of custom functions)."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.compiler.is_compiling()
    )


def join_halves(left: Tensor, right: Tensor) -> Tensor:
    """``W[(a, c), (b, d)] = Σ_s left[s, a, b] right[s, c, d]`` for ``left`` ``(s, a, b)`` and
    ``right`` ``(s, c, d)``: ``(a c, b d)``, contiguous. Its backward is
    :func:`join_halves_backward`."""
    if needs_graph(left, right):
        return _JoinHalves.apply(left, right)
    return _join(left, right)


def kron_rows(mats: Sequence[Tensor]) -> Tensor:
    """Per leading index, the Kronecker product of ``mats`` ``(t, s_k, J_k, I_k)`` over both the
    ``s`` axes and the matrices: ``(t, Π s_k, Π J_k, Π I_k)``, row-major in every group (a
    single matrix is returned as it is)."""
    a = mats[0]  # (t, s, j, i)
    for m in mats[1:]:
        t, s, j, i = a.shape
        u, v, w = m.shape[1:]
        prod = a[:, :, None, :, None, :, None] * m[:, None, :, None, :, None, :]
        a = prod.reshape(t, s * u, j * v, i * w)  # (t, s u, j v, i w)
    return a


def outer_rows(vectors: Sequence[Tensor]) -> Tensor:
    """Per leading index, the outer product of ``vectors`` ``(t, m_k)``, flattened row-major:
    ``(t, Π m_k)``."""
    out = vectors[0]  # (t, m)
    for v in vectors[1:]:
        out = (out.unsqueeze(2) * v.unsqueeze(1)).reshape(out.shape[0], -1)  # (t, m m')
    return out


def outer_grads(grad: Tensor, vectors: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of :func:`outer_rows` ``(vectors)`` with respect to each of ``vectors`` for
    the gradient ``grad`` ``(t, Π m_k)`` of its result: for vector ``e``, ``grad`` viewed as
    ``(t, P, m_e, Q)`` contracted with the outer products of the vectors before (``P``) and
    after (``Q``) it, as two batched matrix-vector products on contiguous views."""
    t = grad.shape[0]
    sizes = [v.shape[1] for v in vectors]
    grads = []
    for e, m in enumerate(sizes):
        p, q = math.prod(sizes[:e]), math.prod(sizes[e + 1 :])
        h = grad.reshape(t, p, m * q)  # (t, P, m Q)
        if e > 0:
            h = torch.bmm(outer_rows(vectors[:e]).unsqueeze(1), h)  # (t, 1, m Q)
        h = h.reshape(t, m, q)  # (t, m, Q)
        if e + 1 < len(vectors):
            h = torch.bmm(h, outer_rows(vectors[e + 1 :]).unsqueeze(2))  # (t, m, 1)
        grads.append(h.reshape(t, m))  # (t, m)
    return grads


def merged_to_half(t: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """``(s, J_1 I_1 ⋯ J_k I_k)`` (merged modes, ``j`` major in each) -> ``(s, Π J, Π I)``."""
    k = len(in_modes)
    pairs = [size for e in range(k) for size in (out_modes[e], in_modes[e])]
    t = t.reshape(t.shape[0], *pairs)  # (s, j_1, i_1, ..., j_k, i_k)
    t = t.permute(0, *range(1, 2 * k + 1, 2), *range(2, 2 * k + 1, 2))  # (s, j.., i..)
    return t.reshape(t.shape[0], math.prod(out_modes), math.prod(in_modes))


def half_to_merged(t: Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> Tensor:
    """The inverse of :func:`merged_to_half`: ``(s, Π J, Π I)`` -> ``(s, Π J_e I_e)``."""
    k = len(in_modes)
    t = t.reshape(t.shape[0], *out_modes, *in_modes)  # (s, j.., i..)
    t = t.permute(0, *(i for e in range(k) for i in (1 + e, 1 + k + e)))  # (s, j_1, i_1, ..)
    return t.reshape(t.shape[0], -1)
