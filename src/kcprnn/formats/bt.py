r"""Block-term (BT) format: a sum of ``C`` Tucker blocks over the merged modes (Ye et al., 2018).

.. math::
    W[j, i] = \sum_{c=1}^{C} \sum_{r_1, \dots, r_D} G_c[r_1, \dots, r_D]
              \prod_{d=1}^{D} A_{c,d}[(j_d, i_d), r_d]

The blocks are stored stacked (factors ``(C, J_d I_d, R_d)``, cores ``(C, R_1, ..., R_D)``) and
the math is :mod:`kcprnn.formats.tucker`'s, whose functions take that leading block axis: the
block index is a batch axis of every BMM there, never a Python loop. Legend as in that module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._cpu import CostModel
from ..shapes import validate_positive_int
from ._base import FactorizedMatrix, listed, register
from ._chain import ChainSpec
from .tucker import (
    hosvd,
    tucker_chain_spec,
    tucker_linear,
    tucker_linear_flops,
    tucker_num_params,
    tucker_reconstruction_flops,
    tucker_to_dense,
    validate_tucker_ranks,
)

__all__ = [
    "BTMatrix",
    "bt_deflation",
    "bt_linear",
    "bt_num_params",
    "bt_to_dense",
    "validate_bt_ranks",
]


# --- pure functions ---


def validate_bt_ranks(
    rank: int | Sequence[int], blocks: int, num_modes: int
) -> tuple[tuple[int, ...], int]:
    """Core ranks ``(R_1, ..., R_D)`` shared by all blocks (an int or ``D`` ints) and the number
    of blocks ``C`` (a positive int)."""
    return validate_tucker_ranks(rank, num_modes), validate_positive_int(blocks, "blocks")


def bt_num_params(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], blocks: int
) -> int:
    """``C (sum_d I_d J_d R_d + prod_d R_d)``.

    Example (the published BT-LSTM input-to-hidden count, Ye et al. 2018):
        >>> bt_num_params([8, 20, 20, 18], [16, 4, 4, 4], [4, 4, 4, 4], blocks=2)
        3392
    """
    return tucker_num_params(in_modes, out_modes, ranks, blocks)


def bt_to_dense(
    factors: Sequence[Tensor], cores: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]
) -> Tensor:
    """Reconstruct ``W`` from stacked blocks: factors ``(C, J_d I_d, R_d)``, cores
    ``(C, R_1, ..., R_D)``; returns ``(out_features, in_features)``."""
    return tucker_to_dense(factors, cores, in_modes, out_modes)  # (j, i)


def bt_linear(
    x: Tensor,
    factors: Sequence[Tensor],
    cores: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` without forming ``W``: ``(b, in_features) -> (b, out_features)``.

    ``cost_model`` sets the chunks of rows, as in :func:`~kcprnn.formats.tucker.tucker_linear`.
    """
    return tucker_linear(x, factors, cores, in_modes, out_modes, cost_model=cost_model)  # (b, j)


def bt_deflation(
    weight: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    blocks: int,
) -> tuple[list[Tensor], Tensor]:
    """``C`` Tucker blocks fitted greedily to ``weight`` ``(J, I)``: each block is the truncated
    HOSVD (:func:`~kcprnn.formats.tucker.hosvd`) of what the previous blocks left. Every step is
    a multilinear projection of the residual, so the error never grows with ``C``; exact for
    ``C = 1`` when ``W`` has that multilinear rank. Returns stacked factors ``(C, J_d I_d, R_d)``
    and cores ``(C, R_1, ..., R_D)``."""
    residual = weight
    blocks_found = []
    for _ in range(validate_positive_int(blocks, "blocks")):
        factors, core = hosvd(residual, in_modes, out_modes, ranks)
        blocks_found.append((factors, core))
        residual = residual - tucker_to_dense(factors, core, in_modes, out_modes)  # (j, i)
    stacked = [torch.stack([f[d] for f, _ in blocks_found]) for d in range(len(ranks))]
    return stacked, torch.stack([c for _, c in blocks_found])  # (c, m n, r), (c, r_1, ...)


# --- module ---


@register("bt")
class BTMatrix(FactorizedMatrix):
    r"""A weight matrix in block-term Tucker form: ``C`` Tucker blocks summed.

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: core ranks ``R_d`` of every block: an int or a sequence of ``D`` ints. Default: 4.
        blocks: number of blocks ``C``. Default: 1 (plain Tucker).

    Attributes:
        ranks: tuple ``(R_1, ..., R_D)``.
        blocks: ``C``.
        factors: ``nn.ParameterList`` of ``D`` tensors of shape ``(C, J_d I_d, R_d)``.
        core: parameter of shape ``(C, R_1, ..., R_D)``, the stacked block cores.

    Example:
        >>> w = BTMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4],
        ...              rank=4, blocks=2)
        >>> w.num_params
        3392
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int | Sequence[int] = 4,
        blocks: int = 1,
        **options,
    ) -> None:
        super().__init__(in_features, out_features, **options)
        self.ranks, self.blocks = validate_bt_ranks(rank, blocks, self.num_modes)
        c = self.blocks
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(c, j * i, r, **self.factory_kwargs))
            for i, j, r in zip(self.in_modes, self.out_modes, self.ranks, strict=True)
        )
        self.core = nn.Parameter(torch.empty(c, *self.ranks, **self.factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        # All entries i.i.d. with mean 0 and variance s^2: W[j, i] is a sum of C prod_d R_d
        # independent products of D + 1 entries, so Var(W) = C prod(R) s^(2(D + 1)), hence
        # s = (std^2 / (C prod(R)))^(1 / (2(D + 1))). Uniform entries for a well-behaved
        # sampled std (lighter tails than Gaussian).
        std = self.default_std() if std is None else std
        terms = self.blocks * math.prod(self.ranks)
        s = (std**2 / terms) ** (1 / (2 * (self.num_modes + 1)))
        bound = s * math.sqrt(3)  # U(-a, a) has std a / sqrt(3)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def matmul(self, x: Tensor) -> Tensor:
        return bt_linear(
            x,
            list(self.factors),
            self.core,
            self.in_modes,
            self.out_modes,
            cost_model=self.cost_model,
        )  # (b, j)

    def to_dense(self) -> Tensor:
        return bt_to_dense(list(self.factors), self.core, self.in_modes, self.out_modes)

    def chain_spec(self) -> ChainSpec | None:
        return tucker_chain_spec(self.in_modes, self.out_modes, self.ranks, self.blocks)

    def chain_tensors(self) -> list[Tensor]:
        factors = listed(self.factors)
        return [factors[0], self.core, *factors[1:]]

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """MACs of :meth:`matmul` (:func:`~kcprnn.formats.tucker.tucker_linear_flops` with
        ``C`` blocks). The contraction order is fixed, so training and inference count the
        same."""
        return tucker_linear_flops(rows, self.in_modes, self.out_modes, self.ranks, self.blocks)

    def reconstruction_macs(self) -> int:
        return tucker_reconstruction_flops(self.in_modes, self.out_modes, self.ranks, self.blocks)

    def format_repr_items(self) -> list[str]:
        return [f"rank={list(self.ranks)}", f"blocks={self.blocks}"]

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> BTMatrix:
        """Greedy block deflation (:func:`bt_deflation`) of ``weight`` ``(out_features,
        in_features)``; the other options are the constructor's."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        factors, cores = bt_deflation(
            weight.detach(), out.in_modes, out.out_modes, out.ranks, out.blocks
        )
        with torch.no_grad():
            for p, a in zip(out.factors, factors, strict=True):
                p.copy_(a)
            out.core.copy_(cores)
        return out
