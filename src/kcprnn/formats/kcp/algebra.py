"""The KCP format's math: mode splits, ranks, the parameter count, the reconstruction
``kcp_to_dense``, the decomposition ``kcp_from_dense`` and its multiply-accumulate count.

Notation as in the package docstring (:mod:`kcprnn.formats.kcp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ..._cpu import native_factor
from ...shapes import validate_positive_int, validate_ranks
from ..cp import cp_als

__all__ = [
    "Splits",
    "chunk_kron",
    "factor_dense",
    "factor_dense_all",
    "factor_dense_torch",
    "kron_pairs",
    "merged_axis_factors",
    "outer_rows",
    "kcp_from_dense",
    "kcp_num_params",
    "kcp_reconstruction_macs",
    "kcp_to_dense",
    "resolve_kcp_splits",
    "validate_kcp_ranks",
]

Splits = tuple[tuple[int, ...], ...]  # D x N factor sizes


# --- pure functions: shapes and counts ---


def _is_nested(modes: object) -> bool:
    return (
        isinstance(modes, Sequence)
        and not isinstance(modes, (str, bytes))
        and len(modes) > 0
        and all(isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in modes)
    )


def _check_nested(modes: Sequence[Sequence[int]], name: str) -> Splits:
    out = []
    for d, split in enumerate(modes):
        if len(split) == 0:
            raise ValueError(f"{name}[{d}] must list at least one factor size, got {list(split)}")
        out.append(
            tuple(validate_positive_int(s, f"{name}[{d}][{k}]") for k, s in enumerate(split))
        )
    lengths = {len(s) for s in out}
    if len(lengths) != 1:
        raise ValueError(
            f"every mode of {name} needs the same number of Kronecker factors, got "
            f"{name}={[list(s) for s in out]} with lengths {[len(s) for s in out]}"
        )
    return tuple(out)


def resolve_kcp_splits(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | Sequence[Sequence[int]] | None,
    out_modes: Sequence[int] | Sequence[Sequence[int]] | None,
    num_factors: int | None,
) -> tuple[Splits | None, Splits | None, int]:
    """Validate nested mode lists and resolve the number of Kronecker factors ``N``.

    Returns ``(in_splits, out_splits, N)``; a side given flat (or not at all) comes back ``None``
    and is split later with :func:`shapes.balanced_factors`.
    """
    if num_factors is not None:
        validate_positive_int(num_factors, "num_factors")
    in_splits = _check_nested(cast(Any, in_modes), "in_modes") if _is_nested(in_modes) else None
    out_splits = _check_nested(cast(Any, out_modes), "out_modes") if _is_nested(out_modes) else None
    for splits, name, features in (
        (in_splits, "in_modes", in_features),
        (out_splits, "out_modes", out_features),
    ):
        if splits is not None and math.prod(map(math.prod, splits)) != features:
            raise ValueError(
                f"the factor sizes of {name} must multiply to "
                f"{'in' if name == 'in_modes' else 'out'}_features={features}: "
                f"{name}={[list(s) for s in splits]} multiply to "
                f"{math.prod(map(math.prod, splits))}"
            )
    ns = {len(s[0]) for s in (in_splits, out_splits) if s is not None}
    if len(ns) > 1:
        raise ValueError(
            f"in_modes and out_modes need the same number of Kronecker factors per mode: "
            f"in_modes={[list(s) for s in in_splits or ()]}, "
            f"out_modes={[list(s) for s in out_splits or ()]}"
        )
    if ns:
        n = ns.pop()
        if num_factors is not None and num_factors != n:
            raise ValueError(
                f"num_factors={num_factors} disagrees with the {n} Kronecker factors per mode "
                f"given in the nested mode lists"
            )
        return in_splits, out_splits, n
    return None, None, 2 if num_factors is None else num_factors


def validate_kcp_ranks(rank: int | Sequence[int], num_factors: int) -> tuple[int, ...]:
    """The CP rank of each Kronecker factor: an int (shared) or a list of ``num_factors`` ints."""
    return validate_ranks(rank, num_factors, "rank")


def kcp_num_params(in_splits: Splits, out_splits: Splits, ranks: Sequence[int], terms: int) -> int:
    """``Σ_n P R_n Σ_d I_d^(n) J_d^(n)``."""
    return sum(
        terms * r * sum(i[n] * j[n] for i, j in zip(in_splits, out_splits, strict=False))
        for n, r in enumerate(ranks)
    )


# --- pure functions: reconstruction ---


def kron_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Batched Kronecker product of the last two axes: (.., J, I) x (.., j, i) -> (.., Jj, Ii)."""
    *lead, big_j, big_i = a.shape
    j, i = b.shape[-2:]
    if j == i == 1 or big_j == big_i == 1:  # a scalar per batch entry: a plain product
        return a * b  # (..., Jj, Ii)
    # reshapes rather than indexing with None: two autograd nodes fewer (prepare runs in
    # every training step)
    out = a.reshape(*lead, big_j, 1, big_i, 1) * b.reshape(*b.shape[:-2], 1, j, 1, i)
    return out.reshape(*out.shape[:-4], big_j * j, big_i * i)  # (..., Jj, Ii)


FLAT_GROUPS = 4096
"""``P R`` times the larger group's entries from which :func:`factor_dense` forms each group
flat, mode by mode with the whole next mode innermost (long contiguous runs, one reorder of
the result), rather than as Kronecker products of matrices (no reorder, but inner runs as short
as one mode's columns)."""


def _flat_group(fs: Sequence[Tensor]) -> Tensor:
    """``⊗_d fs[d][p, r]`` with each mode's ``(J_d, I_d)`` block kept whole:
    ``(p, r, J_1 I_1 J_2 I_2 ...)``."""
    p, r = fs[0].shape[:2]
    g = fs[0].reshape(p * r, -1)
    for f in fs[1:]:
        g = outer_rows(g, f.reshape(p * r, -1))  # (p r, ...)
    return g.view(p, r, -1)


OUTER_BMM_ROWS = 4096
"""``k m`` from which :func:`outer_rows` sums its backward by batched matrix products (with
``m`` at least :data:`OUTER_BMM_COLUMNS`)."""

OUTER_BMM_COLUMNS = 64
"""Fewest columns ``m`` of ``a`` for which :func:`outer_rows` takes batched products: below, a
batch of short matrix-vector products is no faster than the broadcast."""


def outer_rows(a: Tensor, b: Tensor) -> Tensor:
    """The outer product of each row pair, flattened: ``(k, m), (k, n) -> (k, m n)`` with
    ``out[q, s n + t] = a[q, s] b[q, t]``.

    The product broadcasts either way. Autograd's backward of a broadcast product is a product
    and a reduction over the broadcast axis per input, each through a ``(k, m, n)``
    temporary; from :data:`OUTER_BMM_ROWS` entries of ``a`` in rows of at least
    :data:`OUTER_BMM_COLUMNS` (and ``n > 1``) the backward is instead two batched
    matrix-vector products (:class:`_OuterRows`), up to 3x faster
    (``benchmarks/bench_outer_rows.py``). Traced code takes the broadcast."""
    k, m = a.shape
    n = b.shape[1]
    if (
        n > 1
        and m >= OUTER_BMM_COLUMNS
        and k * m >= OUTER_BMM_ROWS
        and torch.is_grad_enabled()
        and (a.requires_grad or b.requires_grad)
        and not torch.compiler.is_compiling()
    ):
        return cast(Tensor, _OuterRows.apply(a, b))  # (k, m n)
    return _broadcast_outer(a, b)  # (k, m n)


def _broadcast_outer(a: Tensor, b: Tensor) -> Tensor:
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)  # (k, m n)


class _OuterRows(torch.autograd.Function):
    """:func:`outer_rows` with a backward of batched products (itself differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return _broadcast_outer(a, b)  # (k, m n)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        g = grad.reshape(a.shape[0], a.shape[1], b.shape[1])  # (k, m, n)
        da = torch.bmm(g, b.unsqueeze(2)).squeeze(2) if ctx.needs_input_grad[0] else None
        db = torch.bmm(a.unsqueeze(1), g).squeeze(1) if ctx.needs_input_grad[1] else None
        return da, db  # (k, m), (k, n)


def factor_dense(factor: Sequence[Tensor]) -> Tensor:
    """``A_p = Σ_r ⊗_d F[d][p, r]`` for one Kronecker factor: ``(P, J^(n), I^(n))``.

    Where :func:`kcprnn._cpu.native_factor.in_one_node` (eager, on the CPU), as one autograd
    node (on the compiled kernel where the factor is small, else by two GEMMs); else on torch
    operations (:func:`factor_dense_torch`).
    """
    return factor_dense_all([factor])[0]


def factor_dense_all(factors: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """:func:`factor_dense` of each Kronecker factor in ``factors``; as one autograd node
    where it runs for all."""
    if all(native_factor.in_one_node(f) for f in factors):
        return native_factor.factor_dense(factors, factor_dense_torch)
    return [factor_dense_torch(f) for f in factors]


def factor_dense_torch(factor: Sequence[Tensor]) -> Tensor:
    """:func:`factor_dense` on torch operations.

    The modes are split in two groups of about equal size, each group's Kronecker products
    formed per rank, and the sum over the rank is one batched GEMM between them: ``r`` times
    fewer elements formed than the products of all the modes per rank, which a rank in the
    hundreds makes tens of megabytes (and as many again in the backward). Small groups are
    formed as Kronecker products of matrices (``(p, r, a, b)``); from :data:`FLAT_GROUPS`
    entries on, flat with each mode's block whole (:func:`_flat_group`) and the GEMM's result
    reordered once."""
    if len(factor) == 1:
        return factor[0].sum(1)  # (p, g, f)
    sizes = [f.shape[2] * f.shape[3] for f in factor]
    half = native_factor.halves(factor)
    p, r = factor[0].shape[:2]
    if p * r * max(math.prod(sizes[:half]), math.prod(sizes[half:])) >= FLAT_GROUPS:
        m = torch.bmm(_flat_group(factor[:half]).transpose(1, 2), _flat_group(factor[half:]))
        return native_factor.unblock(m, factor)  # (p, J, I)
    left, right = factor[0], factor[half]  # (p, r, a, b), (p, r, c, d)
    for f in factor[1:half]:
        left = kron_pairs(left, f)
    for f in factor[half + 1 :]:
        right = kron_pairs(right, f)
    a, b = left.shape[2:]
    c, d = right.shape[2:]
    m = torch.bmm(left.reshape(p, r, a * b).transpose(1, 2), right.reshape(p, r, c * d))
    # (p, a, b, c, d) -> rows (a, c), columns (b, d), as the products of all the modes index
    return m.reshape(p, a, b, c, d).permute(0, 1, 3, 2, 4).reshape(p, a * c, b * d)


def merged_axis_factors(factors: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """The merged CP over the ``D N`` axes (mode-major, factor-minor): axis ``(d, n)`` gets
    ``F^(n,d)[p, r_n]`` for the merged rank ``k = (p, r_1, ..., r_N)``, each ``(k, m, c)``."""
    num_n, num_d = len(factors), len(factors[0])
    ranks = [factors[n][0].shape[1] for n in range(num_n)]
    out = []
    for d in range(num_d):
        for n in range(num_n):
            f = factors[n][d]  # (p, r, m, c)
            p, r, m, c = f.shape
            if num_n == 1:  # k = (p, r): no broadcast
                out.append(f.reshape(p * r, m, c))  # (k, m, c)
                continue
            view = [p] + [r if q == n else 1 for q in range(num_n)] + [m, c]
            full = f.reshape(view).expand(p, *ranks, m, c)  # (p, r_1, ..., r_N, m, c)
            out.append(full.reshape(-1, m, c))  # (k, m, c)
    return out


def chunk_kron(mode_factors: Sequence[Tensor]) -> Tensor:
    """Kronecker over consecutive axes with a shared merged rank: ``(k, Π m, Π c)``."""
    t = mode_factors[0]  # (k, m, c)
    for u in mode_factors[1:]:
        t = kron_pairs(t, u)  # (k, m, c)
    return t


def kcp_to_dense(factors: Sequence[Sequence[Tensor]]) -> Tensor:
    """Reconstruct ``W`` (``(out_features, in_features)``) from ``factors[n][d]`` of shape
    ``(P, R_n, J_d^(n), I_d^(n))``."""
    n_f, n_d = len(factors), len(factors[0])
    dense = factor_dense_all(factors)  # each (p, g, f)
    t = dense[0]
    for a in dense[1:]:
        t = kron_pairs(t, a)  # (p, g, f): factor-major indices
    t = t.sum(0)  # (j, i) in factor-major order
    out_sizes = [factors[n][d].shape[2] for n in range(n_f) for d in range(n_d)]
    in_sizes = [factors[n][d].shape[3] for n in range(n_f) for d in range(n_d)]
    t = t.reshape(*out_sizes, *in_sizes)  # axes (n, d) for j then i
    mode_major = [n * n_d + d for d in range(n_d) for n in range(n_f)]
    t = t.permute(*mode_major, *[n_f * n_d + a for a in mode_major])  # axes (d, n)
    return t.reshape(math.prod(out_sizes), math.prod(in_sizes))  # (j, i)


def _nearest_kronecker_sum(
    t: Tensor, rows: Sequence[int], cols: Sequence[int], terms: int
) -> list[list[Tensor]]:
    """``terms`` Kronecker products nearest to ``t`` ``(J_1..J_N, I_1..I_N)``, in Frobenius norm:
    ``out[p][n]`` is ``A_p^(n)`` ``(J_n, I_n)``. Van Loan and Pitsianis: the truncated SVD of
    ``t`` rearranged as ``(J_1 I_1, J_2 I_2 ...)``; with more than two factors the second part of
    every term is split the same way, one Kronecker product each."""
    num_n = len(rows)
    if num_n == 1:
        return [[t.reshape(rows[0], cols[0]) / terms] for _ in range(terms)]
    rest = list(range(1, num_n))
    m = t.permute(0, num_n, *rest, *[num_n + k for k in rest])  # (J_1, I_1, J.., I..)
    u, sv, vh = torch.linalg.svd(m.reshape(rows[0] * cols[0], -1), full_matrices=False)
    out = []
    for p in range(terms):
        scale = sv[p].sqrt() if p < sv.shape[0] else sv.new_zeros(())
        first = (u[:, min(p, u.shape[1] - 1)] * scale).reshape(rows[0], cols[0])  # (J_1, I_1)
        second = (vh[min(p, vh.shape[0] - 1)] * scale).reshape(*rows[1:], *cols[1:])
        out.append([first, *_nearest_kronecker_sum(second, rows[1:], cols[1:], 1)[0]])
    return out


def kcp_from_dense(
    weight: Tensor,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    max_iter: int = 100,
) -> list[list[Tensor]]:
    """KCP factors ``factors[n][d]`` ``(P, R_n, J_d^(n), I_d^(n))`` approximating ``weight``
    ``(out_features, in_features)``.

    ``W`` is reordered factor-major (the inverse of :func:`kcp_to_dense`'s final permute), split
    into the ``P`` nearest sums of Kronecker products (:func:`_nearest_kronecker_sum`), and every
    ``A_p^(n)`` is decomposed by CP-ALS of rank ``R_n`` over its ``D`` merged modes
    (:func:`~kcprnn.formats.cp.cp_als`). Exact, up to ALS convergence, when ``W`` has such a
    KCP with ``P = 1``; with several terms the SVD recovers their span, whose members may need a
    higher CP rank, so the result is an approximation.
    """
    num_d, num_n = len(in_splits), len(in_splits[0])
    out_sizes = [out_splits[d][n] for d in range(num_d) for n in range(num_n)]
    in_sizes = [in_splits[d][n] for d in range(num_d) for n in range(num_n)]
    t = weight.reshape(*out_sizes, *in_sizes)  # axes (d, n) for j, then for i
    factor_major = [d * num_n + n for n in range(num_n) for d in range(num_d)]
    t = t.permute(*factor_major, *[num_d * num_n + a for a in factor_major])  # axes (n, d)
    rows = [math.prod(out_splits[d][n] for d in range(num_d)) for n in range(num_n)]
    cols = [math.prod(in_splits[d][n] for d in range(num_d)) for n in range(num_n)]
    mats = _nearest_kronecker_sum(t.reshape(*rows, *cols), rows, cols, terms)  # [p][n]
    factors = []
    for n, rank in enumerate(ranks):
        ins = [in_splits[d][n] for d in range(num_d)]
        outs = [out_splits[d][n] for d in range(num_d)]
        per_term = []
        for p in range(terms):
            a = mats[p][n]  # (J^(n), I^(n))
            if not bool(a.abs().max() > 0):  # more terms than the SVD found: a zero term
                per_term.append([a.new_zeros(rank, j, i) for i, j in zip(ins, outs, strict=True)])
            else:
                per_term.append(cp_als(a, ins, outs, rank, max_iter=max_iter))  # D x (r, g, f)
        factors.append(
            [torch.stack([per_term[p][d] for p in range(terms)]) for d in range(num_d)]
        )  # each (p, r, g, f)
    return factors


def kcp_reconstruction_macs(
    in_splits: Splits, out_splits: Splits, ranks: Sequence[int], terms: int
) -> int:
    """Multiply-accumulates of :func:`kcp_to_dense` (Kronecker products and sums count as MACs)."""
    num_d = len(in_splits)
    total = 0
    for n, r in enumerate(ranks):
        size = 1
        for d in range(num_d):
            size *= in_splits[d][n] * out_splits[d][n]
            total += terms * r * size if d else 0
        total += terms * r * size  # sum over r
    size = 1
    for n in range(len(ranks)):
        size *= math.prod(in_splits[d][n] * out_splits[d][n] for d in range(num_d))
        total += terms * size if n else 0
    return total + terms * size  # sum over p
