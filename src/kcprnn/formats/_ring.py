r"""The ring contraction shared by the tensor-train (:mod:`.tt`) and tensor-ring (:mod:`.tr`)
formats.

Both store ``D`` cores ``G_d`` of shape ``(r_{d-1}, J_d, I_d, r_d)`` with ``r_0 = r_D = c``:

.. math::
    W[(j_1, \dots, j_D), (i_1, \dots, i_D)] = \operatorname{Tr}\big(G_1[:, j_1, i_1, :]
    \cdots G_D[:, j_D, i_D, :]\big)

A TT-matrix is the ring whose closing rank ``c`` is 1 (the trace of a ``1 x 1`` matrix). The
sweeps below carry ``c`` along through every step and take the trace at the end, so one code
path serves both formats; :class:`RingMatrix` is the module code they share.

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

from .._cpu import CostModel, default_cost_model
from ..shapes import resolve_modes
from ._base import FactorizedMatrix, listed, orthonormal_
from ._chain import ChainSpec, modes_spec

__all__ = [
    "ORDERS",
    "RING_INITS",
    "RingMatrix",
    "ring_chunk_rows",
    "ring_contraction_order",
    "ring_intermediate_size",
    "ring_linear",
    "ring_linear_flops",
    "ring_to_dense",
    "ring_to_dense_flops",
]

ORDERS = ("right_to_left", "left_to_right")
"""The two sweeps of :func:`ring_linear`: start at the last input mode or at the first."""

# --- pure functions: costs and sizes ---


def _core_shapes(cores: Sequence[Tensor]) -> list[tuple[int, int, int, int]]:
    shapes = []
    for core in cores:
        r, m, n, s = core.shape
        shapes.append((r, m, n, s))
    return shapes


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got order={order!r}")


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
    ``rows' * k * cols``. The closing trace of a ring adds no multiplications. Forward and
    backward run the same sweep, so the count does not depend on the autograd mode.
    """
    _check_order(order)
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
    else:
        for d in range(d_count):
            left = rows * (c if d else 1) * math.prod(out_modes[:d])
            k = ranks[d] * in_modes[d] if d else in_modes[0]
            cols = out_modes[d] * ranks[d + 1] * (1 if d else c)
            total += left * k * cols * math.prod(in_modes[d + 1 :])
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


def ring_intermediate_size(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], order: str
) -> int:
    """Entries per input row of the largest intermediate of :func:`ring_linear` with ``order``."""
    _check_order(order)
    d_count, c = len(in_modes), ranks[0]
    if order == "right_to_left":
        sizes = [
            math.prod(in_modes[:d]) * ranks[d] * out_modes[d] * math.prod(out_modes[d + 1 :]) * c
            for d in range(d_count)
        ]
    else:
        sizes = [
            c * math.prod(out_modes[: d + 1]) * ranks[d + 1] * math.prod(in_modes[d + 1 :])
            for d in range(d_count)
        ]
    return max(sizes)


def ring_chunk_rows(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    order: str,
    cost_model: CostModel | None = None,
) -> int:
    """Rows per chunk of :func:`ring_linear`: as many as keep the largest intermediate within
    the cost model's ``tt_chunk_entries`` entries (at least one).

    One sweep over many rows allocates a fresh buffer for each step's intermediate; past a size
    that buffer is mapped and page-faulted on every call, so only sweeps beyond that size are
    split (each chunk adds a few small parallel regions of its own, which cost more than they
    save on small intermediates).
    """
    model = default_cost_model() if cost_model is None else cost_model
    per_row = ring_intermediate_size(in_modes, out_modes, ranks, order)
    return max(1, model.tt_chunk_entries // per_row)


def _merge_macs(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], lo: int, hi: int
) -> int:
    """Multiply-accumulates of merging cores ``lo`` to ``hi - 1`` left to right."""
    c = ranks[lo]
    total, size = 0, out_modes[lo] * in_modes[lo]
    for d in range(lo + 1, hi):
        size *= out_modes[d] * in_modes[d]
        total += c * size * ranks[d] * ranks[d + 1]
    return total


def ring_to_dense_flops(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> int:
    """Multiply-accumulates of :func:`ring_to_dense`: the two halves' merges and the product
    that closes the ring (a single core's trace adds none)."""
    count = len(in_modes)
    if count == 1:
        return 0
    half = count // 2
    closing = math.prod(in_modes) * math.prod(out_modes) * ranks[half] * ranks[0]
    return (
        _merge_macs(in_modes, out_modes, ranks, 0, half)
        + _merge_macs(in_modes, out_modes, ranks, half, count)
        + closing
    )


# --- pure functions: the sweeps ---


def _sweep_right_to_left(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    shapes = _core_shapes(cores)
    b = x.shape[0]
    r, m, n, c = shapes[-1]
    q = math.prod(shape[2] for shape in shapes[:-1])  # input modes left of the current core
    # step D: one GEMM over the whole input, no copy of x (its last mode is contiguous)
    a = cores[-1].permute(2, 0, 1, 3).reshape(n, r * m * c)  # (n, r*m*c)
    z = x.reshape(b * q, n) @ a  # (b*q, r*m*c): physically (b, q, n', s, o) with o = (m, c)
    o = m * c
    m_prev = 0  # the output mode the previous step left beside (n, s); set by every step
    steps = zip(reversed(cores[:-1]), reversed(shapes[:-1]), strict=True)
    for step, (core, (r, m, n, s)) in enumerate(steps):
        q //= n
        a = core.permute(2, 3, 0, 1).reshape(n * s, r * m)  # (n*s, r*m)
        if step == 0:
            # (n, s) are adjacent rows of every slice: matmul on the transposed view, which
            # avoids a permute copy of the largest intermediate
            z = torch.matmul(z.reshape(b * q, n * s, o).mT, a)  # (b*q, o, r*m)
        else:
            # move the finished output mode next to o and (n, s) last: one copy of a small
            # intermediate, then one GEMM
            z = z.reshape(b * q, n, o, s, m_prev).permute(0, 4, 2, 1, 3)  # (b*q, m', o, n, s)
            z = z.reshape(b * q * m_prev * o, n * s) @ a  # (b*q*m'*o, r*m)
            o *= m_prev
        m_prev = m
    if len(shapes) == 1:  # D = 1: z is (b, r_0 * J_1 * c)
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


def ring_linear(
    x: Tensor,
    cores: Sequence[Tensor],
    order: str | None = None,
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    r"""``x @ W.T`` for a TT-matrix or tensor ring ``W``, without forming ``W``.

    Rows are processed in chunks of :func:`ring_chunk_rows` rows.

    Args:
        x: ``(b, I_1 ⋯ I_D)`` rows.
        cores: ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)`` with ``r_0 = r_D`` (1 for a TT-matrix).
        order: ``"right_to_left"`` (contract ``I_D`` first with one GEMM over the input, then
            bring each finished output mode forward and contract with one GEMM per core),
            ``"left_to_right"`` (contract ``I_1`` first; batched GEMMs with the core on the
            left, no copies), or ``None`` to pick the cheaper one with
            :func:`ring_contraction_order`.
        cost_model: sets the chunk size (default: :func:`~kcprnn._cpu.default_cost_model`).

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
    chunk = ring_chunk_rows(in_modes, out_modes, ranks, order, cost_model)
    if x.shape[0] <= chunk:
        return sweep(x, cores)  # (b, J_1*...*J_D)
    return torch.cat([sweep(part, cores) for part in x.split(chunk)])  # (b, J_1*...*J_D)


def _merge(cores: Sequence[Tensor]) -> Tensor:
    """Cores ``(r_{d-1}, J_d, I_d, r_d)`` merged left to right: ``(c, Π J, Π I, s)``."""
    w = cores[0]  # (c, o, q, s)
    for core in cores[1:]:
        c, o, q, r = w.shape
        _, m, n, s = core.shape
        w = torch.einsum("coqr,rmns->comqns", w, core)  # (c, o, m, q, n, s)
        w = w.reshape(c, o * m, q * n, s)  # (c, o, q, s)
    return w


def ring_to_dense(cores: Sequence[Tensor]) -> Tensor:
    """Reconstruct ``W`` (``(J_1 ⋯ J_D, I_1 ⋯ I_D)``) from ring/TT cores: each half merged left
    to right, then one product over both bonds between the halves closes the ring (no
    ``r_0``-fold intermediate to take the trace of)."""
    if len(cores) == 1:
        return cores[0].diagonal(dim1=0, dim2=3).sum(-1)  # (o, q)
    half = len(cores) // 2
    left = _merge(cores[:half])  # (c, o1, q1, r)
    right = _merge(cores[half:])  # (r, o2, q2, c)
    c, o1, q1, r = left.shape
    o2, q2 = right.shape[1], right.shape[2]
    a = left.permute(1, 2, 3, 0).reshape(o1 * q1, r * c)  # (o1 q1, r c)
    b = right.permute(0, 3, 1, 2).reshape(r * c, o2 * q2)  # (r c, o2 q2)
    w = (a @ b).view(o1, q1, o2, q2)  # (o1, q1, o2, q2)
    return w.permute(0, 2, 1, 3).reshape(o1 * o2, q1 * q2)  # (o, q)


# --- module ---

RING_INITS = ("uniform", "orthogonal")
"""The draws :meth:`RingMatrix.reset_parameters` knows (``init``); the first is the default."""


class RingMatrix(FactorizedMatrix):
    """Shared module code of the TT (:class:`~kcprnn.formats.tt.TTMatrix`) and TR
    (:class:`~kcprnn.formats.tr.TRMatrix`) formats: ``D`` cores ``(r_{d-1}, J_d, I_d, r_d)``
    contracted by :func:`ring_linear`.

    Subclasses set :attr:`default_rank` (used when ``rank`` is omitted), :meth:`resolve_ranks`
    (the user's ``rank`` -> ``self.ranks``), :attr:`bonds` (the ``D + 1`` bond ranks
    ``r_0, ..., r_D``), :meth:`decompose` and :meth:`ranks_of_cores` (for ``from_dense``).
    """

    default_rank: ClassVar[int]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_modes: int | None = None,
        rank: int | Sequence[int] | None = None,
        init: str = "uniform",
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        if init not in RING_INITS:
            raise ValueError(f"init must be one of {RING_INITS}, got init={init!r}")
        super().__init__(
            in_features,
            out_features,
            in_modes=in_modes,
            out_modes=out_modes,
            num_modes=num_modes,
            algorithm=algorithm,
            device=device,
            dtype=dtype,
            cost_model=cost_model,
        )
        self.ranks = self.resolve_ranks(self.default_rank if rank is None else rank, self.num_modes)
        self.init = init
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
        weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
    ) -> list[Tensor]:
        raise NotImplementedError

    def reset_parameters(self, std: float | None = None) -> None:
        """Draw the cores so that ``W``'s entries have standard deviation ``std`` (default
        :meth:`default_std`), the way :attr:`init` names."""
        std = self._target_std(std)
        with torch.no_grad():
            if self.init == "orthogonal":
                self._orthogonal_init(std)
            else:
                self._uniform_init(std)

    def _uniform_init(self, std: float) -> None:
        # W[j, i] is a sum over index paths (a_0, ..., a_{D-1}) of the bonds r_0, ..., r_{D-1}
        # (for TT r_0 = 1; for TR the trace closes a_D = a_0) of products of D independent
        # zero-mean core entries of variance σ²; distinct paths are uncorrelated, so
        #     Var(W) = Π_{d=0}^{D-1} r_d · σ^(2D),   σ = (std² / Π r_d)^(1 / (2D)).
        # Entries are uniform (std σ): a product of uniforms has lighter tails than a product
        # of Gaussians, so the second moment of one draw scatters less around std².
        sigma = (std**2 / math.prod(self.bonds[:-1])) ** (1 / (2 * self.num_modes))
        bound = sigma * math.sqrt(3)  # U(-a, a) has std a / sqrt(3)
        for core in self.cores:
            core.uniform_(-bound, bound)

    def _orthogonal_init(self, std: float) -> None:
        # Every core's unfolding (r_{d-1} J_d I_d, r_d) is a random map that preserves norms
        # (orthonormal columns; orthonormal rows scaled, exact in expectation, where r_d is the
        # larger). For a TT (closing rank 1) the products of the first d cores are then
        # isometries and the last core a unit vector, so ||W||_F = 1 before scaling; every
        # core gets the same factor c, c^D = std * sqrt(I J), and the draw's mean square is
        # std² exactly. One factor for all keeps the cores' entries of one size against Adam's
        # per-entry step (the whole scale in one core, as HT's root holds it, trains into late
        # collapses on some seeds: docs/accuracy.md). A ring's trace has no such form; its
        # cores share one scale c set by the path count of the uniform rule,
        # Var(W) = Π_d r_d · Π_d c² s_d², with s_d² each core's mean square entry.
        for core in self.cores:
            orthonormal_(core, core.numel() // core.shape[-1])
        if self.bonds[0] == 1:
            norm = std * math.sqrt(self.in_features * self.out_features)
            for core in self.cores:
                core.mul_(norm ** (1 / self.num_modes))
            return
        squares = [float(core.square().mean()) for core in self.cores]
        paths = math.prod(self.bonds[:-1]) * math.prod(squares)
        scale = (std**2 / paths) ** (1 / (2 * self.num_modes))
        for core in self.cores:
            core.mul_(scale)

    def matmul(self, x: Tensor) -> Tensor:
        order = self.contraction_order(x.shape[0])
        return ring_linear(x, list(self.cores), order, cost_model=self.cost_model)  # (b, j)

    def to_dense(self) -> Tensor:
        return ring_to_dense(list(self.cores))  # (j, i)

    def chain_spec(self) -> ChainSpec | None:
        # core d: (r_d, j_d, i_d, r_{d+1}), the ring closing on r_0; one core would be a trace
        d = self.num_modes
        if d == 1:
            return None
        return modes_spec(
            self.in_modes,
            tuple(
                (tuple(core.shape), (f"r{e}", f"j{e}", f"i{e}", f"r{(e + 1) % d}"))
                for e, core in enumerate(self.cores)
            ),
        )

    def chain_tensors(self) -> list[Tensor]:
        return listed(self.cores)

    def contraction_order(self, rows: int) -> str:
        """The sweep :meth:`matmul` uses on ``rows`` rows (see :func:`ring_contraction_order`)."""
        return ring_contraction_order(self.in_modes, self.out_modes, self.bonds, rows)

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """Multiply-accumulates of :meth:`matmul` on ``rows`` rows. The sweep depends on the
        shapes and ``rows`` only, so training and inference count the same."""
        order = self.contraction_order(rows)
        return ring_linear_flops(self.in_modes, self.out_modes, self.bonds, rows, order)

    def reconstruction_macs(self) -> int:
        return ring_to_dense_flops(self.in_modes, self.out_modes, self.bonds)

    def format_repr_items(self) -> list[str]:
        items = [f"ranks={list(self.ranks)}"]
        return items + ([f"init={self.init!r}"] if self.init != RING_INITS[0] else [])

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
