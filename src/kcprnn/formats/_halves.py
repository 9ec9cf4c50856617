"""Dense reconstruction by halves: the formats' ``to_dense`` as one GEMM and one copy.

Every format here writes ``W[(j_L, j_R), (i_L, i_R)]`` (the modes split into a leading and a
trailing group, ``j = (j_L, j_R)`` and ``i = (i_L, i_R)`` row-major) as a sum over a small
joining index ``s``:

    ``W[(j_L, j_R), (i_L, i_R)] = Σ_s L[s, j_L, i_L] R[s, j_R, i_R]``

(CP: ``s`` the rank; Tucker and BT: the blocks and the trailing modes' ranks; HT: the root's
right rank; TT and TR do the same in ``_ring``). Both halves are small (about ``sqrt(I J)``
entries per ``s``), so the cost is :func:`join_halves`: one GEMM with inner dimension ``S``
and one copy into ``W``'s natural layout; its backward is the same copy back and two GEMMs
that read ``W``'s gradient once each, which is the cheapest contraction of a dense gradient
back to the halves.

Shape comments: ``s`` the joining index, ``a``/``b`` the leading group's out/in size,
``c``/``d`` the trailing group's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "join_halves",
    "join_halves_backward",
    "kron_grads",
    "kron_rows",
    "needs_graph",
    "split_point",
]


def split_point(num_modes: int) -> int:
    """Modes in the leading group: half of them (the trailing group gets the rest), so that
    both halves are small and the copy into ``W`` moves runs of the trailing input modes."""
    return num_modes // 2


JOIN_CHUNK_ELEMENTS = 1 << 17
"""Entries of the product's slab that :func:`join_halves` computes per GEMM (512 KiB in
float32): each slab stays in cache while it is copied into ``W``, and no buffer the size of
``W`` other than ``W`` itself (or its gradient's copy) is ever allocated."""


def _slabs(a: int, row: int) -> list[tuple[int, int]]:
    """Ranges of the leading out-index ``a`` whose slab, ``row`` entries per ``a``, fits
    :data:`JOIN_CHUNK_ELEMENTS`."""
    step = max(1, JOIN_CHUNK_ELEMENTS // max(1, row))
    return [(lo, min(a, lo + step)) for lo in range(0, a, step)]


def _join_plain(left: Tensor, right: Tensor) -> Tensor:
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    w = left.reshape(s, a * b).mT @ right.reshape(s, c * d)  # (a b, c d)
    return w.view(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)  # (a c, b d)


def _join(left: Tensor, right: Tensor) -> Tensor:
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    slabs = _slabs(a, b * c * d)
    if len(slabs) == 1 or torch.compiler.is_compiling():
        return _join_plain(left, right)
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


def kron_grads(grad: Tensor, mats: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of :func:`kron_rows` ``(mats)`` with respect to each of ``mats``
    ``(t, s_k, J_k, I_k)`` for the gradient ``grad`` ``(t, Π s_k, Π J_k, Π I_k)`` of its
    result: for every matrix, ``grad`` contracted with all the others (one ``einsum`` each)."""
    if len(mats) == 1:
        return [grad.reshape(mats[0].shape)]
    k = len(mats)
    # sublists: t = 0, s_k = 1 + k', J_k = 1 + k + k', I_k = 1 + 2 k + k'
    sub = [[0, 1 + e, 1 + k + e, 1 + 2 * k + e] for e in range(k)]
    shape = [grad.shape[0], *(m.shape[1] for m in mats)]
    shape += [m.shape[2] for m in mats] + [m.shape[3] for m in mats]
    g = grad.reshape(shape)  # (t, s_1 .. s_k, J_1 .. J_k, I_1 .. I_k)
    g_sub = [0, *range(1, 1 + 3 * k)]
    grads = []
    for e in range(k):
        operands: list[object] = [g, g_sub]
        for f in range(k):
            if f != e:
                operands += [mats[f], sub[f]]
        grads.append(torch.einsum(*operands, sub[e]))  # (t, s_e, J_e, I_e)
    return grads
