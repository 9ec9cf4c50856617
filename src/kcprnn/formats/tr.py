r"""Format 'tr': the tensor-ring matrix (Zhao et al. 2016; TR-LSTM of Pan et al., AAAI 2019).

.. math::
    W[(j_1, \dots, j_D), (i_1, \dots, i_D)] = \operatorname{Tr}\big(G_1[:, j_1, i_1, :]\,
    G_2[:, j_2, i_2, :] \cdots G_D[:, j_D, i_D, :]\big)

with cores ``G_d`` of shape ``(r_{d-1}, J_d, I_d, r_d)`` and ``r_0 = r_D`` (the ring rank that
the trace closes). With ``r_0 = 1`` it is a TT-matrix.

The contractions are the ring sweeps of :mod:`kcprnn.formats._ring` (shared with the
TT-matrix, the ring of closing rank 1). Both sweeps carry the closing rank ``c = r_0`` through
every step: the first step, which reads the whole input, maps each slice of ``I_d`` entries to
``r_{d-1} J_d r_d`` entries whatever the sweep, and the one with fewer multiply-accumulates is
taken (:func:`~kcprnn.formats._ring.ring_contraction_order`).

Legend of the shape comments: m output mode, n input mode, r, s rank (left, right of a core),
k a merged contraction axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._cpu import CostModel
from ..shapes import validate_ranks
from ._base import register
from ._ring import RingMatrix, ring_linear, ring_to_dense

__all__ = ["TRMatrix", "tr_linear", "tr_num_params", "tr_svd", "tr_to_dense", "validate_tr_ranks"]

DEFAULT_RANK = 4
"""Default ring rank of every bond (TR-LSTM's UCF11 setting)."""


# --- pure functions ---


def validate_tr_ranks(rank: int | Sequence[int], num_modes: int) -> tuple[int, ...]:
    """Resolve a TR rank spec into the ``D`` ring ranks ``(r_0, ..., r_{D-1})`` (``r_D = r_0``).

    Args:
        rank: one int for every bond, or the list of the ``D`` ring ranks.
        num_modes: ``D``.
    """
    return validate_ranks(rank, num_modes, "rank")


def _bonds(ranks: Sequence[int]) -> tuple[int, ...]:
    return (*ranks, ranks[0])  # r_0, ..., r_{D-1}, r_D = r_0


def tr_num_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """``Σ_d r_{d-1} J_d I_d r_d`` for the ``D`` ring ranks ``ranks``."""
    b = _bonds(ranks)
    return sum(b[d] * out_modes[d] * in_modes[d] * b[d + 1] for d in range(len(in_modes)))


def tr_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """Reconstruct the ``(J_1 ⋯ J_D, I_1 ⋯ I_D)`` matrix: merge the cores, then take the trace."""
    return ring_to_dense(cores)


def tr_linear(
    x: Tensor,
    cores: Sequence[Tensor],
    order: str | None = None,
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` for a tensor ring ``W``: ``(b, I_1 ⋯ I_D) -> (b, J_1 ⋯ J_D)``.

    See :func:`~kcprnn.formats._ring.ring_linear` for ``order`` and ``cost_model``.
    """
    return ring_linear(x, cores, order, cost_model=cost_model)


def tr_svd(
    weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> list[Tensor]:
    """TR-SVD (Zhao et al. 2016, Alg. 1) of a ``(J_1 ⋯ J_D, I_1 ⋯ I_D)`` matrix.

    The first unfolding ``(J_1 I_1, rest)`` is truncated to ``r_0 r_1`` singular vectors, split
    into the two ranks that close the ring; the rest is a TT-SVD whose last core receives
    ``r_0``. Ranks above what an unfolding can hold are capped (``r_1`` first, then ``r_0``), so
    a large ``rank`` gives an exact decomposition. Computed in float64, returned in the dtype of
    ``weight``.

    Returns:
        ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)`` with ``r_D = r_0``.
    """
    d_count = len(in_modes)
    t = weight.detach().to(torch.float64).reshape(*out_modes, *in_modes)  # (J.., I..)
    t = t.permute(*[k for d in range(d_count) for k in (d, d_count + d)])  # (J_1, I_1, ...)
    merged = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    if d_count == 1:
        # a ring of one core: W = Σ_a G[a, :, :, a]; the rank-1 ring holds W exactly
        return [t.reshape(1, out_modes[0], in_modes[0], 1).to(weight.dtype)]
    u, sv, vh = torch.linalg.svd(t.reshape(merged[0], -1), full_matrices=False)
    avail = sv.shape[0]
    r0, r1 = ranks[0], ranks[1]
    if r0 * r1 > avail:
        r1 = max(1, avail // r0)
        r0 = min(r0, avail)
    k = r0 * r1
    first = u[:, :k].reshape(merged[0], r0, r1).permute(1, 0, 2)  # (r, m*n, s)
    cores = [first.reshape(r0, out_modes[0], in_modes[0], r1)]  # (r, m, n, s)
    rest = (sv[:k, None] * vh[:k]).reshape(r0, r1, -1)  # (r0, r1, k)
    rest = rest.permute(1, 2, 0)  # (r1, k, r0): r0 rides along as the last index
    r_prev = r1
    for d in range(1, d_count - 1):
        mat = rest.reshape(r_prev * merged[d], -1)  # (r*m*n, k*r0)
        u, sv, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(ranks[d + 1], sv.shape[0])
        cores.append(u[:, :r].reshape(r_prev, out_modes[d], in_modes[d], r))  # (r, m, n, s)
        rest = sv[:r, None] * vh[:r]  # (s, k*r0)
        r_prev = r
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], r0))  # (r, m, n, r0)
    return [core.to(weight.dtype) for core in cores]


# --- module ---


@register("tr")
class TRMatrix(RingMatrix):
    r"""A weight matrix in tensor-ring format.

    .. math::
        W[(j_1 \dots j_D), (i_1 \dots i_D)] = \operatorname{Tr} \prod_{d=1}^{D} G_d[:, j_d, i_d, :]
        \quad (r_D = r_0)

    Parameters: ``Σ_d r_{d-1} J_d I_d r_d``.

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: one int for all ``D`` ring bonds or the list ``(r_0, ..., r_{D-1})``. Default 4.
        init: how :meth:`reset_parameters` draws the cores so that ``W`` has the target std
            (``nn.Linear``'s by default): ``"uniform"`` (default; i.i.d. uniform entries, the
            variance of ``W`` exact in expectation) or ``"orthogonal"`` (every core's
            ``(r_{d-1} J_d I_d, r_d)`` unfolding a random norm-preserving map, one scale; the
            mean square of ``W`` exact in expectation). docs/accuracy.md compares them.

    Attributes:
        cores: ``nn.ParameterList`` of ``D`` tensors ``(r_{d-1}, J_d, I_d, r_d)``.
        ranks: the ``D`` ring ranks.

    Example:
        >>> w = TRMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4)
        >>> w.num_params
        5760
        >>> w(torch.randn(2, 57600)).shape
        torch.Size([2, 1024])
    """

    default_rank = DEFAULT_RANK
    resolve_ranks = staticmethod(validate_tr_ranks)
    decompose = staticmethod(tr_svd)

    @property
    def bonds(self) -> tuple[int, ...]:
        return _bonds(self.ranks)

    @staticmethod
    def ranks_of_cores(cores: Sequence[Tensor]) -> list[int]:
        return [core.shape[0] for core in cores]
