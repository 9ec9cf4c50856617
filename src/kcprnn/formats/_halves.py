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

from torch import Tensor

__all__ = ["join_halves", "kron_rows", "split_point"]


def split_point(num_modes: int) -> int:
    """Modes in the leading group: half of them (the trailing group gets the rest), so that
    both halves are small and the copy into ``W`` moves runs of the trailing input modes."""
    return num_modes // 2


def join_halves(left: Tensor, right: Tensor) -> Tensor:
    """``W[(a, c), (b, d)] = Σ_s left[s, a, b] right[s, c, d]`` for ``left`` ``(s, a, b)`` and
    ``right`` ``(s, c, d)``: ``(a c, b d)``, contiguous."""
    s, a, b = left.shape
    c, d = right.shape[1], right.shape[2]
    w = left.reshape(s, a * b).mT @ right.reshape(s, c * d)  # (a b, c d)
    return w.view(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)  # (a c, b d)


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
