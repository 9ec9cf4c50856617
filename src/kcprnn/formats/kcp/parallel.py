"""KCP's parallel product: one merged CP of rank ``K = P Π_n R_n``, cut into two chunks, each
chunk one small dense matrix per merged rank; two GEMMs, no copy of the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cpu.cost import CostModel, default_cost_model
from ..._cpu.ops import tall_linear
from .algebra import chunk_kron, merged_axis_factors

__all__ = ["ParallelChunks", "ParallelRows", "kcp_linear_parallel", "kcp_parallel_prepare"]


class ParallelChunks(NamedTuple):
    """The two merged chunks of the parallel product cut at one axis."""

    suffix: Tensor  # (k, o, c)
    prefix: Tensor | None  # (m, a k); None when the cut is at axis 0


class ParallelRows(NamedTuple):
    """What :func:`parallel_rows` computes: ``y`` ``(b, m, o)``, or ``(b, o, m)`` when
    ``swapped``; step 1's output ``z`` ``(b a, k o)`` and, when swapped, its transpose ``zt``
    ``(b o, a k)`` (kept for a hand-written backward)."""

    y: Tensor
    swapped: bool
    z: Tensor
    zt: Tensor | None


def kcp_parallel_prepare(factors: Sequence[Sequence[Tensor]], split: int = 0) -> ParallelChunks:
    """The two merged chunks of :func:`kcp_linear_parallel` cut at axis ``split``: the suffix
    ``(k, o, c)`` and the prefix laid out as ``(m, a k)`` (``None`` when ``split == 0``)."""
    num_axes = len(factors) * len(factors[0])
    if not 0 <= split < num_axes:
        raise ValueError(f"split must be in [0, {num_axes}), got split={split}")
    u = merged_axis_factors(factors)  # each (k, m, c)
    suffix = chunk_kron(u[split:])  # (k, o, c)
    if split == 0:
        return ParallelChunks(suffix, None)
    prefix = chunk_kron(u[:split])  # (k, m, a)
    m, a = prefix.shape[1:]
    return ParallelChunks(
        suffix, prefix.permute(1, 2, 0).reshape(m, a * prefix.shape[0])
    )  # (m, a k)


def kcp_linear_parallel(
    x: Tensor,
    factors: Sequence[Sequence[Tensor]],
    split: int = 0,
    prepared: tuple[Tensor, Tensor | None] | None = None,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` through the merged CP of rank ``K = P Π_n R_n`` (parallel).

    The ``D N`` axes of the input (mode-major, factor-minor) are cut at axis ``split``: axes
    ``[0, split)`` form the prefix chunk, ``[split, D N)`` the suffix chunk, and each is merged,
    per merged rank, into one dense matrix (:func:`kcp_parallel_prepare`; ``prepared`` passes
    them in, built earlier from the same factors). Step 1 is one GEMM over the trailing
    (contiguous) suffix of every row, step 2 one batched GEMM over the prefix and the rank
    together. ``cost_model`` routes the GEMMs (default
    :func:`~kcprnn._cpu.cost.default_cost_model`). x: ``(b, in_features)`` ->
    ``(b, out_features)``.
    """
    model = default_cost_model() if cost_model is None else cost_model
    suffix, prefix = prepared if prepared is not None else kcp_parallel_prepare(factors, split)
    y, swapped, _, _ = parallel_rows(x, suffix, prefix, model)  # (b, m, o) or (b, o, m)
    if swapped:
        y = y.transpose(1, 2)  # (b, m, o)
    return y.reshape(x.shape[0], y.shape[1] * y.shape[2])  # (b, j)


def parallel_rows(
    x: Tensor, suffix: Tensor, prefix: Tensor | None, model: CostModel
) -> ParallelRows:
    """Steps 1 and 2 of :func:`kcp_linear_parallel`. A suffix with fewer than ``model.narrow``
    outputs runs step 2 as one tall GEMM whose output comes suffix-major (``swapped``;
    :func:`~.layout.inner_out_modes` predicts it)."""
    k, o, c = suffix.shape
    b = x.shape[0]
    z = tall_linear(x.reshape(-1, c), suffix.reshape(k * o, c), model)  # (b a, k o)
    if prefix is None:
        return ParallelRows(z.reshape(b, k, o).sum(1, keepdim=True), False, z, None)  # (b, 1, o)
    m, a = prefix.shape[0], prefix.shape[1] // k
    if o >= model.narrow:
        if torch.is_grad_enabled() and (prefix.requires_grad or z.requires_grad):
            y = torch.matmul(prefix, z.reshape(b, a * k, o))  # (b, m, o): sums a and k
        else:  # one GEMM per row on the broadcast prefix: no copies (matmul would fold the
            # batch with a copy; its backward through the expand would be slow)
            y = torch.bmm(prefix.expand(b, m, a * k), z.reshape(b, a * k, o))  # (b, m, o)
        return ParallelRows(y, False, z, None)
    # narrow per-row GEMMs run slowly: transpose into one tall GEMM instead
    zt = z.reshape(b, a * k, o).transpose(1, 2).reshape(b * o, a * k)  # (b o, a k)
    return ParallelRows(F.linear(zt, prefix).reshape(b, o, m), True, z, zt)  # (b, o, m)
