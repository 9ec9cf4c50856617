r"""CP format on the merged modes: ``W`` is a sum of ``R`` Kronecker products of small matrices.

.. math::
    W[j, i] = \sum_{r=1}^{R} \prod_{d=1}^{D} U_d[r, j_d, i_d],
    \qquad W = \sum_r U_1[r] \otimes \cdots \otimes U_D[r],

with ``j = (j_1, ..., j_D)`` and ``i = (i_1, ..., i_D)`` flattened row-major, so ``W`` is a
rank-``R`` CP tensor over the merged modes ``(J_d, I_d)``: the ``D``-way tensor whose mode ``d``
has size ``J_d I_d`` (see ``docs/formats.md``).

Legend for shape comments: b batch rows, r rank, m current output mode ``J_e``,
n current input mode ``I_e``, o output modes already produced, p input modes not yet contracted.

Multiplication (:func:`cp_linear`) contracts the input modes from the last to the first. Every
step contracts the *trailing* axis of the current tensor and puts the new output mode in front,
so each step is one GEMM/BMM on a (transposed) view and no step copies the input:
``x (b p, n) -> (r, m, b p)``, then per rank ``(r, o b p, n) -> (r, m, o b p)``; the rank is
summed at the end. Only the first step reads the whole input; ``matmul_macs`` counts the MACs
of exactly this order. The BMM steps use :func:`~kcprnn.formats.tucker.contract_trailing` (its
backward keeps gradients in the forward layouts) and large inputs go in cache-sized chunks of
rows (:func:`~kcprnn.formats.tucker.map_row_chunks`, sized by the cost model's
``tucker_chunk_elements``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._cpu import CostModel, default_cost_model
from ..shapes import validate_positive_int
from ._base import FactorizedMatrix, listed, register
from ._chain import ChainSpec, modes_spec
from ._halves import (
    half_to_merged,
    join_halves,
    join_halves_backward,
    merged_to_half,
    needs_graph,
    outer_grads,
    outer_rows,
)
from .tucker import contract_trailing, map_row_chunks, matrix_to_merged

__all__ = [
    "CPMatrix",
    "cp_als",
    "cp_linear",
    "cp_linear_flops",
    "cp_num_params",
    "cp_reconstruction_flops",
    "cp_split",
    "cp_to_dense",
    "validate_cp_rank",
]


# --- pure functions ---


def validate_cp_rank(rank: object) -> int:
    """The CP rank: a positive int (one rank shared by all modes)."""
    return validate_positive_int(rank, "rank")


def cp_num_params(in_modes: Sequence[int], out_modes: Sequence[int], rank: int) -> int:
    """``R * sum_d I_d J_d``."""
    return rank * sum(i * j for i, j in zip(in_modes, out_modes, strict=True))


def _factor_split(factors: Sequence[Tensor]) -> int:
    return cp_split([u.shape[2] for u in factors], [u.shape[1] for u in factors])


def _cp_halves(factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The Kronecker products per rank of the leading and of the trailing factors:
    ``(r, j_L, i_L)`` and ``(r, j_R, i_R)``."""
    k = _factor_split(factors)
    halves = []
    for group in (factors[:k], factors[k:]):
        merged = outer_rows([u.reshape(u.shape[0], -1) for u in group])  # (r, j_1 i_1 ..)
        out_modes, in_modes = [u.shape[1] for u in group], [u.shape[2] for u in group]
        halves.append(merged_to_half(merged, out_modes, in_modes))  # (r, j_half, i_half)
    return halves[0], halves[1]


class _CPToDense(torch.autograd.Function):
    """:func:`cp_to_dense` (``D >= 2``) with a hand-written backward: the gradient of ``W``
    goes to the two halves as in :func:`~kcprnn.formats._halves.join_halves_backward` (two
    GEMMs over the rank), is laid out per half in merged-mode order (a small copy), and goes
    to the factors by :func:`~kcprnn.formats._halves.outer_grads` (batched matrix-vector
    products); autograd would instead keep and reduce a broadcast product per Kronecker step.
    Second derivatives work: under ``create_graph`` the backward rebuilds the halves from the
    factors with autograd recording."""

    @staticmethod
    def forward(ctx, *factors: Tensor) -> Tensor:
        left, right = _cp_halves(factors)
        ctx.save_for_backward(left, right, *factors)
        return join_halves(left, right)  # (j, i)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        left, right, *factors = ctx.saved_tensors
        if torch.is_grad_enabled():  # a second derivative: keep the halves' graph
            left, right = _cp_halves(factors)
        grad_halves = join_halves_backward(grad, left, right)
        k = _factor_split(factors)
        grads: list[Tensor] = []
        for g, group in zip(grad_halves, (factors[:k], factors[k:]), strict=True):
            out_modes, in_modes = [u.shape[1] for u in group], [u.shape[2] for u in group]
            merged = half_to_merged(g, out_modes, in_modes)  # (r, j_1 i_1 ..)
            vectors = [u.reshape(u.shape[0], -1) for u in group]  # (r, j_e i_e)
            grads += [
                gu.view(u.shape) for gu, u in zip(outer_grads(merged, vectors), group, strict=True)
            ]
        return tuple(grads)  # (r, j_e, i_e) each


def cp_to_dense(factors: Sequence[Tensor]) -> Tensor:
    """Reconstruct ``W`` (``(out_features, in_features)``) from factors ``U_d`` of shape
    ``(R, J_d, I_d)``: the Kronecker products of the leading and of the trailing factors per
    rank (natural layout, small), then one product over the rank
    (:func:`~kcprnn.formats._halves.join_halves`). The backward is hand-written (one GEMM per
    half, then the Kronecker products' gradients)."""
    if len(factors) == 1:
        return factors[0].sum(0)  # (j, i)
    if needs_graph(*factors):
        return _CPToDense.apply(*factors)  # (j, i)
    return join_halves(*_cp_halves(factors))  # (j, i)


def cp_linear(
    x: Tensor, factors: Sequence[Tensor], *, cost_model: CostModel | None = None
) -> Tensor:
    """``x @ W.T`` without forming ``W``. x: ``(b, in_features)`` -> ``(b, out_features)``.

    Contracts input modes ``D, D-1, ..., 1``; each step is one GEMM/BMM on a view (see the module
    docstring). The rank stays a batch axis of the BMMs and is summed once at the end.
    ``cost_model`` sets the chunks of rows (default: :func:`~kcprnn._cpu.default_cost_model`).
    """
    rank = factors[0].shape[0]
    last = factors[-1].reshape(rank * factors[-1].shape[1], -1)  # (r m, n)

    def rows(x: Tensor) -> Tensor:
        batch, n = x.shape[0], last.shape[1]
        z = last @ x.reshape(-1, n).T  # (r m, b p): transposed operand, no copy of x
        z = z.reshape(rank, -1)  # (r, o b p) with o = m
        for u in reversed(factors[:-1]):
            z = contract_trailing(u, z.reshape(rank, -1, u.shape[2]))  # (r, m, o b p)
        z = z.reshape(rank, -1, batch)  # (r, o, b): all input modes are contracted
        return z.sum(0).T  # (b, o)

    model = default_cost_model() if cost_model is None else cost_model
    return map_row_chunks(rows, x, model.tucker_chunk_elements)  # (b, o)


def cp_linear_flops(rows: int, in_modes: Sequence[int], out_modes: Sequence[int], rank: int) -> int:
    """MACs of :func:`cp_linear`: step ``e`` costs ``R b prod(J_e..J_D) prod(I_1..I_e)``; the
    final sum over the rank (``(R - 1) b J`` additions) is not counted. Chunking the rows does
    not change it."""
    d = len(in_modes)
    return sum(
        rank * rows * math.prod(out_modes[e:]) * math.prod(in_modes[: e + 1]) for e in range(d)
    )


def _split_macs(merged: Sequence[int], rank: int, k: int) -> int:
    halves = [merged[:k], merged[k:]]
    kron = sum(rank * math.prod(h[: e + 1]) for h in halves for e in range(1, len(h)))
    return kron + rank * math.prod(merged)


def cp_split(in_modes: Sequence[int], out_modes: Sequence[int]) -> int:
    """Factors in the leading half of :func:`cp_to_dense` (``D >= 2``): the split whose two
    Kronecker products are smallest (ties: the most balanced one). The product over the rank
    costs ``R I J`` at every split; an input of ``41 x 3 x 1 x 1`` modes, say, then gets
    ``1 + 3`` factors, not ``2 + 2`` (halves of 328 and 768 entries per rank, not 7,872 and
    32)."""
    merged = [i * j for i, j in zip(in_modes, out_modes, strict=True)]
    count = len(merged)
    return min(range(1, count), key=lambda k: (_split_macs(merged, 1, k), abs(2 * k - count)))


def cp_reconstruction_flops(in_modes: Sequence[int], out_modes: Sequence[int], rank: int) -> int:
    """MACs of :func:`cp_to_dense`: the Kronecker products of each half (:func:`cp_split`),
    ``R prod_{f<=e}(I_f J_f)`` for every factor ``e`` after a half's first, and the product over
    the rank, ``R I J`` (``R I J`` additions when ``D = 1``)."""
    merged = [i * j for i, j in zip(in_modes, out_modes, strict=True)]
    if len(merged) == 1:
        return rank * merged[0]
    return _split_macs(merged, rank, cp_split(in_modes, out_modes))


def cp_als(
    weight: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    rank: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> list[Tensor]:
    """CP decomposition of ``weight`` ``(J, I)`` on the merged modes by alternating least squares.

    Each sweep solves for one factor matrix ``M_d`` ``(J_d I_d, R)`` with the others fixed:
    ``M_d = T_(d) KR_{e != d}(M_e) (Hadamard_{e != d} M_e^T M_e)^+``. Starts from the leading
    left singular vectors of each unfolding (random columns where the unfolding has fewer than
    ``R``), stops after ``max_iter`` sweeps or when the relative error changes by less than
    ``tol``; the column norms are finally spread equally over the ``D`` factors. Holds ``D``
    unfoldings (copies of ``W``) in memory; a sweep costs about ``2 D R`` MACs per entry of ``W``.

    Returns:
        factors ``U_d`` of shape ``(R, J_d, I_d)`` (as :func:`cp_to_dense` takes them).
    """
    rank = validate_cp_rank(rank)
    t = matrix_to_merged(weight, in_modes, out_modes)  # (j_1 i_1, ..., j_D i_D)
    d = t.dim()
    if d == 1:  # a vector: R equal columns t / R
        return [(t / rank).expand(rank, -1).reshape(rank, out_modes[0], in_modes[0])]  # (r, m, n)
    unfoldings = [t.movedim(e, 0).reshape(t.shape[e], -1) for e in range(d)]  # (m n, rest)
    mats = []
    for u in unfoldings:
        left = torch.linalg.svd(u, full_matrices=False).U[:, :rank]  # (m n, <= r)
        extra = torch.randn(u.shape[0], rank - left.shape[1], dtype=u.dtype, device=u.device)
        mats.append(torch.cat([left, extra], dim=1))  # (m n, r)
    norm = max(t.norm().item(), torch.finfo(t.dtype).tiny)
    previous = math.inf
    for _ in range(max_iter):
        for e in range(d):
            others = [mats[f] for f in range(d) if f != e]
            kr = others[0]  # Khatri-Rao product, first factor most significant
            for m in others[1:]:
                kr = (kr.unsqueeze(1) * m.unsqueeze(0)).reshape(-1, rank)  # (rest, r)
            gram = torch.ones(rank, rank, dtype=t.dtype, device=t.device)
            for m in others:
                gram = gram * (m.T @ m)  # (r, r)
            mats[e] = unfoldings[e] @ kr @ torch.linalg.pinv(gram)  # (m n, r)
        error = (unfoldings[-1] - mats[-1] @ kr.T).norm().item() / norm
        if abs(previous - error) < tol:
            break
        previous = error
    norms = torch.stack([m.norm(dim=0) for m in mats])  # (D, r)
    scale = norms.prod(0).pow(1 / d)  # (r,): each factor column gets the same norm
    return [
        (m / norms[e].clamp_min(torch.finfo(t.dtype).tiny) * scale).T.reshape(rank, j, i)
        for e, (m, i, j) in enumerate(zip(mats, in_modes, out_modes, strict=True))
    ]  # (r, m, n) each


# --- module ---


@register("cp")
class CPMatrix(FactorizedMatrix):
    r"""A weight matrix in CP form over the merged modes ``(J_d, I_d)``.

    .. math::
        W = \sum_{r=1}^{R} U_1[r] \otimes \cdots \otimes U_D[r]

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: the CP rank ``R`` (a positive int). Default: 4, the rank of the UCF11 baselines.

    Attributes:
        rank: ``R``.
        factors: ``nn.ParameterList`` of ``D`` tensors ``U_d`` of shape ``(R, J_d, I_d)``.

    Example:
        >>> w = CPMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=3)
        >>> w.num_params, w(torch.ones(2, 24)).shape
        (60, torch.Size([2, 10]))
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 4, **options) -> None:
        super().__init__(in_features, out_features, **options)
        self.rank = validate_cp_rank(rank)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, j, i, **self.factory_kwargs))
            for i, j in zip(self.in_modes, self.out_modes, strict=True)
        )
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        # Entries i.i.d. with mean 0 and variance s^2: W[j, i] is a sum of R independent products
        # of D entries, so Var(W) = R s^(2D), hence s = (std^2 / R)^(1 / (2D)). Uniform entries
        # (kurtosis 1.8 instead of the Gaussian's 3) keep the sampled std of W close to std.
        std = self.default_std() if std is None else std
        s = (std**2 / self.rank) ** (1 / (2 * self.num_modes))
        bound = s * math.sqrt(3)  # U(-a, a) has std a / sqrt(3)
        with torch.no_grad():
            for u in self.factors:
                u.uniform_(-bound, bound)

    def matmul(self, x: Tensor) -> Tensor:
        return cp_linear(x, list(self.factors), cost_model=self.cost_model)  # (b, j)

    def to_dense(self) -> Tensor:
        return cp_to_dense(list(self.factors))  # (j, i)

    def chain_spec(self) -> ChainSpec | None:
        # factor d: (r, j_d, i_d); the rank is kept as a batch axis until the last factor sums it
        d = self.num_modes
        if d == 1:
            return None
        return modes_spec(
            self.in_modes,
            tuple((tuple(u.shape), ("r", f"j{e}", f"i{e}")) for e, u in enumerate(self.factors)),
        )

    def chain_tensors(self) -> list[Tensor]:
        return listed(self.factors)

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """MACs of :meth:`matmul` (:func:`cp_linear_flops`). The contraction order is fixed, so
        training and inference count the same."""
        return cp_linear_flops(rows, self.in_modes, self.out_modes, self.rank)

    def reconstruction_macs(self) -> int:
        return cp_reconstruction_flops(self.in_modes, self.out_modes, self.rank)

    def format_repr_items(self) -> list[str]:
        return [f"rank={self.rank}"]

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> CPMatrix:
        """CP-ALS (:func:`cp_als`) of ``weight`` ``(out_features, in_features)``; the other
        options are the constructor's. Exact only when ``W`` has a CP of that rank that ALS
        finds; an unstructured weight (a trained dense layer, say) is far from any low-rank CP,
        so a low rank then gives a large error."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        factors = cp_als(weight.detach(), out.in_modes, out.out_modes, out.rank)
        with torch.no_grad():
            for p, u in zip(out.factors, factors, strict=True):
                p.copy_(u)
        return out
