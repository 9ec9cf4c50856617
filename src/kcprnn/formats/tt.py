r"""Format 'tt': the tensor-train matrix (TT-matrix, MPO) of Oseledets 2011 / Novikov et al. 2015.

.. math::
    W[(j_1, \dots, j_D), (i_1, \dots, i_D)] = G_1[:, j_1, i_1, :]\, G_2[:, j_2, i_2, :] \cdots
    G_D[:, j_D, i_D, :]

with cores ``G_d`` of shape ``(r_{d-1}, J_d, I_d, r_d)`` and ``r_0 = r_D = 1``.

The contraction code here is shared with the tensor ring (:mod:`.tr`): a TT-matrix is a ring
whose closing rank ``c = r_0 = r_D`` is 1, and the sweeps below carry ``c`` along and take the
trace at the end.

Legend of the shape comments: b batch rows, n input mode (current), m output mode (current),
r, s rank (left, right of the current core), c ring rank (``r_0 = r_D``; 1 for a TT),
q input modes not yet contracted, o output modes already produced (with ``c`` while it is open).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..shapes import resolve_modes, validate_positive_int
from ._base import FactorizedMatrix, register

__all__ = [
    "RingMatrix",
    "TTMatrix",
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

ORDERS = ("right_to_left", "left_to_right")
"""The two sweeps of :func:`ring_linear`: start at the last input mode or at the first."""


# --- pure functions: ring sweeps (TT is the ring of closing rank 1) ---


def _core_shapes(cores: Sequence[Tensor]) -> list[tuple[int, int, int, int]]:
    return [tuple(core.shape) for core in cores]  # type: ignore[misc]


def ring_linear_flops(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    rows: int,
    order: str,
) -> int:
    """Multiply-accumulates of :func:`ring_linear` with sweep ``order`` on ``rows`` rows.

    ``ranks`` are the ``D + 1`` bond ranks ``r_0, ..., r_D`` with ``r_0 = r_D = c``.
    Each step is one matrix product ``(rows', k) @ (k, cols)``; its cost is
    ``rows' * k * cols``. The closing trace of a ring adds no multiplications.
    """
    d_count = len(in_modes)
    c = ranks[0]
    in_total = math.prod(in_modes)
    total = 0
    if order == "right_to_left":
        # step D: every input row against core D: (b*I/I_D, I_D) @ (I_D, c*r*m)
        total += rows * in_total * c * ranks[d_count - 1] * out_modes[-1]
        for d in range(d_count - 2, -1, -1):
            left = rows * math.prod(in_modes[:d]) * math.prod(out_modes[d + 1 :]) * c
            total += left * in_modes[d] * ranks[d + 1] * ranks[d] * out_modes[d]
    elif order == "left_to_right":
        for d in range(d_count):
            left = rows * (c if d else 1) * math.prod(out_modes[:d])
            k = ranks[d] * in_modes[d] if d else in_modes[0]
            cols = out_modes[d] * ranks[d + 1] * (1 if d else c)
            total += left * k * cols * math.prod(in_modes[d + 1 :])
    else:
        raise ValueError(f"order must be one of {list(ORDERS)}, got order={order!r}")
    return total


def ring_contraction_order(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], rows: int
) -> str:
    """The sweep of :func:`ring_linear` with the fewest multiply-accumulates (ties: right to left).

    Both sweeps contract the input modes one at a time, so the first step (which reads the
    whole input) dominates: right to left it maps ``I_D -> r_{D-1} J_D c`` per slice, left to
    right ``I_1 -> c J_1 r_1``. With the LSTM gates folded into ``J_1`` (UCF11, ``8×20×20×18
    -> 16×4×4×4``, rank 4) starting at the last mode takes 6.5x fewer multiply-accumulates
    (186M vs 1.21G on 96 rows); mirrored shapes get the mirrored choice.
    """
    costs = {o: ring_linear_flops(in_modes, out_modes, ranks, rows, o) for o in ORDERS}
    return min(ORDERS, key=lambda o: costs[o])


def _sweep_right_to_left(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    shapes = _core_shapes(cores)
    b = x.shape[0]
    r, m, n, c = shapes[-1]
    q = math.prod(shape[2] for shape in shapes[:-1])  # input modes left of the current core
    # step D: one GEMM over the whole input, no copy of x (its last mode is contiguous)
    a = cores[-1].permute(2, 0, 1, 3).reshape(n, r * m * c)  # (n, r*m*c)
    z = x.reshape(b * q, n) @ a  # (b*q, r*m*c): physically (b, q, n', s, o) with o = (m, c)
    o, m_prev = m * c, None
    steps = zip(reversed(cores[:-1]), reversed(shapes[:-1]), strict=True)
    for step, (core, (r, m, n, s)) in enumerate(steps):
        q //= n
        a = core.permute(2, 3, 0, 1).reshape(n * s, r * m)  # (n*s, r*m)
        if step == 0:
            # (n, s) are adjacent rows of every slice: matmul on the transposed view, measured
            # faster than an explicit permute copy + GEMM on the largest intermediate (UCF11,
            # 1 thread: 2.7 vs 5.0 ms)
            z = torch.matmul(z.reshape(b * q, n * s, o).mT, a)  # (b*q, o, r*m)
        else:
            # move the finished output mode next to o and (n, s) last: one copy of a small
            # intermediate, then one GEMM
            z = z.reshape(b * q, n, o, s, m_prev).permute(0, 4, 2, 1, 3)  # (b*q, m', o, n, s)
            z = z.reshape(b * q * m_prev * o, n * s) @ a  # (b*q*m'*o, r*m)
            o *= m_prev
        m_prev = m
    if m_prev is None:  # D = 1: z is (b, r_0 * J_1 * c)
        z = z.reshape(b, 1, c, m, c).permute(0, 1, 4, 2, 3)  # (b, o=1, c, c, m)
        o = c
    # z: (b, o = J_2..J_D * c, r_0 = c, J_1)
    m = shapes[0][1]
    z = z.reshape(b, o // c, c, c, m)  # (b, o, c, c, m)
    if c == 1:
        z = z.reshape(b, o, m)  # (b, o, m)
    else:
        z = z.diagonal(dim1=2, dim2=3).sum(-1)  # (b, o, m)
    return z.transpose(1, 2).reshape(b, m * (o // c))  # (b, J_1*J_2*...*J_D)


def _sweep_left_to_right(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    shapes = _core_shapes(cores)
    b = x.shape[0]
    c, m, n, s = shapes[0]
    q = math.prod(shape[2] for shape in shapes[1:])  # input modes right of the current core
    # x is read as (b, n, q): batched GEMMs with the core on the left, on views of x
    a = cores[0].permute(0, 1, 3, 2).reshape(c * m * s, n)  # (c*m*s, n)
    z = torch.matmul(a, x.reshape(b, n, q))  # (b, c*m*s, q)
    o = c * m  # (c, J_1..J_d) done ahead of the current core
    for core, (r, m, n, s) in zip(cores[1:], shapes[1:], strict=True):
        q //= n
        a = core.permute(1, 3, 0, 2).reshape(m * s, r * n)  # (m*s, r*n)
        z = torch.matmul(a, z.reshape(b * o, r * n, q))  # (b*c*o, m*s, q)
        o *= m
    # z: (b, c, J_1..J_D, s = c, q = 1)
    out = o // c
    z = z.reshape(b, c, out, c)  # (b, c, o, c)
    if c == 1:
        return z.reshape(b, out)  # (b, o)
    return z.diagonal(dim1=1, dim2=3).sum(-1)  # (b, o)


def ring_intermediate_size(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], order: str
) -> int:
    """Entries per input row of the largest intermediate of :func:`ring_linear` with ``order``."""
    d_count, c = len(in_modes), ranks[0]
    if order == "right_to_left":
        sizes = [
            math.prod(in_modes[:d]) * ranks[d] * out_modes[d] * math.prod(out_modes[d + 1 :]) * c
            for d in range(d_count)
        ]
    elif order == "left_to_right":
        sizes = [
            c * math.prod(out_modes[: d + 1]) * ranks[d + 1] * math.prod(in_modes[d + 1 :])
            for d in range(d_count)
        ]
    else:
        raise ValueError(f"order must be one of {list(ORDERS)}, got order={order!r}")
    return max(sizes)


CHUNK_ENTRIES = 1 << 23
"""Rows are swept in chunks whose largest intermediate holds at most this many entries (32 MB in
float32). One sweep over many rows allocates (and page-faults) a fresh buffer of that size per
step; at 57,600 -> 1,024 on 96 rows, ring rank 4 (19.7M entries) takes 107 ms forward in one
sweep and 35-50 ms in chunks (1 thread, CPU time). Each chunk adds a dozen small parallel
regions, which cost far more than they save on a contended 2-thread machine (TT: 148 ms in one
sweep vs 656 ms in 2^20-entry chunks, wall clock), so only intermediates beyond this size are
split; TT and ring rank 2 at that size (4.9M entries) run in one sweep."""


def ring_linear(x: Tensor, cores: Sequence[Tensor], order: str | None = None) -> Tensor:
    r"""``x @ W.T`` for a TT-matrix or tensor ring ``W``, without forming ``W``.

    Rows are processed in chunks of at most :data:`CHUNK_ENTRIES` intermediate entries.

    Args:
        x: ``(b, I_1 ⋯ I_D)`` rows.
        cores: ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)`` with ``r_0 = r_D`` (1 for a TT-matrix).
        order: ``"right_to_left"`` (contract ``I_D`` first with one GEMM over the input, then
            bring each finished output mode forward and contract with one GEMM per core),
            ``"left_to_right"`` (contract ``I_1`` first; batched GEMMs with the core on the
            left, no copies), or ``None`` to pick the cheaper one with
            :func:`ring_contraction_order`.

    Returns:
        ``(b, J_1 ⋯ J_D)``.
    """
    shapes = _core_shapes(cores)
    in_modes, out_modes = [s[2] for s in shapes], [s[1] for s in shapes]
    ranks = [s[0] for s in shapes] + [shapes[-1][3]]
    if order is None:
        order = ring_contraction_order(in_modes, out_modes, ranks, x.shape[0])
    if order == "right_to_left":
        sweep = _sweep_right_to_left
    elif order == "left_to_right":
        sweep = _sweep_left_to_right
    else:
        raise ValueError(f"order must be one of {list(ORDERS)} or None, got order={order!r}")
    chunk = max(1, CHUNK_ENTRIES // ring_intermediate_size(in_modes, out_modes, ranks, order))
    if x.shape[0] <= chunk:
        return sweep(x, cores)  # (b, J_1*...*J_D)
    return torch.cat([sweep(part, cores) for part in x.split(chunk)])  # (b, J_1*...*J_D)


def ring_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """Reconstruct ``W`` (``(J_1 ⋯ J_D, I_1 ⋯ I_D)``) from ring/TT cores, merging left to right."""
    w = cores[0]  # (c, o, q, s)
    for core in cores[1:]:
        c, o, q, r = w.shape
        _, m, n, s = core.shape
        w = torch.einsum("coqr,rmns->comqns", w, core)  # (c, o, m, q, n, s)
        w = w.reshape(c, o * m, q * n, s)  # (c, o, q, s)
    return w.diagonal(dim1=0, dim2=3).sum(-1)  # (o, q)


def ring_to_dense_flops(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> int:
    """Multiply-accumulates of :func:`ring_to_dense` (the closing trace adds none)."""
    c = ranks[0]
    total, size = 0, out_modes[0] * in_modes[0]
    for d in range(1, len(in_modes)):
        size *= out_modes[d] * in_modes[d]
        total += c * size * ranks[d] * ranks[d + 1]
    return total


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


def tt_linear(x: Tensor, cores: Sequence[Tensor], order: str | None = None) -> Tensor:
    """``x @ W.T`` for a TT-matrix ``W``: ``(b, I_1 ⋯ I_D) -> (b, J_1 ⋯ J_D)``.

    See :func:`ring_linear` for ``order``.
    """
    return ring_linear(x, cores, order)


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


class RingMatrix(FactorizedMatrix):
    """Shared module code of the TT (:class:`TTMatrix`) and TR
    (:class:`~kcprnn.formats.tr.TRMatrix`) formats: ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)``
    contracted by :func:`ring_linear`.

    Subclasses set :meth:`resolve_ranks` (the user's ``rank`` -> ``self.ranks``), :attr:`bonds`
    (the ``D + 1`` bond ranks ``r_0, ..., r_D``), :meth:`decompose` and :meth:`ranks_of_cores`
    (for ``from_dense``).
    """

    default_rank: ClassVar[int] = DEFAULT_RANK

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_modes: int | None = None,
        rank: int | Sequence[int] = DEFAULT_RANK,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            in_modes=in_modes,
            out_modes=out_modes,
            num_modes=num_modes,
            algorithm=algorithm,
            device=device,
            dtype=dtype,
        )
        self.ranks = self.resolve_ranks(rank, self.num_modes)
        b = self.bonds
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(b[d], m, n, b[d + 1], **self.factory_kwargs))
            for d, (m, n) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.reset_parameters()

    @staticmethod
    def resolve_ranks(rank: int | Sequence[int], num_modes: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def bonds(self) -> tuple[int, ...]:
        """The ``D + 1`` bond ranks ``r_0, ..., r_D`` (``r_D = r_0``)."""
        raise NotImplementedError

    @staticmethod
    def decompose(
        weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: tuple[int, ...]
    ) -> list[Tensor]:
        raise NotImplementedError

    def reset_parameters(self, std: float | None = None) -> None:
        # W[j, i] is a sum over index paths (a_0, ..., a_{D-1}) of the bonds r_0, ..., r_{D-1}
        # (for TT r_0 = 1; for TR the trace closes a_D = a_0) of products of D independent
        # zero-mean core entries of variance σ²; distinct paths are uncorrelated, so
        #     Var(W) = Π_{d=0}^{D-1} r_d · σ^(2D),   σ = (std² / Π r_d)^(1 / (2D)).
        # Entries are uniform (std σ): a product of uniforms has lighter tails than a product
        # of Gaussians, so the second moment of one draw scatters less around std².
        std = self.default_std() if std is None else std
        sigma = (std**2 / math.prod(self.bonds[:-1])) ** (1 / (2 * self.num_modes))
        bound = sigma * math.sqrt(3)  # U(-a, a) has std a / sqrt(3)
        with torch.no_grad():
            for core in self.cores:
                core.uniform_(-bound, bound)

    def matmul(self, x: Tensor) -> Tensor:
        return ring_linear(x, list(self.cores), self.contraction_order(x.shape[0]))  # (b, j)

    def to_dense(self) -> Tensor:
        return ring_to_dense(list(self.cores))  # (j, i)

    def contraction_order(self, rows: int) -> str:
        """The sweep :meth:`matmul` uses on ``rows`` rows (see :func:`ring_contraction_order`)."""
        return ring_contraction_order(self.in_modes, self.out_modes, self.bonds, rows)

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        order = self.contraction_order(rows)
        return ring_linear_flops(self.in_modes, self.out_modes, self.bonds, rows, order)

    def reconstruction_macs(self) -> int:
        return ring_to_dense_flops(self.in_modes, self.out_modes, self.bonds)

    def format_repr_items(self) -> list[str]:
        return [f"ranks={list(self.ranks)}"]

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> RingMatrix:
        """Decompose ``weight`` (``(out_features, in_features)``) truncated to ``rank``.

        ``options`` are the constructor's; ranks above what an unfolding can hold are capped,
        so a large ``rank`` gives an exact decomposition.
        """
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        in_modes, out_modes = resolve_modes(
            weight.shape[1],
            weight.shape[0],
            options.pop("in_modes", None),
            options.pop("out_modes", None),
            options.pop("num_modes", None),
        )
        ranks = cls.resolve_ranks(options.pop("rank", cls.default_rank), len(in_modes))
        cores = cls.decompose(weight, in_modes, out_modes, ranks)
        out = cls(
            weight.shape[1],
            weight.shape[0],
            in_modes=in_modes,
            out_modes=out_modes,
            rank=cls.ranks_of_cores(cores),
            **options,
        )
        with torch.no_grad():
            for param, core in zip(out.cores, cores, strict=True):
                param.copy_(core)
        return out

    @staticmethod
    def ranks_of_cores(cores: Sequence[Tensor]) -> list[int]:
        """The ``rank`` argument that rebuilds a module with these cores' shapes."""
        raise NotImplementedError


@register("tt")
class TTMatrix(RingMatrix):
    r"""A weight matrix in TT-matrix format.

    .. math::
        W[(j_1 \dots j_D), (i_1 \dots i_D)] = \prod_{d=1}^{D} G_d[:, j_d, i_d, :]
        \quad (r_0 = r_D = 1)

    Parameters: ``Σ_d r_{d-1} J_d I_d r_d`` (the UCF11 TT-LSTM, ``8×20×20×18 -> 16×4×4×4``
    at rank 4, has 3,360).

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype:
            as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: one int for all ``D - 1`` inner bonds, their list, or the full ``D + 1`` list with
            ones at both ends. Default 4 (the TT-LSTM/GRU papers' UCF11 setting).

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

    resolve_ranks = staticmethod(validate_tt_ranks)
    decompose = staticmethod(tt_svd)

    @property
    def bonds(self) -> tuple[int, ...]:
        return self.ranks

    @staticmethod
    def ranks_of_cores(cores: Sequence[Tensor]) -> list[int]:
        return [core.shape[0] for core in cores] + [1]
