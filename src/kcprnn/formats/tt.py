r"""Format 'tt': the tensor-train matrix (TT-matrix, MPO) of Oseledets 2011 / Novikov et al. 2015.

.. math::
    W[(j_1, \dots, j_D), (i_1, \dots, i_D)] = G_1[:, j_1, i_1, :]\, G_2[:, j_2, i_2, :] \cdots
    G_D[:, j_D, i_D, :]

with cores ``G_d`` of shape ``(r_{d-1}, J_d, I_d, r_d)`` and ``r_0 = r_D = 1``.

A TT-matrix is a tensor ring whose closing rank ``r_0 = r_D`` is 1: its product, reconstruction
and module code are the ring's (:mod:`kcprnn.formats._ring`, whose public functions are
re-exported here); this module adds what is TT-specific, the rank spec and TT-SVD.

Legend of the shape comments: m output mode, n input mode, r, s rank (left, right of a core),
k the unfolding's remaining axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import CostModel
from ..shapes import validate_positive_int
from ._base import register
from ._ring import (
    ORDERS,
    RingMatrix,
    ring_chunk_rows,
    ring_contraction_order,
    ring_intermediate_size,
    ring_linear,
    ring_linear_flops,
    ring_to_dense,
    ring_to_dense_flops,
)

__all__ = [
    "ORDERS",
    "RingMatrix",
    "TTMatrix",
    "ring_chunk_rows",
    "ring_contraction_order",
    "ring_intermediate_size",
    "ring_linear",
    "ring_linear_flops",
    "ring_to_dense",
    "ring_to_dense_flops",
    "tt_linear",
    "tt_num_params",
    "tt_svd",
    "tt_to_dense",
    "validate_tt_ranks",
]


DEFAULT_RANK = 4
"""Default TT rank of every inner bond (the UCF11 TT-LSTM/GRU setting)."""


# --- pure functions: TT-matrix ---


def validate_tt_ranks(rank: int | Sequence[int], num_modes: int) -> tuple[int, ...]:
    """Resolve a TT rank spec into the ``D + 1`` bond ranks ``(1, r_1, ..., r_{D-1}, 1)``.

    Args:
        rank: one int for every inner bond, the ``D - 1`` inner ranks, or all ``D + 1`` bond
            ranks with ``r_0 = r_D = 1``.
        num_modes: ``D``.
    """
    d = validate_positive_int(num_modes, "num_modes")
    if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        values = tuple(validate_positive_int(r, f"rank[{k}]") for k, r in enumerate(rank))
        if len(values) == d + 1:
            if values[0] != 1 or values[-1] != 1:
                raise ValueError(
                    "a TT-matrix has boundary ranks r_0 = r_D = 1; "
                    f"got rank={list(values)} (use the tensor ring 'tr' for a closing rank > 1)"
                )
            return values
        if len(values) != d - 1:
            raise ValueError(
                f"rank of a TT-matrix with D={d} cores needs the {d - 1} inner ranks "
                f"(or all {d + 1} with r_0 = r_D = 1), got rank={list(values)} ({len(values)})"
            )
        return (1, *values, 1)
    r = validate_positive_int(rank, "rank")
    return (1, *(r,) * (d - 1), 1)


def tt_num_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """``Σ_d r_{d-1} J_d I_d r_d`` for bond ranks ``ranks`` (``D + 1`` entries)."""
    return sum(ranks[d] * out_modes[d] * in_modes[d] * ranks[d + 1] for d in range(len(in_modes)))


def tt_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """Reconstruct the ``(J_1 ⋯ J_D, I_1 ⋯ I_D)`` matrix from cores ``(r_{d-1}, J_d, I_d, r_d)``."""
    return ring_to_dense(cores)


def tt_linear(
    x: Tensor,
    cores: Sequence[Tensor],
    order: str | None = None,
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` for a TT-matrix ``W``: ``(b, I_1 ⋯ I_D) -> (b, J_1 ⋯ J_D)``.

    See :func:`ring_linear` for ``order`` and ``cost_model``.
    """
    return ring_linear(x, cores, order, cost_model=cost_model)


def tt_svd(
    weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> list[Tensor]:
    """TT-SVD (Oseledets 2011) of a ``(J_1 ⋯ J_D, I_1 ⋯ I_D)`` matrix, truncated to ``ranks``.

    Sequential truncated SVDs of the tensor with merged modes ``(J_d I_d)``. Each inner rank is
    capped at what the unfolding can hold, ``min(r_d, r_{d-1} J_d I_d, Π_{k>d} J_k I_k)``; with
    every rank at that cap the decomposition is exact. Computed in float64, returned in the
    dtype of ``weight``.

    Returns:
        ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)``.
    """
    d_count = len(in_modes)
    t = weight.detach().to(torch.float64)
    t = t.reshape(*out_modes, *in_modes)  # (J_1..J_D, I_1..I_D)
    perm = [k for d in range(d_count) for k in (d, d_count + d)]
    t = t.permute(*perm)  # (J_1, I_1, ..., J_D, I_D)
    cores = []
    r_prev = 1
    rest = t.reshape(1, -1)  # (r, k)
    for d in range(d_count - 1):
        merged = out_modes[d] * in_modes[d]
        mat = rest.reshape(r_prev * merged, -1)  # (r*m*n, k)
        u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(ranks[d + 1], sv.shape[0])
        cores.append(u[:, :r].reshape(r_prev, out_modes[d], in_modes[d], r))  # (r, m, n, s)
        rest = sv[:r, None] * vh[:r]  # (s, k)
        r_prev = r
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], 1))  # (r, m, n, 1)
    return [core.to(weight.dtype) for core in cores]


# --- module ---


@register("tt")
class TTMatrix(RingMatrix):
    r"""A weight matrix in TT-matrix format.

    .. math::
        W[(j_1 \dots j_D), (i_1 \dots i_D)] = \prod_{d=1}^{D} G_d[:, j_d, i_d, :]
        \quad (r_0 = r_D = 1)

    Parameters: ``Σ_d r_{d-1} J_d I_d r_d`` (the UCF11 TT-LSTM, ``8×20×20×18 -> 16×4×4×4``
    at rank 4, has 3,360).

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: one int for all ``D - 1`` inner bonds, their list, or the full ``D + 1`` list with
            ones at both ends. Default 4 (the TT-LSTM/GRU papers' UCF11 setting).
        init: how :meth:`reset_parameters` draws the cores so that ``W`` has the target std
            (``nn.Linear``'s by default): ``"uniform"`` (default; i.i.d. uniform entries, the
            variance of ``W`` exact in expectation) or ``"orthogonal"`` (every core's
            ``(r_{d-1} J_d I_d, r_d)`` unfolding a random norm-preserving map, one scale; for a
            TT the mean square of ``W`` is then exact for every draw). docs/accuracy.md
            compares them.

    Attributes:
        cores: ``nn.ParameterList`` of ``D`` tensors ``(r_{d-1}, J_d, I_d, r_d)``.
        ranks: the ``D + 1`` bond ranks.

    Example:
        >>> w = TTMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4)
        >>> w.num_params
        3360
        >>> w(torch.randn(2, 57600)).shape
        torch.Size([2, 1024])
    """

    default_rank = DEFAULT_RANK
    resolve_ranks = staticmethod(validate_tt_ranks)
    decompose = staticmethod(tt_svd)

    @property
    def bonds(self) -> tuple[int, ...]:
        return self.ranks

    @staticmethod
    def ranks_of_cores(cores: Sequence[Tensor]) -> list[int]:
        return [core.shape[0] for core in cores] + [1]
