"""Recurrent matrices that are sums of Kronecker products, multiplied without Python per factor
entry: the structured hidden-to-hidden product of the fused recurrences.

A KCP matrix (``P`` terms, ``N`` factors, ``D`` modes) is

    ``W = Π_out (Σ_p A_p^(1) ⊗ ⋯ ⊗ A_p^(N)) Π_in^T``,  ``A_p^(n) = Σ_r ⊗_d F^(n,d)[p, r]``

where ``A_p^(n)`` is the dense ``(J^(n), I^(n))`` matrix of factor ``n`` and the permutations
``Π`` move between the natural (mode-major, factor-minor) order of the indices and the
factor-major order of the Kronecker product; a CP matrix of rank ``R`` is the same with ``R``
terms and one factor per mode (no permutation). :func:`kron_terms` builds the small matrices
once per sequence (with autograd, so gradients reach the factors through them) and
:func:`kron_apply` multiplies rows by ``W`` with ``N`` matrix products and at most two copies.

Shape comments: ``m`` rows, ``P`` terms, ``i``/``j`` in and out features.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._cpu import CostModel, default_cost_model
from .._cpu.ops import gemm_price, weight_grad_terms
from ..formats import FactorizedMatrix
from ..formats.kcp.algebra import factor_dense_all

Splits = Sequence[Sequence[int]]

BROADCAST_GEMMS = 32
"""A middle factor of :func:`kron_apply` multiplies at most this many blocks of rows as one
batch of small GEMMs; more rows are moved (one copy) so that one GEMM per term covers them."""

__all__ = [
    "KronLayout",
    "kron_apply",
    "kron_layout",
    "kron_layout_of",
    "kron_matmul_macs",
    "kron_terms",
]


def _natural_axes(splits: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """``(d, n, size)`` of one side's axes in natural order (mode-major, factor-minor)."""
    return [(d, n, s) for d, mode in enumerate(splits) for n, s in enumerate(mode)]


def _factor_major(splits: Sequence[Sequence[int]], order: Sequence[int]) -> list[int]:
    """For every position of the factor-major order (factors in ``order``, modes within each),
    the natural index it holds."""
    axes = _natural_axes(splits)
    rank = {n: k for k, n in enumerate(order)}
    fm = sorted(range(len(axes)), key=lambda a: (rank[axes[a][1]], axes[a][0]))
    sizes = [s for _, _, s in axes]
    index = torch.arange(math.prod(sizes)).view(sizes).permute(fm).reshape(-1)
    return [int(v) for v in index.tolist()]


def _is_identity(index: Sequence[int]) -> bool:
    return all(i == k for k, i in enumerate(index))


@dataclass(frozen=True)
class KronLayout:
    """How a Kronecker sum's factor-major indices map to the natural ones.

    ``order``: the factors in the order of the Kronecker product (a product of factors in any
    order is the same matrix up to a permutation of the indices); ``in_index[m]``: the natural
    input index at factor-major position ``m``; ``out_index[j]``: the factor-major position of
    natural output index ``j`` (``None``: identity); ``in_sizes``/``out_sizes``: ``I^(n)``,
    ``J^(n)`` of the factors in ``order``.
    """

    order: tuple[int, ...]
    in_index: tuple[int, ...] | None
    out_index: tuple[int, ...] | None
    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]

    def __hash__(self) -> int:
        # hashed once: the index tuples have an entry per input or output, and every lookup of
        # what is kept per layout (its index tensors, its transpose, its gathers) hashes it
        found = self.__dict__.get("_hash")
        if found is None:
            fields = (self.order, self.in_index, self.out_index, self.in_sizes, self.out_sizes)
            found = hash(fields)
            object.__setattr__(self, "_hash", found)
        return found

    @property
    def in_features(self) -> int:
        return math.prod(self.in_sizes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_sizes)

    def transposed(self) -> KronLayout:
        """The layout of ``W.T`` (factors ``A_p^(n).T``, same order)."""
        return _transposed(self)

    def indices(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """``in_index`` and ``out_index`` as int64 tensors on ``device`` (kept per layout and
        device: do not modify them)."""
        return _indices(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def _transposed(self: KronLayout) -> KronLayout:
    return KronLayout(
        order=self.order,
        in_index=None if self.out_index is None else _inverse(self.out_index),
        out_index=None if self.in_index is None else _inverse(self.in_index),
        in_sizes=self.out_sizes,
        out_sizes=self.in_sizes,
    )


@functools.lru_cache(maxsize=64)
def _indices(layout: KronLayout, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    def make(index: tuple[int, ...] | None) -> Tensor | None:
        if index is None:
            return None
        with torch.inference_mode(False):  # usable outside inference mode too
            return torch.tensor(index, dtype=torch.int64, device=device)

    return make(layout.in_index), make(layout.out_index)


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for k, p in enumerate(perm):
        inv[p] = k
    return tuple(inv)


def kron_layout(
    in_splits: Sequence[Sequence[int]],
    out_splits: Sequence[Sequence[int]],
    order: Sequence[int] | None = None,
) -> KronLayout:
    """The layout of a Kronecker sum whose ``D x N`` factor sizes per mode are ``in_splits`` and
    ``out_splits`` (``splits[d][n] = I_d^(n)``), its factors multiplied in ``order`` (default:
    the largest factor last, where :func:`kron_apply` multiplies it with one plain GEMM, unless
    the natural order needs no gathers). Layouts are kept per sizes and order (a recurrence asks
    for its matrix's layout at every call)."""
    return _kron_layout(
        tuple(tuple(int(s) for s in m) for m in in_splits),
        tuple(tuple(int(s) for s in m) for m in out_splits),
        None if order is None else tuple(int(n) for n in order),
    )


@functools.lru_cache(maxsize=256)
def _kron_layout(
    in_splits: tuple[tuple[int, ...], ...],
    out_splits: tuple[tuple[int, ...], ...],
    order: tuple[int, ...] | None,
) -> KronLayout:
    num_n = len(in_splits[0])
    in_sizes = [math.prod(m[n] for m in in_splits) for n in range(num_n)]
    out_sizes = [math.prod(m[n] for m in out_splits) for n in range(num_n)]
    if order is None:
        natural = _kron_layout(in_splits, out_splits, tuple(range(num_n)))
        if natural.in_index is None and natural.out_index is None:
            return natural  # no gathers (CP): keep the factors as they are
        last = max(range(num_n), key=lambda n: in_sizes[n] * out_sizes[n])
        order = (*[n for n in range(num_n) if n != last], last)
    in_index = _factor_major(in_splits, order)
    out_fm = _factor_major(out_splits, order)  # natural output index at each position
    return KronLayout(
        order=tuple(order),
        in_index=None if _is_identity(in_index) else tuple(in_index),
        out_index=None if _is_identity(out_fm) else _inverse(out_fm),
        in_sizes=tuple(in_sizes[n] for n in order),
        out_sizes=tuple(out_sizes[n] for n in order),
    )


def _splits(matrix: FactorizedMatrix) -> tuple[Splits, Splits, int] | None:
    """``(in_splits, out_splits, terms)`` of ``matrix`` as a Kronecker sum, or ``None``."""
    name = matrix.format_name
    if name == "kcp":
        m: Any = matrix
        return m.in_splits, m.out_splits, int(m.terms)
    if name == "cp":  # one factor per mode, R terms
        us = list(matrix.factors)  # type: ignore[arg-type]
        d = len(us)
        ins = tuple(tuple(u.shape[2] if n == k else 1 for n in range(d)) for k, u in enumerate(us))
        outs = tuple(tuple(u.shape[1] if n == k else 1 for n in range(d)) for k, u in enumerate(us))
        return ins, outs, int(us[0].shape[0])
    return None


def kron_layout_of(matrix: FactorizedMatrix) -> tuple[KronLayout, int] | None:
    """The layout and number of terms of ``matrix`` as a Kronecker sum, without building
    anything; ``None`` for a format that is not one (only KCP and CP are)."""
    found = _splits(matrix)
    if found is None:
        return None
    in_splits, out_splits, terms = found
    return kron_layout(in_splits, out_splits), terms


def kron_terms(
    matrix: FactorizedMatrix, layout: KronLayout | None = None
) -> tuple[list[Tensor], KronLayout] | None:
    """The small matrices ``A^(n)`` ``(P, J^(n), I^(n))`` (in the layout's factor order) and the
    layout of ``matrix`` as a Kronecker sum, built with autograd from its factors; ``None`` for a
    format that is not one (only KCP and CP are)."""
    if layout is None:
        found = kron_layout_of(matrix)
        if found is None:
            return None
        layout = found[0]
    if matrix.format_name == "kcp":
        kcp: Any = matrix
        factors = [list(f) for f in kcp.factors]
        mats = factor_dense_all([factors[n] for n in layout.order])
    else:
        cp: Any = matrix
        us = list(cp.factors)
        mats = [us[n] for n in layout.order]
    return mats, layout


def kron_matmul_ops(layout: KronLayout, terms: int) -> int:
    """Operations :func:`kron_apply` launches: one product per factor, a copy before each middle
    factor, the sum of the terms and the gathers (an upper bound: few rows skip the copies)."""
    gathers = (layout.in_index is not None) + (layout.out_index is not None)
    factors = len(layout.in_sizes)
    return 2 * factors - 1 + (terms > 1) + gathers


def kron_factor_macs(layout: KronLayout, terms: int, rows: int) -> list[int]:
    """Multiply-accumulates of each factor's product in :func:`kron_apply` on ``rows`` rows,
    in ``layout.order``."""
    macs, pre, post = [], layout.in_features, 1
    for i, j in zip(reversed(layout.in_sizes), reversed(layout.out_sizes), strict=True):
        pre //= i
        macs.append(terms * rows * pre * i * j * post)
        post *= j
    return macs[::-1]


def kron_matmul_macs(layout: KronLayout, terms: int, rows: int) -> int:
    """Multiply-accumulates of :func:`kron_apply` on ``rows`` rows."""
    return sum(kron_factor_macs(layout, terms, rows))


def kron_apply(
    x: Tensor,
    mats: Sequence[Tensor],
    layout: KronLayout,
    index: tuple[Tensor | None, Tensor | None] | None = None,
    gather: bool = True,
) -> Tensor:
    """``x @ W.T`` for rows ``x`` ``(m, i)`` of the Kronecker sum ``mats`` (``N`` tensors
    ``(P, J^(n), I^(n))`` in ``layout.order``) laid out as ``layout``: ``(m, j)``.

    The input is gathered into factor-major order, each factor is one matrix product (the last
    factor a plain GEMM over all rows, the others batched over the rows before them), the terms
    are summed and the output gathered back. ``index``: ``layout.indices(x.device)``, made
    beforehand by a caller that multiplies many times. ``gather=False``: ``x`` and the result
    are in factor-major order (no gathers).
    """
    m = x.shape[0]
    if not gather:
        in_index = out_index = None
    else:
        in_index, out_index = layout.indices(x.device) if index is None else index
    if in_index is not None:
        x = x.index_select(1, in_index)  # (m, i) factor-major
    z = x.reshape(1, m, -1)  # (1, m, i)
    pre, post = layout.in_features, 1
    for n in range(len(mats) - 1, -1, -1):
        a = mats[n]  # (P, j_n, i_n)
        j_n, i_n = a.shape[1], a.shape[2]
        pre //= i_n
        rows = m * pre
        if post == 1:
            z = torch.matmul(z.reshape(z.shape[0], rows, i_n), a.transpose(1, 2))  # (P, rows, j_n)
        elif a.shape[0] * rows <= BROADCAST_GEMMS:  # few rows: a batch of small GEMMs
            z = torch.matmul(a.unsqueeze(1), z.reshape(z.shape[0], rows, i_n, post))
        else:  # many rows: one GEMM per term over the rows and trailing axes together
            zt = z.reshape(z.shape[0], rows, i_n, post).transpose(1, 2)  # (P, i_n, rows, post)
            y = torch.matmul(a, zt.reshape(z.shape[0], i_n, rows * post))  # (P, j_n, rows post)
            z = y.view(a.shape[0], j_n, rows, post).transpose(1, 2)  # (P, rows, j_n, post)
        post *= j_n
    y = (z.sum(0) if z.shape[0] > 1 else z.squeeze(0)).reshape(m, layout.out_features)
    return y if out_index is None else y.index_select(1, out_index)  # (m, j)


BATCHED_POST = 16
"""A factor applied along an axis followed by at least this many entries runs as a batch of
small GEMMs over the rows; before shorter trailing axes the rows are transposed first (one copy)
so that one GEMM per term covers them."""


def _along(z: Tensor, a: Tensor) -> Tensor:
    """``z`` ``(P', pre, i, post)`` with the factor ``a`` ``(P, j, i)`` applied along its third
    axis: ``(P, pre, j, post)`` (``P'`` is 1 or ``P``)."""
    pz, pre, i, post = z.shape
    p, j = a.shape[0], a.shape[1]
    if post == 1:
        return torch.matmul(z.view(pz, pre, i), a.transpose(1, 2)).view(p, pre, j, 1)
    if post >= BATCHED_POST:
        return torch.matmul(a[:, None], z)  # (P, pre, j, post)
    zt = z.transpose(2, 3).reshape(pz, pre * post, i)  # (P', pre post, i)
    y = torch.matmul(zt, a.transpose(1, 2))  # (P, pre post, j)
    return y.view(p, pre, post, j).transpose(2, 3)  # (P, pre, j, post)


def _contract(g: Tensor, x: Tensor) -> Tensor:
    """``Σ g[p, r, j, q] x[p, r, i, q]`` over ``r`` and ``q``: ``(P, j, i)``, for ``g``
    ``(P', pre, j, post)`` and ``x`` ``(P'', pre, i, post)``."""
    pg, pre, j, post = g.shape
    px, i = x.shape[0], x.shape[2]
    if post == 1:
        return torch.matmul(g.reshape(pg, pre, j).transpose(1, 2), x.reshape(px, pre, i))
    if post >= BATCHED_POST and j * i <= 2 * post * (i + j):  # per-row products, summed
        return torch.matmul(g, x.transpose(2, 3)).sum(1)  # (P, j, i)
    gt = g.transpose(1, 2).reshape(pg, j, pre * post)  # (P', j, pre post)
    xt = x.transpose(2, 3).reshape(px, pre * post, i)  # (P'', pre post, i)
    return torch.matmul(gt, xt)  # (P, j, i)


def kron_grads(
    x: Tensor, grad: Tensor, mats: Sequence[Tensor], needs: Sequence[bool]
) -> list[Tensor | None]:
    """The gradients of the factor matrices ``mats`` of ``y = kron_apply(x, mats)`` for output
    gradients ``grad``: rows ``x`` ``(m, i)`` and ``grad`` ``(m, j)``, both in factor-major
    order; ``needs[n]``: whether factor ``n``'s gradient is wanted.

    Factor ``n``'s gradient contracts ``x`` with the factors before it applied and ``grad`` with
    the transposes of those after it applied, over every axis but ``n``; both sweeps are
    carried from one factor to the next, so all ``N`` gradients take ``2 (N - 1)`` factor
    products and ``N`` contractions over all rows.
    """
    num = len(mats)
    ins = [a.shape[2] for a in mats]
    outs = [a.shape[1] for a in mats]
    wanted = [n for n in range(num) if needs[n]]
    if not wanted:
        return [None] * num
    m = x.shape[0]
    if m == 1 and num == 2 and mats[0].shape[0] == mats[1].shape[0] == 1:
        return _one_row_grads(x, grad, mats, needs)
    # xs[n]: x with factors < n applied, (P', m Π_{k<n} J_k, I_n, Π_{k>n} I_k)
    xs: dict[int, Tensor] = {}
    z = x.reshape(1, m, ins[0], -1)
    for n in range(max(wanted) + 1):
        xs[n] = z
        if n < max(wanted):
            y = _along(z, mats[n])  # (P, ., J_n, Π_{k>n} I_k)
            z = y.reshape(y.shape[0], -1, ins[n + 1], math.prod(ins[n + 2 :]))
    # gs[n]: grad with the transposes of factors > n applied, (P', m Π_{k<n} J_k, J_n, Π_{k>n} I_k)
    gs: dict[int, Tensor] = {}
    z = grad.reshape(1, -1, outs[-1], 1)
    for n in range(num - 1, min(wanted) - 1, -1):
        gs[n] = z
        if n > min(wanted):
            y = _along(z, mats[n].transpose(1, 2))  # (P, ., I_n, Π_{k>n} I_k)
            z = y.reshape(y.shape[0], -1, outs[n - 1], ins[n] * z.shape[3])
    out: list[Tensor | None] = []
    for n, a in enumerate(mats):
        if not needs[n]:
            out.append(None)
            continue
        da = _contract(gs[n], xs[n])  # (P', J_n, I_n)
        out.append(da.expand(a.shape).contiguous() if da.shape[0] != a.shape[0] else da)
    return out


def _one_row_grads(
    x: Tensor, grad: Tensor, mats: Sequence[Tensor], needs: Sequence[bool]
) -> list[Tensor | None]:
    """:func:`kron_grads` for one row through one term of two factors (a cell's step at batch
    1): with ``X`` ``(I_0, I_1)`` and ``G`` ``(J_0, J_1)`` the row and its gradient, ``Y = A_0 X
    A_1^T`` and the gradients are ``G A_1 X^T`` and ``G^T A_0 X``, four matrix products (the
    general sweeps take about twenty operators, whose launches are all a row's cost)."""
    a0, a1 = mats[0][0], mats[1][0]  # (J_0, I_0), (J_1, I_1)
    xm = x.reshape(a0.shape[1], a1.shape[1])  # (I_0, I_1)
    gm = grad.reshape(a0.shape[0], a1.shape[0])  # (J_0, J_1)
    d0 = gm.mm(a1).mm(xm.t()) if needs[0] else None  # (J_0, I_0)
    d1 = gm.t().mm(a0.mm(xm)) if needs[1] else None  # (J_1, I_1)
    return [None if d is None else d.unsqueeze(0) for d in (d0, d1)]  # (1, J_n, I_n)


NARROW_GRADS = 16.0
"""A MAC of :func:`kron_grads` over a factor whose smaller size is ``k`` costs
``1 + (NARROW_GRADS / k) ** 2`` large-GEMM MACs: small factors run far below a large GEMM's
rate (as batches of tiny products, or after transposing copies)."""


def kron_grads_cost(shapes: Sequence[Sequence[int]], rows: int) -> float:
    """The price of :func:`kron_grads` over ``rows`` rows for factors of ``shapes``
    ``(P, J, I)``, in large-GEMM MACs: its factor products and contractions, each weighted by
    the narrowness of the factor."""
    ins = [s[2] for s in shapes]
    outs = [s[1] for s in shapes]
    terms = shapes[0][0]
    total = 0.0
    for n in range(len(shapes)):
        # the x sweep applies factor n to (rows Π_{k<n} J_k, I_n, Π_{k>n} I_k), the gradient
        # sweep its transpose to (rows Π_{k<n} J_k, J_n, Π_{k>n} I_k); the contraction for
        # factor n multiplies the two
        macs = terms * rows * math.prod(outs[:n]) * ins[n] * outs[n] * math.prod(ins[n + 1 :])
        total += 3 * macs * (1 + (NARROW_GRADS / min(ins[n], outs[n])) ** 2)
    return total


def kron_grads_from_dense(
    dense: Tensor, mats: Sequence[Tensor], needs: Sequence[bool]
) -> list[Tensor | None]:
    """The gradients of the factor matrices ``mats`` (``N`` tensors ``(P, J_n, I_n)``) from the
    gradient ``dense`` ``(J, I)`` of their whole Kronecker sum, rows and columns in factor-major
    order; ``needs[n]``: whether factor ``n``'s gradient is wanted.

    With the entries of ``dense`` regrouped as a tensor ``T`` of modes ``(J_n I_n)`` (one copy),
    the sum is a CP decomposition of ``T`` with factor columns ``vec(A_p^(n))``, and factor
    ``n``'s gradient is ``T`` times the Khatri-Rao product of the others' columns (an MTTKRP):
    ``P |W|`` multiply-adds per factor, in one GEMM against the factors before it and one
    batched product with those after it."""
    num = len(mats)
    if not any(needs):
        return [None] * num
    p = mats[0].shape[0]
    outs = [a.shape[1] for a in mats]
    ins = [a.shape[2] for a in mats]
    sizes = [j * i for j, i in zip(outs, ins, strict=True)]
    pairs = [axis for n in range(num) for axis in (n, num + n)]
    t = dense.reshape(*outs, *ins).permute(pairs).reshape(-1)  # (Π J_n I_n,): T, one copy
    cols = [a.reshape(p, -1) for a in mats]  # (P, J_n I_n)

    def khatri_rao(parts: Sequence[Tensor]) -> Tensor:  # (P, Π sizes), the first part major
        out = parts[0] if parts else cols[0].new_ones(p, 1)
        for c in parts[1:]:
            out = (out[:, :, None] * c[:, None, :]).reshape(p, -1)
        return out

    grads: list[Tensor | None] = []
    for n in range(num):
        if not needs[n]:
            grads.append(None)
            continue
        left, right = math.prod(sizes[:n]), math.prod(sizes[n + 1 :])
        kl, kr = khatri_rao(cols[:n]), khatri_rao(cols[n + 1 :])  # (P, left), (P, right)
        if left == 1:
            d = kr.matmul(t.view(sizes[n], right).t()).view(p, sizes[n])  # (P, J_n I_n)
        else:
            z = kl.matmul(t.view(left, sizes[n] * right)).view(p, sizes[n], right)
            d = z.matmul(kr.unsqueeze(2)).view(p, sizes[n])  # (P, J_n I_n)
        grads.append(d.view(p, outs[n], ins[n]))
    return grads


KR_GRADS = 8.0
"""A MAC of :func:`kron_grads_from_dense` costs this many large-GEMM MACs (its products have
``P`` rows or columns, a few terms, and run far below a large GEMM's rate)."""


def kron_grads_dense_first(
    shapes: Sequence[Sequence[int]], rows: int, model: CostModel | None = None
) -> bool:
    """Whether the factor gradients over ``rows`` rows are cheaper from the dense gradient of
    the whole matrix (:func:`kron_grads_dense_cost`) than from :func:`kron_grads` over the rows
    themselves (:func:`kron_grads_cost`)."""
    return kron_grads_price(shapes, rows, model) < kron_grads_cost(shapes, rows)


def kron_grads_price(
    shapes: Sequence[Sequence[int]], rows: int, model: CostModel | None = None
) -> float:
    """The price of the factor gradients over ``rows`` rows as the structured loop takes them:
    the cheaper of the sweeps over the rows and, where the rows outnumber the matrix's inputs,
    the dense gradient's route (:func:`kron_grads_dense_cost`)."""
    sweeps = kron_grads_cost(shapes, rows)
    if rows <= math.prod(s[2] for s in shapes):
        return sweeps
    return min(sweeps, kron_grads_dense_cost(shapes, rows, model))


def kron_grads_dense_cost(
    shapes: Sequence[Sequence[int]], rows: int, model: CostModel | None = None
) -> float:
    """The price of the factor gradients over ``rows`` rows from the dense gradient, in
    large-GEMM MACs: the GEMM over the rows (:func:`kcprnn._cpu.ops.gemm_price` under
    ``model``), then :func:`kron_grads_from_dense` (the regrouping copy and ``P |W|``
    multiply-adds per factor at :data:`KR_GRADS`)."""
    ins = math.prod(s[2] for s in shapes)
    outs = math.prod(s[1] for s in shapes)
    cm = default_cost_model() if model is None else model
    gemm = gemm_price(*weight_grad_terms(rows, outs, ins), cm)
    return gemm + ins * outs * (1 + KR_GRADS * len(shapes) * shapes[0][0])


REBUILD_GATHER_LIMIT = 1 << 22
"""Largest matrix (in entries) whose rebuild reorders its entries by one gather over a kept
position table (two int32 tables, 8 bytes an entry); a larger one permutes and gathers its
rows and columns."""


def _reorder(flat: Tensor, layout: KronLayout) -> Tensor:
    """The Kronecker product laid out ``(J_1, I_1, J_2, I_2, ...)`` (factors in
    ``layout.order``) as the natural ``(out_features, in_features)`` matrix: factor-major rows
    and columns by one permute, then the natural order by gathers of rows and columns."""
    n = len(layout.in_sizes)
    sizes = [s for pair in zip(layout.out_sizes, layout.in_sizes, strict=True) for s in pair]
    w = flat.reshape(sizes).permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
    w = w.reshape(layout.out_features, layout.in_features)  # (j, i) factor-major
    in_index, out_index = layout.indices(w.device)
    if out_index is not None:
        w = w.index_select(0, out_index)
    if in_index is not None:
        w = w.index_select(1, torch.argsort(in_index))
    return w  # (j, i)


@functools.lru_cache(maxsize=16)
def _positions(layout: KronLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every entry of the natural ``(out_features, in_features)`` matrix, its position in
    the Kronecker product laid out as :func:`_reorder` takes it, and the inverse permutation:
    int32 ``(j * i,)`` each, kept per layout and device."""
    numel = layout.out_features * layout.in_features
    pos = _reorder(torch.arange(numel), layout).reshape(-1)
    return pos.to(device, torch.int32), torch.argsort(pos).to(device, torch.int32)


class _Permute(torch.autograd.Function):
    """``flat[pos]`` for a permutation ``pos``; the backward gathers with the inverse
    permutation (autograd's ``index_select`` would zero a buffer and scatter into it)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, pos: Tensor, inv: Tensor) -> Tensor:
        ctx.inv = inv
        return flat.index_select(0, pos)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.index_select(0, ctx.inv), None, None


def rebuild(matrix: FactorizedMatrix) -> Tensor:
    """``matrix`` dense ``(out_features, in_features)``, with autograd to its factors: a KCP or
    CP matrix from the small matrices of its Kronecker sum, any other format through
    ``to_dense``.

    The factors' Kronecker product is formed with each factor's whole block innermost
    (``(J_1, I_1, J_2, I_2, ...)``: broadcast products over contiguous runs, and the sum over
    the terms folded into one GEMM with the last factor), then put in the natural order by one
    gather over a kept position table."""
    if matrix.format_name not in ("kcp", "cp"):
        return matrix.to_dense()
    found = kron_terms(matrix)
    assert found is not None
    mats, layout = found
    p = mats[0].shape[0]
    left = mats[0].reshape(p, -1)  # (P, J_1 I_1)
    for b in mats[1:-1]:
        left = (left[:, :, None] * b.reshape(p, 1, -1)).reshape(p, -1)  # (P, .. J_n I_n)
    if len(mats) == 1:
        flat = left.sum(0)
    elif p == 1:
        flat = left.reshape(-1, 1) * mats[-1].reshape(1, -1)  # (.., J_N I_N)
    else:
        flat = left.t() @ mats[-1].reshape(p, -1)  # (.., J_N I_N): the sum over the terms
    j, i = layout.out_features, layout.in_features
    if j * i > REBUILD_GATHER_LIMIT or torch.compiler.is_compiling():
        return _reorder(flat, layout)
    pos, inv = _positions(layout, flat.device)
    return _Permute.apply(flat.reshape(-1), pos, inv).view(j, i)  # (j, i)
