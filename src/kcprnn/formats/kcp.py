r"""Kronecker CP (KCP) format: a sum of ``P`` Kronecker products of ``N`` CP tensors (KCP.md §2-3).

.. math::
    W[j, i] = \sum_{p=1}^{P} \prod_{n=1}^{N} \sum_{r=1}^{R_n} \prod_{d=1}^{D}
              F^{(n,d)}[p, r, j_d^{(n)}, i_d^{(n)}]

Every mode is split once more into ``N`` Kronecker factors, ``I_d = I_d^(1) ⋯ I_d^(N)`` and
``J_d = J_d^(1) ⋯ J_d^(N)``; ``i`` is the row-major flattening of the multi-index
``(i_1^(1), ..., i_1^(N), i_2^(1), ..., i_D^(N))`` (mode-major, factor-minor), ``j`` likewise.
``F^(n,d)`` is ``factors[n][d]`` of shape ``(P, R_n, J_d^(n), I_d^(n))``.

Legend for shape comments: b batch rows, k merged rank ``(p, r_1, ..., r_N)``, p term,
r rank of one factor, a/c input indices of the prefix/suffix chunk of axes, m/o output indices
of the prefix/suffix chunk, f input axes of the current factor, g output axes of the current
factor, e every other axis.

Two exact fast products (KCP.md §3), both plain GEMMs on reshaped views:

* ``parallel`` (:func:`kcp_linear_parallel`): merge the factors into a CP of rank
  ``K = P Π_n R_n`` over the ``D N`` axes ``(d, n)`` of the input (mode-major, factor-minor); cut
  the axes into a prefix ``[0, s)`` and a suffix ``[s, D N)`` and merge each chunk, for every
  merged rank, into one small dense matrix. Step 1 is ONE GEMM over the contiguous trailing
  axes of every row, ``(b a, c) -> (b a, k o)``; step 2 is one GEMM per row, or one tall GEMM
  when ``o`` is narrow, that contracts ``(a, k)`` together, so the rank sum is part of the GEMM.
  No copy of the input, no Python loop over ranks.
* ``sequential`` (:func:`kcp_linear_sequential`): factor by factor. For each factor ``n`` the sum
  over ``r`` is done first, in the small dense matrix ``A_p^(n) = Σ_r ⊗_d F^(n,d)[p, r]`` of shape
  ``(J^(n), I^(n))``, which multiplies the factor's input axes. Its cost grows with
  ``P Π_d J_d^(n)`` instead of ``K``, so it wins at high ranks. Size-1 axes are dropped; a factor
  whose axes form one block of the current layout (a factor owning whole modes) multiplies a
  view of the input, while interleaved axes are gathered by block transposes, one permute or
  one pass of the compiled gather, in chunks of rows (:func:`_sequential_walk`). The last
  factor, applied to the small data the others leave, can run as its own CP product instead of
  its dense matrix (``KCPPlan.inner``; ``KCPPlan.inner_order`` moves its output-only modes into
  that product's prefix; in inference a compiled kernel runs it and writes the final layout).
  The output axes are reordered last, by one ``index_select`` where a permuted copy would
  crawl (:func:`_final_gathers`). In training the walk is one autograd node with a
  hand-written backward (:class:`_SequentialProduct`).

``auto`` picks the cheaper one by :func:`kcp_cost` (arithmetic, memory traffic of every step,
gathering copies, fresh pages of large blocks, GEMM row overhead, a per-kernel launch cost, and
the tall GEMMs that run on the compiled kernel or oneDNN,
:func:`~kcprnn.formats._ops.tall_linear`);
the split point of ``parallel`` and the factor order and last-factor form of ``sequential`` are
chosen by the same model. Under ``no_grad`` the module keeps the small matrices between calls.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..shapes import balanced_factors, validate_positive_int, validate_ranks
from . import _native, _ops
from ._base import FactorizedMatrix, register
from ._ops import tall_forward_transposed, tall_linear, weight_grad
from .cp import cp_als

__all__ = [
    "KCPMatrix",
    "KCPPlan",
    "kcp_cost",
    "kcp_from_dense",
    "kcp_linear_parallel",
    "kcp_linear_sequential",
    "kcp_parallel_prepare",
    "kcp_num_params",
    "kcp_plan",
    "kcp_plan_flops",
    "kcp_reconstruction_flops",
    "kcp_sequential_prepare",
    "kcp_to_dense",
    "resolve_kcp_splits",
    "validate_kcp_ranks",
]

Splits = tuple[tuple[int, ...], ...]  # D x N factor sizes

# Cost-model weights, in multiply-accumulate equivalents (calibrated on a 2-core x86 CPU with
# torch 2.13 and checked by benchmarks/bench_kcp_auto.py): one element read or written by a GEMM,
# one element moved by a strided permute copy, one GEMM row (small inner dimensions run far
# below peak), one kernel launch (Python + dispatch overhead).
COST_IO = 1.0
COST_PERMUTE = 60.0  # per element with a contiguous run of 6; (0.5 + 3 / run) times that
COST_GATHER_INDEX = 120.0  # per element of a final reordering that runs as an index_select:
# the gather alone is about 40-55 (0.34-0.48 ns an element against ~0.009 per modelled MAC);
# 85 left 2 multi-row points of benchmarks/bench_kcp_auto.py (4k, R = 2, 16 and 96 rows) on
# sequential at 1.14-1.23x parallel's time, 120 none (the walk's other copies run slower there)
FINAL_GATHER_RUN = 16  # see _final_gathers
COST_NATIVE_GATHER, COST_NATIVE_GATHER_RUN = 20.0, 60.0  # the compiled one-pass gather, per
# element plus this over its contiguous run (UCF11 interleaved, 96 rows: 0.75-1.3 ms for the
# 5.5M numbers with runs of 6, where torch's three block swaps took about 2 ms). The gather
# alone would be about 10 + 60 / run; at 5 + 60 / run auto took sequential at R = 2 where
# parallel was 1.2-1.35x faster (UCF11 1 row, 230k 1-16 rows, benchmarks/bench_kcp_auto.py):
# sequential's other costs run higher than modelled at few rows, and so it is priced here
COST_SWAP, COST_SWAP_RUN = 11.0, 40.0  # one block transpose: per element, plus this over its run
BIG_ELEMENTS = 1 << 22  # 16 MB of float32: blocks this large are often mapped fresh by the
# allocator at every call and page-faulted in, about COST_FAULT per element
COST_FAULT = 40.0
GATHER_CHUNK = 1 << 21  # sequential gathers inputs larger than this in chunks of rows this size
COST_NARROW = 24.0  # batched GEMMs of width w run (1 + COST_NARROW / w) times a MAC
COST_ROW = 150.0
COST_KERNEL = 5.0e5
COST_KERNEL_PREPARED = 1.5e5  # under no_grad (``prepared``): no autograd node per op. Measured at
# one row, 4k, 2 threads: sequential 42 us, parallel 26 us at R = 1, a common 18 us, so about
# 2.7 us per kernel against 9 in training; with 5e5 here, auto missed 4 one-row points of
# benchmarks/bench_kcp_auto.py (1.14-1.48x), with 1.5e5 one (1.14x) and no multi-row point
COST_BUILD = 30.0  # broadcast products and copies building the small matrices, per element
NARROW = 16  # parallel step 2 uses per-row GEMMs from this many suffix outputs on
ONEDNN_GAIN = 0.8  # MAC cost of a tall GEMM that runs on oneDNN (_ops.onednn_covers)
# relative to MKL's. The GEMMs alone run at 0.43-0.9x (65,536 rows,
# 16-360 inputs, 8-64 outputs); 0.8 is the value at which auto misses no multi-row point of
# benchmarks/bench_kcp_auto.py (0.3-0.7 pick parallel at 4k, R = 2, 1,024 rows: 1.6x slower)
NATIVE_GAIN, NATIVE_GAIN_WIDE = 0.5, 0.75  # modelled cost of a tall GEMM on the compiled kernel
# (_ops.native_covers) relative to MKL's, up to 4 outputs and up to 8: about 0.4-0.7 against
# MKL, 0.45-0.72 against the better of MKL and oneDNN at 2-4 outputs and 0.8-0.95 at 8 (15,360
# x 360, 1,536 x 3,600, 61,440 x 90, 96 x 57,600; benchmarks/bench_tall.py, several runs)
# Backward over forward time of each algorithm when the factors need gradients (the input does
# not): measured at the UCF11 point, 96 rows, 2 threads, R = 1 and 2 (parallel 1.58 / 1.46,
# sequential 0.48 / 0.51; benchmarks/results/full-2thread). ``auto`` uses them in training.
BACKWARD = {"parallel": 1.5, "sequential": 0.5}


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
    in_splits = _check_nested(in_modes, "in_modes") if _is_nested(in_modes) else None
    out_splits = _check_nested(out_modes, "out_modes") if _is_nested(out_modes) else None
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
            f"in_modes={[list(s) for s in in_splits]}, out_modes={[list(s) for s in out_splits]}"
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


def _kron_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Batched Kronecker product of the last two axes: (.., J, I) x (.., j, i) -> (.., Jj, Ii)."""
    *lead, big_j, big_i = a.shape
    j, i = b.shape[-2:]
    if j == i == 1 or big_j == big_i == 1:  # a scalar per batch entry: a plain product
        return a * b  # (..., Jj, Ii)
    # reshapes rather than indexing with None: two autograd nodes fewer (prepare runs in
    # every training step)
    out = a.reshape(*lead, big_j, 1, big_i, 1) * b.reshape(*b.shape[:-2], 1, j, 1, i)
    return out.reshape(*out.shape[:-4], big_j * j, big_i * i)  # (..., Jj, Ii)


def _factor_dense(factor: Sequence[Tensor]) -> Tensor:
    """``A_p = Σ_r ⊗_d F[d][p, r]`` for one Kronecker factor: ``(P, J^(n), I^(n))``."""
    t = factor[0]  # (p, r, g, f)
    for f in factor[1:]:
        t = _kron_pairs(t, f)  # (p, r, g, f)
    return t.sum(1)  # (p, g, f)


def _merged_axis_factors(factors: Sequence[Sequence[Tensor]]) -> list[Tensor]:
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


def _chunk(mode_factors: Sequence[Tensor]) -> Tensor:
    """Kronecker over consecutive axes with a shared merged rank: ``(k, Π m, Π c)``."""
    t = mode_factors[0]  # (k, m, c)
    for u in mode_factors[1:]:
        t = _kron_pairs(t, u)  # (k, m, c)
    return t


def kcp_to_dense(factors: Sequence[Sequence[Tensor]]) -> Tensor:
    """Reconstruct ``W`` (``(out_features, in_features)``) from ``factors[n][d]`` of shape
    ``(P, R_n, J_d^(n), I_d^(n))``."""
    n_f, n_d = len(factors), len(factors[0])
    dense = [_factor_dense(f) for f in factors]  # each (p, g, f)
    t = dense[0]
    for a in dense[1:]:
        t = _kron_pairs(t, a)  # (p, g, f): factor-major indices
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


def kcp_reconstruction_flops(
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


# --- pure functions: plans and cost model ---


@dataclass(frozen=True)
class KCPPlan:
    """One way to evaluate ``x @ W.T``: ``algorithm`` is ``"parallel"`` (``split`` = first axis of
    the suffix chunk) or ``"sequential"`` (``order`` = factors in the order they are applied;
    ``inner`` >= 0 applies the last factor, on the small data left by the others, as its own
    rank-``R_n`` CP product cut at that mode instead of through its dense matrix; its modes are
    taken in ``inner_order``, which moves modes with one input index into the prefix).
    ``macs`` counts every multiply-accumulate (building the small dense matrices included),
    ``cost`` is the modelled time in MAC equivalents, ``peak`` the largest intermediate,
    ``kernel_saving`` what the forward saves by running tall GEMMs on the compiled kernel or
    oneDNN (the model prices their backward without it)."""

    algorithm: str
    split: int = 0
    order: tuple[int, ...] = ()
    macs: int = 0
    cost: float = 0.0
    peak: int = 0
    inner: int = -1  # sequential: the last factor as its own CP product cut here (-1: dense)
    inner_order: tuple[int, ...] = ()  # its modes in that product's order (empty: 0..D-1)
    kernel_saving: float = 0.0  # modelled forward cost saved by the kernel and oneDNN


def _kernel_cost(prepared: bool) -> float:
    """The modelled cost of one kernel launch: less under ``no_grad`` (no autograd node)."""
    return COST_KERNEL_PREPARED if prepared else COST_KERNEL


def _tall_saving(rows: int, f: int, outs: int, macs: int) -> float:
    """MAC equivalents saved when a tall GEMM of ``rows`` rows, ``f`` inputs and ``outs``
    outputs runs on the compiled kernel or oneDNN (:func:`~kcprnn.formats._ops.tall_linear`)
    instead of MKL: a share of its whole modelled cost (MACs, elements read and written, rows)
    for the kernel, of its MACs for oneDNN."""
    if _ops.native_covers(rows, f, outs):
        gain = NATIVE_GAIN if outs <= _ops.NATIVE_MAX_OUT // 2 else NATIVE_GAIN_WIDE
        return (1.0 - gain) * (macs + COST_IO * rows * (f + outs) + COST_ROW * rows)
    if _ops.onednn_covers(rows, f, outs):
        return (1.0 - ONEDNN_GAIN) * macs
    return 0.0


def _parallel_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    split: int,
    inner: bool = False,
    prepared: bool = False,
) -> KCPPlan:
    """One cut of the parallel product; ``inner``: as the last factor of a sequential product,
    whose narrow output stays suffix-major (the sequential walk's final permute is priced
    there); ``prepared``: the small matrices are kept between calls (their building is not
    priced; it still counts in ``macs``)."""
    k = terms * math.prod(ranks)
    ins = [i for s in in_splits for i in s]  # axis sizes, mode-major factor-minor
    outs = [j for s in out_splits for j in s]
    a, c = math.prod(ins[:split]), math.prod(ins[split:])
    m, o = math.prod(outs[:split]), math.prod(outs[split:])
    build = sum(k * i * j for i, j in zip(ins, outs, strict=False)) if len(ranks) > 1 else 0
    build += sum(
        k * math.prod(ins[split : t + 1]) * math.prod(outs[split : t + 1])
        for t in range(split + 1, len(ins))
    )
    build += sum(k * math.prod(ins[: t + 1]) * math.prod(outs[: t + 1]) for t in range(1, split))
    build += k * a * m if split else 0  # the prefix is laid out as (m, a k)
    mid = rows * a * k * o
    macs = build + rows * a * c * k * o + (rows * m * a * k * o if split else mid)
    io = rows * a * c + 2 * mid + rows * m * o
    kernels = 2 * len(ins) + 3
    moved = 0
    gemm_rows = rows * a
    if split and o >= NARROW:
        gemm_rows += rows * m
    elif split:
        gemm_rows += rows * o
        moved = mid + (0 if inner else rows * m * o)
    faults = sum(t for t in (mid, mid if moved else 0) if t > BIG_ELEMENTS)  # z, its transpose
    saved = _tall_saving(rows * a, c, k * o, rows * a * c * k * o)
    if prepared:
        kernels -= 2 * len(ins)
    cost = (
        macs
        - saved
        + (-1 if prepared else COST_BUILD - 1) * build
        + COST_IO * io
        + COST_PERMUTE * moved
        + COST_FAULT * faults
        + COST_ROW * gemm_rows
        + _kernel_cost(prepared) * kernels
    )
    return KCPPlan(
        "parallel",
        split=split,
        macs=macs,
        cost=cost,
        peak=max(mid, rows * a * c),
        kernel_saving=saved,
    )


Axis = tuple[tuple, int]  # (label, size): ("i"|"j", d, n) or ("p",)


@dataclass(frozen=True)
class _SeqStep:
    """One factor of the sequential product on the row layout ``(b, *axes)`` (size-1 axes are
    dropped). ``gather`` says how the factor's axes (``group``) are brought together: ``"none"``
    (already one contiguous block), ``"swaps"`` (the block transposes ``swaps``, each
    ``(pre, m, k, post)`` per row: ``(pre, m, k, post) -> (pre, k, m, post)``), ``"permute"`` (one
    permute copy, ``perm`` over the axes after the rows), ``"native"`` (the same permutation in
    one pass of the compiled gather, :func:`~kcprnn.formats._native.gather`, torch's permute
    where that does not run) or ``"pbatched"`` (permute to
    ``(p, b, rest, group)``, one BMM per term, back to ``(b, p, rest, new)``). The contraction
    itself is a GEMM over ``f`` with ``g`` outputs on the view ``(b pre, f, post)``."""

    factor: int
    gather: str
    group: tuple[Axis, ...]
    swaps: tuple[tuple[int, int, int, int], ...] = ()
    perm: tuple[int, ...] = ()
    pre: int = 1
    f: int = 1
    post: int = 1
    g: int = 1
    axes: tuple[Axis, ...] = ()  # the layout after the step


def _swaps_to_end(sizes: Sequence[int], flags: Sequence[bool]) -> list[tuple[int, int, int, int]]:
    """Block transposes moving the flagged axes behind the others, both keeping their order."""
    sizes, flags, out = list(sizes), list(flags), []
    while True:
        s = flags.index(True) if True in flags else len(flags)
        e = s
        while e < len(flags) and flags[e]:
            e += 1
        if e == len(flags):
            return out
        f = e
        while f < len(flags) and not flags[f]:
            f += 1
        out.append(
            (
                math.prod(sizes[:s]),
                math.prod(sizes[s:e]),
                math.prod(sizes[e:f]),
                math.prod(sizes[f:]),
            )
        )
        sizes = sizes[:s] + sizes[e:f] + sizes[s:e] + sizes[f:]
        flags = flags[:s] + flags[e:f] + flags[s:e] + flags[f:]


def _swap_cost(swaps: Sequence[tuple[int, int, int, int]]) -> float:
    """Per row, in MAC equivalents: every stage copies everything once; short runs cost more."""
    return sum(pre * m * k * post * (COST_SWAP + COST_SWAP_RUN / post) for pre, m, k, post in swaps)


def _run_of(sizes: Sequence[int], perm: Sequence[int]) -> int:
    """The contiguous run of a permute copy: the trailing axes it leaves in place."""
    run, t = 1, len(perm) - 1
    while t >= 0 and perm[t] == t:
        run *= sizes[t]
        t -= 1
    return run


def _permute_cost(sizes: Sequence[int], perm: Sequence[int]) -> float:
    """Per row: one permute copy whose contiguous run is the trailing axes it leaves in place."""
    return math.prod(sizes) * COST_PERMUTE * (0.5 + 3.0 / _run_of(sizes, perm))


def _final_gathers(sizes: Sequence[int], perm: Sequence[int]) -> bool:
    """Whether the final reordering of the output axes ``sizes`` into ``perm`` runs as one
    ``index_select`` of every row rather than a permuted copy: where, after merging the axes
    that stay adjacent (size-1 axes ignored), more than two axes remain and the contiguous run
    the reordering leaves is under ``FINAL_GATHER_RUN`` numbers. Strided copies with short runs
    and many axes crawl; a flat gather costs the same for every order. Measured on 96 rows of
    1,024 outputs, 2 threads (copy / gather, us): the paper's interleaved UCF11 layout, 8 axes
    of 2-4 and a run of 2, 578 / 32; 3 axes with runs 2, 4, 8 and 16: 96, 60, 35, 17 / 33; a
    plain transpose of 2 axes, run 1: 26-33 / 33; 5 axes, run 4: 103 / 33."""
    keep = sorted(q for q in perm if sizes[q] > 1)
    rank = {q: t for t, q in enumerate(keep)}
    src = [rank[q] for q in perm if sizes[q] > 1]
    groups = [[src[0]]] if src else []
    for a, c in zip(src, src[1:], strict=False):
        if c == a + 1:
            groups[-1].append(c)
        else:
            groups.append([c])
    if len(groups) <= 2:
        return False
    run = math.prod(sizes[keep[t]] for t in groups[-1]) if groups[-1][-1] == len(src) - 1 else 1
    return run < FINAL_GATHER_RUN


def _final_cost(sizes: Sequence[int], perm: Sequence[int]) -> float:
    """Per row: the final reordering of the output axes (:func:`_final_gathers`)."""
    if _final_gathers(sizes, perm):
        return math.prod(sizes) * COST_GATHER_INDEX
    return _permute_cost(sizes, perm)


@lru_cache(maxsize=64)
def _final_index(
    sizes: tuple[int, ...], perm: tuple[int, ...], device: torch.device, inverse: bool
) -> Tensor:
    """The flat ``index_select`` index of the final reordering (:func:`_final_gathers`): output
    number ``t`` of a row is number ``index[t]`` of the row in ``sizes`` layout; with
    ``inverse``, the other way round (the backward). Made outside inference mode, so that
    autograd may save it."""
    with torch.inference_mode(False):
        idx = torch.arange(math.prod(sizes), device=device).view(sizes).permute(perm).reshape(-1)
        return torch.argsort(idx) if inverse else idx  # (j,)


def _gather(
    axes: Sequence[Axis], group: Sequence[Axis], g: int
) -> tuple[str, tuple, tuple, int, int, int, float]:
    """The cheapest way to bring ``group`` together for a GEMM with ``g`` outputs: ``(gather,
    swaps, perm, pre, f, post, cost per row)``. The group keeps its relative order (the factor's
    matrix follows it). A block with trailing axes (``post > 1``) runs as batched GEMMs whose
    width is ``post``, charged ``COST_NARROW / post`` per MAC on top; moving it to the end first
    is often cheaper."""
    sizes = [s for _, s in axes]
    flags = [a in group for a in axes]
    pos = [t for t, flag in enumerate(flags) if flag]
    f = math.prod(sizes[t] for t in pos)
    if not pos:  # a factor whose input sizes are all 1 multiplies every element
        return "none", (), (), math.prod(sizes), 1, 1, 0.0
    rest = math.prod(sizes) // f
    options = []
    if pos == list(range(pos[0], pos[-1] + 1)):
        pre, post = math.prod(sizes[: pos[0]]), math.prod(sizes[pos[-1] + 1 :])
        options.append(
            (COST_NARROW * pre * f * g if post > 1 else 0.0, ("none", (), (), pre, f, post))
        )
    to_end = _swaps_to_end(sizes, flags)
    to_front = _swaps_to_end(sizes, [not flag for flag in flags])
    perm = tuple([t for t in range(len(axes)) if not flags[t]] + pos)
    options += [
        (_swap_cost(to_end), ("swaps", tuple(to_end), (), rest, f, 1)),
        (
            _swap_cost(to_front) + (COST_NARROW * f * g if rest > 1 else 0.0),
            ("swaps", tuple(to_front), (), 1, f, rest),
        ),
        (_permute_cost(sizes, perm), ("permute", (), perm, rest, f, 1)),
    ]
    if _native.available():  # (float32 on CPU at run time; torch's permute elsewhere)
        options.append(
            (
                math.prod(sizes)
                * (COST_NATIVE_GATHER + COST_NATIVE_GATHER_RUN / _run_of(sizes, perm)),
                ("native", (), perm, rest, f, 1),
            )
        )
    cost, best = min(options, key=lambda o: o[0])
    return (*best, cost)


@lru_cache(maxsize=1024)
def _sequential_walk(
    in_splits: Splits,
    out_splits: Splits,
    terms: int,
    order: tuple[int, ...],
    last_out: tuple[int, ...] = (),
) -> tuple[tuple[_SeqStep, ...], tuple[int, ...], float]:
    """The steps of :func:`kcp_linear_sequential` for ``N >= 2``: each factor's gathering and GEMM
    sizes per row, the final permute of the output axes (empty when none is needed) and the
    modelled cost per row of all gathering copies. Shared by the product and its cost model.
    ``last_out`` orders the last factor's output modes (default ``0..D-1``; an inner CP product
    lays them out in its own order, :func:`_inner_out_modes`)."""
    num_d, num_n = len(in_splits), len(in_splits[0])
    axes = _input_axes(in_splits)
    p_axis: Axis = (("p",), terms)
    steps, copy_cost = [], 0.0
    for t, n in enumerate(order):
        own = [a for a in axes if a[0][0] == "i" and a[0][2] == n]
        modes = last_out if last_out and t == len(order) - 1 else range(num_d)
        new = tuple((("j", d, n), out_splits[d][n]) for d in modes if out_splits[d][n] > 1)
        g = math.prod(out_splits[d][n] for d in range(num_d))
        has_p = p_axis in axes
        if has_p and t < len(order) - 1:  # P > 1 between the first and the last factor
            rest = [a for a in axes if a != p_axis and a not in own]
            sizes = [s for _, s in axes]
            perm = tuple([axes.index(p_axis)] + [axes.index(a) for a in rest + own])
            moved = (perm[0] + 1, 0, *[q + 1 for q in perm[1:]])  # (p, b, rest, own)
            copy_cost += (
                _permute_cost([1, *sizes], moved)
                + math.prod(s for _, s in rest) * g * terms * COST_PERMUTE
            )  # and back to (b, p, ...)
            axes = [p_axis, *rest, *new]
            steps.append(
                _SeqStep(
                    n,
                    "pbatched",
                    tuple(own),
                    perm=perm,
                    pre=math.prod(s for _, s in rest),
                    f=math.prod(s for _, s in own),
                    g=g,
                    axes=tuple(axes),
                )
            )
            continue
        group = ([p_axis] if has_p else []) + own  # the last factor sums over p in its GEMM
        group = [a for a in axes if a in group]  # in layout order
        out = ((p_axis,) if terms > 1 and t == 0 else ()) + new
        g_out = g * (terms if t == 0 else 1)
        gather, swaps, perm, pre, f, post, cost = _gather(axes, group, g_out)
        copy_cost += cost
        rest = [a for a in axes if a not in group]
        if gather == "none" and group:
            first = axes.index(group[0])
            before = [a for a in axes[:first] if a not in group]
            after = [a for a in axes[first:] if a not in group]
            if post == 1:
                before, after = before + after, []
        elif post == 1:  # gathered at the end, or no input axes at all
            before, after = rest, []
        else:  # gathered at the front
            before, after = [], rest
        axes = [*before, *out, *after]
        steps.append(
            _SeqStep(n, gather, tuple(group), swaps, perm, pre, f, post, g_out, tuple(axes))
        )
    target = [
        (("j", d, n), out_splits[d][n])
        for d in range(num_d)
        for n in range(num_n)
        if out_splits[d][n] > 1
    ]
    final = tuple(axes.index(a) for a in target)
    if final == tuple(range(len(final))):
        final = ()
    else:
        copy_cost += _final_cost([s for _, s in axes], final)
    return tuple(steps), final, copy_cost


def _sequential_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    order: tuple[int, ...],
    prepared: bool = False,
) -> KCPPlan:
    num_d = len(in_splits)
    fi = [math.prod(in_splits[d][n] for d in range(num_d)) for n in range(len(ranks))]
    fo = [math.prod(out_splits[d][n] for d in range(num_d)) for n in range(len(ranks))]
    build = sum(terms * r * fi[n] * fo[n] for n, r in enumerate(ranks))
    size = rows * math.prod(fi)
    macs, io, gemm_rows, peak, copies, saved = build, 0, 0, size, 0.0, 0.0
    if len(ranks) == 1:  # N == 1: the p-sum of the small matrix, then one GEMM
        macs += terms * fi[0] * fo[0] + size * fo[0]
        io, gemm_rows, kernels = size + rows * fo[0], rows, 2 * num_d + 3
    else:
        steps, final, copies = _sequential_walk(in_splits, out_splits, terms, order)
        chunks = math.ceil(rows / _chunk_rows(rows, math.prod(fi), steps)) if rows else 1
        kernels = 0
        for step in steps:
            batch = terms if step.gather == "pbatched" else 1
            new = rows * batch * step.pre * step.g * step.post
            step_macs = rows * batch * step.pre * step.f * step.g * step.post
            macs += step_macs
            if batch == 1 and step.post == 1:
                saved += _tall_saving(
                    math.ceil(rows / chunks) * step.pre, step.f, step.g, step_macs
                )
            io += size + new
            gemm_rows += rows * batch * step.pre * (1 if step.post == 1 else step.g)
            copied = len(step.swaps) + (step.gather in ("permute", "native", "pbatched"))
            if chunks == 1 and size > BIG_ELEMENTS:  # fresh pages for each copy
                io += COST_FAULT / COST_IO * size * copied
            if new > BIG_ELEMENTS:
                io += COST_FAULT / COST_IO * new
            kernels += 2 + copied
            size = new
            peak = max(peak, size)
        kernels = 2 * num_d * len(ranks) + chunks * (kernels + bool(final)) + 1
    if prepared:
        kernels -= 2 * num_d * len(ranks)
    cost = (
        macs
        - saved
        + (-1 if prepared else COST_BUILD - 1) * build
        + COST_IO * io
        + rows * copies
        + COST_ROW * gemm_rows
        + _kernel_cost(prepared) * kernels
    )
    plan = KCPPlan("sequential", order=order, macs=macs, cost=cost, peak=peak, kernel_saving=saved)
    if len(ranks) > 1 and terms == 1:
        plan = _inner_last(plan, rows, in_splits, out_splits, ranks, steps[-1], copies, prepared)
    return plan


def _inner_last(
    plan: KCPPlan,
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    step: _SeqStep,
    copies: float,
    prepared: bool = False,
) -> KCPPlan:
    """``plan`` with its last factor applied as its own CP product (:func:`kcp_linear_parallel`
    with ``N = 1`` on the gathered rows) when the model finds that cheaper than building the
    factor's dense ``(J^(n), I^(n))`` matrix and multiplying by it; ``P = 1`` only. Every cut and
    mode order of :func:`_inner_orders` is priced, with the final permute its output layout
    needs (``copies``: the gathering cost per row of ``plan``'s walk)."""
    if step.gather == "pbatched" or step.post != 1:
        return plan
    n, num_d = step.factor, len(in_splits)
    m = rows * step.pre
    build = ranks[n] * step.f * step.g
    dense_saving = _tall_saving(m, step.f, step.g, m * step.f * step.g)  # already in plan.cost
    dense = (
        (0 if prepared else COST_BUILD * build)
        + m * step.f * step.g
        - dense_saving
        + COST_IO * m * (step.f + step.g)
        + COST_ROW * m
        + _kernel_cost(prepared) * (2 if prepared else 2 * num_d + 2)
    )
    ins = [in_splits[d][n] for d in range(num_d)]
    outs = [out_splits[d][n] for d in range(num_d)]
    best: tuple[float, KCPPlan, tuple[int, ...]] | None = None
    for order, split in _inner_orders(ins):
        modes = order or tuple(range(num_d))
        alt = _parallel_plan(
            m,
            tuple((ins[d],) for d in modes),
            tuple((outs[d],) for d in modes),
            (ranks[n],),
            1,
            split,
            inner=True,
            prepared=prepared,
        )
        _, _, walked = _sequential_walk(
            in_splits, out_splits, 1, plan.order, _inner_out_modes(ins, outs, order, split)
        )
        cost = alt.cost + rows * (walked - copies)
        if best is None or cost < best[0]:
            best = (cost, alt, order)
    assert best is not None
    cost, alt, order = best
    if cost >= dense:
        return plan
    macs = plan.macs - build - m * step.f * step.g + alt.macs
    return KCPPlan(
        "sequential",
        order=plan.order,
        macs=macs,
        cost=plan.cost - dense + cost,
        peak=plan.peak,
        inner=alt.split,
        inner_order=order,
        kernel_saving=plan.kernel_saving - dense_saving + alt.kernel_saving,
    )


def kcp_cost(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    algorithm: str,
    prepared: bool = False,
) -> KCPPlan:
    """The cheapest plan of ``algorithm`` (``"parallel"`` or ``"sequential"``) on ``rows`` rows.

    The model, in MAC equivalents: ``cost = MACs + (COST_BUILD - 1) * (elements built for the
    small matrices) + COST_IO * (elements read and written by the GEMMs) + COST_PERMUTE *
    (elements moved by permute copies) + COST_ROW * (GEMM rows) + COST_KERNEL * (kernels)``
    (``COST_KERNEL_PREPARED`` when ``prepared``: no autograd recording).
    The plan also reports ``peak``, its largest intermediate. For ``parallel`` every cut point is
    tried, for ``sequential`` every factor order (up to 4 factors; beyond, the factors that shrink
    the data most go first). ``prepared``: the small matrices are built once and kept (the
    module's inference cache), so building them is not priced. Results are cached per shape.
    """
    if algorithm not in ("parallel", "sequential"):
        raise ValueError(
            f"algorithm must be 'parallel' or 'sequential', got algorithm={algorithm!r}"
        )
    return _cost_cached(
        rows,
        tuple(map(tuple, in_splits)),
        tuple(map(tuple, out_splits)),
        tuple(ranks),
        terms,
        algorithm,
        prepared,
    )


@lru_cache(maxsize=4096)
def _cost_cached(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: tuple[int, ...],
    terms: int,
    algorithm: str,
    prepared: bool,
) -> KCPPlan:
    if algorithm == "parallel":
        plans = [
            _parallel_plan(rows, in_splits, out_splits, ranks, terms, s, prepared=prepared)
            for s in range(len(in_splits) * len(ranks))
        ]
    else:
        num_n = len(ranks)
        if num_n <= 4:
            orders = list(itertools.permutations(range(num_n)))
        else:
            ratio = [
                math.prod(o[n] for o in out_splits) / math.prod(i[n] for i in in_splits)
                for n in range(num_n)
            ]
            orders = [tuple(sorted(range(num_n), key=lambda n: ratio[n]))]
        plans = [
            _sequential_plan(rows, in_splits, out_splits, ranks, terms, o, prepared) for o in orders
        ]
    return min(plans, key=lambda plan: plan.cost)


def kcp_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    algorithm: str = "auto",
    training: bool = False,
    prepared: bool = False,
) -> KCPPlan:
    """The plan ``forward`` runs: ``auto`` is the cheaper of the two by :func:`kcp_cost`.

    With ``training=True`` (gradients flow into the factors) ``auto`` compares forward plus
    backward: the backward of ``parallel`` repeats its GEMM over the input and differentiates
    the per-row step, ``BACKWARD[algorithm]`` times its forward cost; the backward of
    ``sequential`` reuses the gathered input and skips the permute, about half its forward.
    The backward is priced on the forward's cost without its kernel saving (the weight
    gradients run on MKL or blocked products).

    ``prepared`` (:func:`kcp_cost`): the small matrices are kept between calls (the module's
    inference cache, under ``no_grad``).

    The choice depends on ``rows``, so the MACs of ``auto`` are affine in ``rows`` only
    piecewise, between the row counts where the choice changes.
    """
    if algorithm == "auto":
        plans = [
            kcp_cost(rows, in_splits, out_splits, ranks, terms, a, prepared)
            for a in ("parallel", "sequential")
        ]
        if training:  # the backward's GEMMs stay on torch: no kernel saving there
            return min(
                plans,
                key=lambda plan: (
                    plan.cost + BACKWARD[plan.algorithm] * (plan.cost + plan.kernel_saving)
                ),
            )
        return min(plans, key=lambda plan: plan.cost)
    return kcp_cost(rows, in_splits, out_splits, ranks, terms, algorithm, prepared)


def kcp_plan_flops(plan: KCPPlan) -> int:
    """Multiply-accumulates of a plan (what ``matmul_flops`` reports)."""
    return plan.macs


# --- pure functions: products ---


def kcp_parallel_prepare(
    factors: Sequence[Sequence[Tensor]], split: int = 0
) -> tuple[Tensor, Tensor | None]:
    """The two merged chunks of :func:`kcp_linear_parallel` cut at axis ``split``: the suffix
    ``(k, o, c)`` and the prefix laid out as ``(m, a k)`` (``None`` when ``split == 0``)."""
    num_axes = len(factors) * len(factors[0])
    if not 0 <= split < num_axes:
        raise ValueError(f"split must be in [0, {num_axes}), got split={split}")
    u = _merged_axis_factors(factors)  # each (k, m, c)
    suffix = _chunk(u[split:])  # (k, o, c)
    if split == 0:
        return suffix, None
    prefix = _chunk(u[:split])  # (k, m, a)
    m, a = prefix.shape[1:]
    return suffix, prefix.permute(1, 2, 0).reshape(m, a * prefix.shape[0])  # (m, a k)


def kcp_linear_parallel(
    x: Tensor,
    factors: Sequence[Sequence[Tensor]],
    split: int = 0,
    prepared: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """``x @ W.T`` through the merged CP of rank ``K = P Π_n R_n`` (KCP.md §3, parallel).

    The ``D N`` axes of the input (mode-major, factor-minor) are cut at axis ``split``: axes
    ``[0, split)`` form the prefix chunk, ``[split, D N)`` the suffix chunk, and each is merged,
    per merged rank, into one dense matrix (:func:`kcp_parallel_prepare`; ``prepared`` passes
    them in, built earlier from the same factors). Step 1 is one GEMM over the trailing
    (contiguous) suffix of every row, step 2 one batched GEMM over the prefix and the rank
    together. x: ``(b, in_features)`` -> ``(b, out_features)``.
    """
    suffix, prefix = prepared if prepared is not None else kcp_parallel_prepare(factors, split)
    y, swapped = _parallel_rows(x, suffix, prefix)  # (b, m, o), or (b, o, m) if swapped
    if swapped:
        y = y.transpose(1, 2)  # (b, m, o)
    return y.reshape(x.shape[0], y.shape[1] * y.shape[2])  # (b, j)


def _parallel_rows(
    x: Tensor, suffix: Tensor, prefix: Tensor | None, keep: list | None = None
) -> tuple[Tensor, bool]:
    """Steps 1 and 2 of :func:`kcp_linear_parallel`: ``(y, swapped)`` with ``y`` ``(b, m, o)``,
    or ``(b, o, m)`` when ``swapped`` (a narrow suffix, ``o < NARROW``, runs step 2 as one tall
    GEMM whose output comes suffix-major; :func:`_inner_out_modes` predicts it). ``keep``
    collects step 1's output and, when swapped, its transpose (for a hand-written backward)."""
    k, o, c = suffix.shape
    b = x.shape[0]
    z = tall_linear(x.reshape(-1, c), suffix.reshape(k * o, c))  # (b a, k o)
    if keep is not None:
        keep.append(z)
    if prefix is None:
        return z.reshape(b, k, o).sum(1, keepdim=True), False  # (b, 1, o)
    m, a = prefix.shape[0], prefix.shape[1] // k
    if o >= NARROW and torch.is_grad_enabled() and (prefix.requires_grad or z.requires_grad):
        return torch.matmul(prefix, z.reshape(b, a * k, o)), False  # (b, m, o): sums a and k
    if o >= NARROW:  # one GEMM per row on the broadcast prefix: no copies (2.6x faster than
        # matmul's folding at (16, 16) x (192, 16, 32); its backward would be 10x slower)
        return torch.bmm(prefix.expand(b, m, a * k), z.reshape(b, a * k, o)), False  # (b, m, o)
    # narrow per-row GEMMs run slowly: transpose into one tall GEMM instead
    zt = z.reshape(b, a * k, o).transpose(1, 2).reshape(b * o, a * k)  # (b o, a k)
    if keep is not None:
        keep.append(zt)
    return F.linear(zt, prefix).reshape(b, o, m), True  # (b, o, m)


def _inner_orders(in_sizes: Sequence[int]) -> list[tuple[tuple[int, ...], int]]:
    """Mode orders and cuts for a one-factor CP product over modes with input sizes
    ``in_sizes``: every cut of the natural order, and every cut with the modes past it that
    have a single input index (outputs only) moved into the prefix. They leave the input
    layout unchanged and shrink the suffix GEMM by their output size; step 2's work is the
    same. ``(order, split)`` pairs; ``order`` is empty for the natural one."""
    num_d = len(in_sizes)
    out: list[tuple[tuple[int, ...], int]] = [((), s) for s in range(num_d)]
    for s in range(num_d):
        rest = range(s, num_d)
        free = [d for d in rest if in_sizes[d] == 1]
        kept = [d for d in rest if in_sizes[d] > 1]
        if free and kept and free != list(range(s, s + len(free))):
            out.append(((*range(s), *free, *kept), s + len(free)))
    return out


def _inner_out_modes(
    in_sizes: Sequence[int], out_sizes: Sequence[int], order: Sequence[int], split: int
) -> tuple[int, ...]:
    """The modes of the inner CP product's output, in the order :func:`_parallel_rows` lays
    them out: prefix then suffix, or suffix then prefix when the suffix is narrow."""
    order = tuple(order) or tuple(range(len(in_sizes)))
    head, tail = order[:split], order[split:]
    if split and math.prod(out_sizes[d] for d in tail) < NARROW:
        return (*tail, *head)
    return order


def _input_axes(in_splits: Splits) -> list[Axis]:
    """The input's axes after the rows, mode-major and factor-minor, size-1 axes dropped."""
    return [
        (("i", d, n), s) for d, split in enumerate(in_splits) for n, s in enumerate(split) if s > 1
    ]


def _group_matrix(a_n: Tensor, step: _SeqStep, first: bool) -> Tensor:
    """Factor ``n``'s small matrix ``(p, g, f)`` laid out for ``step``'s GEMM: ``(p g, f)`` when
    the first factor opens ``p``, else ``(g, f')`` with the columns in the layout order of the
    group (``p`` among the factor's axes when the last factor sums over it)."""
    p, g, f = a_n.shape
    if first or p == 1:
        return a_n.reshape(p * g, f)  # (p g, f)
    own = [s for lab, s in step.group if lab != ("p",)]
    q = next(k for k, (lab, _) in enumerate(step.group) if lab == ("p",))
    dims = [2 + k for k in range(len(own))]
    dims.insert(q, 0)
    return a_n.reshape(p, g, *own).permute(1, *dims).reshape(g, p * f)  # (g, group)


def kcp_sequential_prepare(
    factors: Sequence[Sequence[Tensor]],
    order: Sequence[int],
    inner: int = -1,
    inner_order: Sequence[int] = (),
) -> list[Any]:
    """What :func:`kcp_linear_sequential` builds from the factors before touching the input:
    every factor's dense ``(p, g, f)`` matrix, or for the last factor with ``inner >= 0`` its
    two chunks (:func:`kcp_parallel_prepare`, its modes in ``inner_order``)."""
    out: list[Any] = []
    for n, f in enumerate(factors):
        if inner >= 0 and n == order[-1]:
            modes = tuple(inner_order) or range(len(f))
            out.append(kcp_parallel_prepare([[f[d] for d in modes]], inner))
        else:
            out.append(_factor_dense(f))
    return out


def kcp_linear_sequential(
    x: Tensor,
    factors: Sequence[Sequence[Tensor]],
    order: Sequence[int] | None = None,
    inner: int = -1,
    prepared: Sequence[Any] | None = None,
    bias: Tensor | None = None,
    splits: tuple[Splits, Splits] | None = None,
    inner_order: Sequence[int] = (),
) -> Tensor:
    """``x @ W.T`` factor by factor (KCP.md §3, sequential).

    Factor ``n`` is applied as its small dense matrix ``A_p^(n) = Σ_r ⊗_d F^(n,d)[p, r]`` (the
    rank is summed before moving on) to its input axes ``(i_1^(n), ..., i_D^(n))``. Axes of size 1
    are dropped; when the factor's axes already form one block of the current layout (a factor
    that owns whole trailing or leading modes, e.g. ``in_modes=[[8, 1], [20, 1], [1, 20],
    [1, 18]]``) the GEMM runs on a view, with no copy of the input. Otherwise they are gathered
    by the cheapest of a few block transposes or one permute (:func:`_sequential_walk`).
    ``order`` lists the factors in the order they are applied (default ``0, ..., N-1``).
    ``inner`` >= 0 (``P = 1`` only) applies the last factor as its own rank-``R_n`` CP product,
    :func:`kcp_linear_parallel` cut at mode ``inner``, instead of through its dense matrix: far
    fewer MACs when that matrix is large and the data left by the other factors is small.
    ``inner_order`` takes that product's modes in another order (:func:`_inner_orders`: modes
    with one input index moved into the prefix; the input modes keep their order).
    ``prepared`` passes in :func:`kcp_sequential_prepare` of the same factors, order, inner and
    inner_order.
    ``bias`` ``(out_features,)`` is added in the final reordering of the output axes.
    ``splits`` = ``(in_splits, out_splits)`` saves reading them from the factors' shapes.
    x: ``(b, in_features)`` -> ``(b, out_features)``.
    """
    num_n, num_d = len(factors), len(factors[0])
    order = tuple(range(num_n)) if order is None else tuple(order)
    if sorted(order) != list(range(num_n)):
        raise ValueError(f"order must be a permutation of range({num_n}), got order={list(order)}")
    if num_n == 1:  # a CP over the merged modes
        dense = prepared[0] if prepared is not None else _factor_dense(factors[0])  # (p, g, f)
        return F.linear(x, dense.sum(0), bias)  # (b, j)
    terms = factors[0][0].shape[0]
    if splits is None:
        splits = (
            tuple(tuple(factors[n][d].shape[3] for n in range(num_n)) for d in range(num_d)),
            tuple(tuple(factors[n][d].shape[2] for n in range(num_n)) for d in range(num_d)),
        )
    walk = _sequential_setup(
        tuple(map(tuple, splits[0])),
        tuple(map(tuple, splits[1])),
        terms,
        order,
        inner,
        tuple(inner_order),
    )
    dense = (
        prepared
        if prepared is not None
        else kcp_sequential_prepare(factors, order, inner, inner_order)
    )
    return _sequential_run(x, _walk_matrices(dense, walk.steps), walk, bias)  # (b, j)


@lru_cache(maxsize=256)
def _sequential_setup(
    in_splits: Splits,
    out_splits: Splits,
    terms: int,
    order: tuple[int, ...],
    inner: int,
    inner_order: tuple[int, ...],
) -> _Walk:
    """The checked walk of :func:`kcp_linear_sequential` (cached per shape and plan)."""
    num_d = len(in_splits)
    if inner_order:
        n_last = order[-1]
        kept = [d for d in inner_order if in_splits[d][n_last] > 1]
        if sorted(inner_order) != list(range(num_d)) or kept != sorted(kept):
            raise ValueError(
                f"inner_order must be a permutation of range({num_d}) that keeps the modes "
                f"with more than one input index in order, got inner_order={list(inner_order)}"
            )
    last_out: tuple[int, ...] = ()
    if inner >= 0 and 0 <= inner < num_d:
        n_last = order[-1]
        last_out = _inner_out_modes(
            [in_splits[d][n_last] for d in range(num_d)],
            [out_splits[d][n_last] for d in range(num_d)],
            inner_order,
            inner,
        )
    steps, final, _ = _sequential_walk(in_splits, out_splits, terms, order, last_out)
    if inner >= 0 and not (terms == 1 and 0 <= inner < num_d and steps[-1].post == 1):
        raise ValueError(
            f"inner={inner} needs one Kronecker term (terms={terms}), a mode index in "
            f"[0, {num_d}) and a last factor gathered at the end of the rows"
        )
    gathers = bool(final) and _final_gathers([s for _, s in steps[-1].axes], final)
    return _Walk(
        steps,
        final,
        tuple(_input_axes(in_splits)),
        math.prod(map(math.prod, out_splits)),
        terms,
        gathers,
    )


def _walk_matrices(dense: Sequence[Any], steps: Sequence[_SeqStep]) -> list[Any]:
    """Each step's matrix for :func:`_run_walk`, from :func:`kcp_sequential_prepare`'s output:
    ``(g, f)`` laid out for the step's GEMM, the ``(p, g, f)`` factor of a ``pbatched`` step, or
    the inner product's ``(suffix, prefix)``."""
    mats = []
    for t, step in enumerate(steps):
        a_n = dense[step.factor]  # (p, g, f), or the inner product's two chunks
        plain = step.gather == "pbatched" or isinstance(a_n, tuple)
        mats.append(a_n if plain else _group_matrix(a_n, step, t == 0))  # (g, f)
    return mats


def _sequential_run(x: Tensor, mats: Sequence[Any], walk: _Walk, bias: Tensor | None) -> Tensor:
    """:func:`_run_walk` in chunks of rows (:func:`_chunk_rows`). When autograd needs gradients
    and no step is batched over terms, each chunk is one autograd node
    (:class:`_SequentialProduct`) with a hand-written backward: a GEMM pair per step and the
    inverse gathers, instead of a graph of some thirty small nodes."""
    flat = [t for m in mats for t in (m if isinstance(m, tuple) else (m,))]
    fused = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, bias, *flat))
        and all(step.gather != "pbatched" for step in walk.steps)
    )

    def run(part: Tensor) -> Tensor:
        if fused:
            return _SequentialProduct.apply(part, bias, walk, *flat)  # (b, j)
        return _run_walk(part, mats, walk, bias)  # (b, j)

    b = x.shape[0]
    chunk = _chunk_rows(b, x.shape[1], walk.steps)
    if chunk < b:  # keep the gathered copies under the allocator's mmap threshold
        return torch.cat([run(part) for part in x.split(chunk)])  # (b, j)
    return run(x)  # (b, j)


def _chunk_rows(rows: int, in_features: int, steps: Sequence[_SeqStep]) -> int:
    """Rows per chunk: all of them, unless the first step copies an input of more than
    ``GATHER_CHUNK`` elements; then chunks of about that size, whose copies stay in cache and
    are reused by the allocator instead of being mapped fresh (measured at the UCF11 size,
    96 rows, R = 2 and 4: 5-6 ms in chunks of 48 rows, 11-15 ms in one pass)."""
    if steps[0].gather in ("swaps", "permute", "native") and rows * in_features > GATHER_CHUNK:
        return max(1, GATHER_CHUNK // in_features)
    return rows


@dataclass(frozen=True)
class _Walk:
    """What :func:`_run_walk` needs besides the data: the steps, the final permute, the input
    axes, the output size and the number of terms."""

    steps: tuple[_SeqStep, ...]
    final: tuple[int, ...]
    in_axes: tuple[Axis, ...]
    out_features: int
    terms: int
    gathers: bool = False  # the final reordering runs as an index_select (_final_gathers)


def _run_walk(
    x: Tensor, mats: Sequence[Any], walk: _Walk, bias: Tensor | None, saved: list | None = None
) -> Tensor:
    """The forward of the sequential walk; ``mats[t]`` is step ``t``'s ``(g, f)`` matrix, its
    ``(p, g, f)`` factor (``pbatched``) or the inner product's ``(suffix, prefix)``. ``saved``
    collects, per step, what :func:`_walk_backward` needs (the GEMM inputs)."""
    b = x.shape[0]
    axes: Sequence[Axis] = walk.in_axes
    z = x
    swapped = False  # the previous GEMM wrote its output already in the next step's first swap
    # gathering copies go to reused buffers (_ops.scratch: no fresh pages at every call) unless
    # autograd records the walk; the copy a step's GEMM takes stays fresh when ``saved`` keeps it
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, *[u for m in mats for u in (m if isinstance(m, tuple) else (m,))])
    )
    for t, (step, mat) in enumerate(zip(walk.steps, mats, strict=True)):
        sizes = [s for _, s in axes]
        skip_swap, swapped = swapped, False
        if step.gather == "pbatched":  # P > 1 between the first and the last factor
            perm = [step.perm[0] + 1, 0, *[q + 1 for q in step.perm[1:]]]
            zz = z.reshape(b, *sizes).permute(*perm).reshape(walk.terms, b * step.pre, step.f)
            y = torch.bmm(zz, mat.transpose(1, 2))  # (p, b e, g)
            z = y.reshape(walk.terms, b, -1).transpose(0, 1)  # (b, p, e g)
            axes = step.axes
            continue
        if step.gather == "swaps":
            swaps = step.swaps[1:] if skip_swap else step.swaps
            for u, (pre, m, k, post) in enumerate(swaps):
                z = z.reshape(b * pre, m, k, post).transpose(1, 2)  # (b pre, k, m, post)
                if not recording and (saved is None or u < len(swaps) - 1):
                    z = _reuse_copy(z, u % 2)
        elif step.gather in ("permute", "native"):
            z = z.reshape(b, *sizes).permute(0, *[q + 1 for q in step.perm])  # (b, e, f)
            if step.gather == "native" and not recording:
                z = _native_gather(z, saved is None)
            else:
                z = _reuse_copy(z, 0) if not recording and saved is None else z
        if isinstance(mat, tuple):  # the last factor as its own CP product (``inner``), its
            # output modes laid out as the walk's last step says (``last_out``)
            if saved is None and not recording and t == len(walk.steps) - 1:
                out = _inner_native(z.reshape(b, step.pre, step.f), mat, walk, bias)
                if out is not None:
                    return out  # (b, j)
            zin = z.reshape(b * step.pre, step.f)  # (b e, f)
            keep: list | None = [zin] if saved is not None else None
            z, _ = _parallel_rows(zin, *mat, keep)  # (b e, m, o)
            z = z.reshape(b, step.pre * step.g)  # (b, e g)
            if saved is not None:
                saved.append(keep)
        elif step.post == 1:
            zin = z.reshape(b * step.pre, step.f)  # (b e, f)
            nxt = walk.steps[t + 1] if t + 1 < len(walk.steps) else None
            if (
                nxt is not None
                and nxt.gather == "swaps"
                and nxt.swaps[0] == (1, step.pre, step.g, 1)
            ):  # the next step starts by transposing (e, g)
                # (the compiled kernel writes (b, g, e) directly; one GEMM per row on torch,
                # bmm(mat.expand(b, g, f), x.transpose), was 20 % faster with the input in
                # cache but 1.7x slower with it in memory: 0.31/0.85 ms against 0.38/0.50)
                z_t = tall_forward_transposed(zin.reshape(b, step.pre, step.f), mat)
                swapped = z_t is not None
            z = z_t if swapped else tall_linear(zin, mat)  # (b, g, e) or (b e, g)
            if saved is not None:
                saved.append(zin)
        else:
            zin = z.reshape(b * step.pre, step.f, step.post)  # (b e, f, post)
            z = torch.matmul(mat, zin)  # (b e, g, post)
            if saved is not None:
                saved.append(zin)
        axes = step.axes
    if walk.gathers:  # the output numbers of each row picked in order by one flat index
        index = _final_index(tuple(s for _, s in axes), walk.final, z.device, False)
        z = torch.index_select(z.reshape(b, walk.out_features), 1, index)  # (b, j)
        return z if bias is None else z.add_(bias)  # (b, j)
    if walk.final:
        z = z.reshape(b, *[s for _, s in axes]).permute(0, *[q + 1 for q in walk.final])
        if bias is not None:  # bias first: the sum comes out contiguous, in output order
            return (bias.view(z.shape[1:]) + z).reshape(b, walk.out_features)  # (b, j)
    z = z.reshape(b, walk.out_features)  # (b, j)
    return z if bias is None else z + bias  # (b, j)


def _inner_native(
    z: Tensor, mat: tuple[Tensor, Tensor | None], walk: _Walk, bias: Tensor | None
) -> Tensor | None:
    """The walk's last step, the last factor's two-chunk CP product, with the final reordering
    and the bias, in one pass of the compiled kernel (:func:`~kcprnn.formats._native.inner_rows`)
    over ``z`` ``(b, e, f)``; ``None`` where the kernel does not run it (a suffix-only product,
    autograd, not float32 on CPU, no kernel). UCF11 blocked layout, 96 rows, 2 threads: the
    torch path's two GEMMs, transposing copy and permuted add took 0.12-0.15 ms."""
    suffix, prefix = mat
    if prefix is None or not _native.fits(z, suffix, prefix, *(() if bias is None else (bias,))):
        return None
    k, o, c = suffix.shape
    m = prefix.shape[0]
    offsets, runs = _inner_offsets(walk, o, m, _native.width())
    # the chunks laid out for the kernel, kept on the suffix: inference keeps the chunks
    # between calls (KCPMatrix._prepared), and new factors give new chunks (never modified)
    kept = getattr(suffix, "_kcprnn_inner", None)
    if kept is None or kept[0] is not prefix:
        kept = (
            prefix,
            suffix.permute(2, 0, 1).reshape(c, k * o).contiguous(),  # (c, k o)
            prefix.t().contiguous(),
        )  # (a k, m)
        suffix._kcprnn_inner = kept
    st, pt = kept[1], kept[2]
    out = z.new_empty(z.shape[0], walk.out_features)  # (b, j)
    return _native.inner_rows(
        z, st, k, pt, out, offsets, runs, None if bias is None else bias.contiguous()
    )  # (b, j)


@lru_cache(maxsize=64)
def _inner_offsets(
    walk: _Walk, o: int, m: int, width: int
) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """Where output ``(e, o, m)`` of a row of the walk's last step (an inner product with
    ``o`` suffix and ``m`` prefix outputs) lands in the final layout: ``(off_e, off_o, off_m)``,
    whose sum is the flat output index (each is a product of whole axes, so the final
    permutation splits), and whether ``off_m`` is contiguous within every vector of ``width``.
    The torch path lays a row out ``(e, o, m)`` for a narrow suffix, else ``(e, m, o)``."""
    sizes = tuple(s for _, s in walk.steps[-1].axes)
    total = math.prod(sizes)
    e = total // (o * m)
    with torch.inference_mode(False):
        pos = (
            _final_index(sizes, walk.final, torch.device("cpu"), True)
            if walk.final
            else torch.arange(total)
        )  # (j,): output index of each number of the row
        cube = pos.view(e, o, m) if o < NARROW else pos.view(e, m, o).transpose(1, 2)
        off_e, off_o, off_m = cube[:, 0, 0], cube[0, :, 0], cube[0, 0, :]  # (e,), (o,), (m,)
        if not torch.equal(cube, off_e[:, None, None] + off_o[None, :, None] + off_m):
            raise AssertionError("the final reordering does not split over (e, o, m)")
        lane = torch.arange(m) % width
        runs = bool(torch.equal(off_m - off_m[torch.arange(m) - lane], lane))
        return (off_e.contiguous(), off_o.contiguous(), off_m.contiguous()), runs


def _native_gather(z: Tensor, reuse: bool) -> Tensor:
    """The permuted view ``z`` copied contiguous by the compiled gather where it runs (float32
    on CPU), into scratch buffer 0 where ``reuse`` and one is kept, else into fresh memory; on
    torch otherwise (lazily where not ``reuse``, as :func:`_reuse_copy`)."""
    if not (z.dtype == torch.float32 and z.device.type == "cpu" and _native.available()):
        return _reuse_copy(z, 0) if reuse else z
    buf = _ops.scratch(0, tuple(z.shape), z) if reuse else None
    if buf is None:
        buf = torch.empty(z.shape, dtype=z.dtype)
    return _native.gather(z, buf)


def _reuse_copy(z: Tensor, slot: int) -> Tensor:
    """``z`` copied into scratch buffer ``slot`` (:func:`~kcprnn.formats._ops.scratch`), or
    ``z`` itself (copied lazily by the next reshape) where no buffer is kept."""
    buf = _ops.scratch(slot, tuple(z.shape), z)
    return z if buf is None else buf.copy_(z)


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for t, q in enumerate(perm):
        inv[q] = t
    return inv


def _walk_backward(
    grad: Tensor,
    mats: Sequence[Any],
    walk: _Walk,
    saved: Sequence[Any],
    need_x: bool,
    need: Sequence[bool],
) -> tuple[Tensor | None, list]:
    """Gradients of :func:`_run_walk` (no ``pbatched`` step) for the output gradient ``grad``
    ``(b, j)``: ``(grad_x or None, per-step gradients of mats)`` (``None`` where ``need`` is
    false, a pair for the inner product)."""
    b = grad.shape[0]
    steps = walk.steps
    g = grad
    last = [s for _, s in steps[-1].axes]
    if walk.gathers:
        g = torch.index_select(g, 1, _final_index(tuple(last), walk.final, g.device, True))
    elif walk.final:
        g = g.reshape(b, *[last[q] for q in walk.final]).permute(
            0, *[q + 1 for q in _inverse(walk.final)]
        )  # (b, *last axes)
    grads: list[Any] = [None] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        step, mat, kept = steps[t], mats[t], saved[t]
        wanted = t > 0 or need_x
        rows = b * step.pre
        if isinstance(mat, tuple):
            suffix, prefix = mat
            zin = kept[0]
            k, o, c = suffix.shape
            if prefix is None:
                gz = g.reshape(rows, 1, o).expand(rows, k, o).reshape(rows, k * o)  # (b e, k o)
                g_prefix = None
            else:
                m, ak = prefix.shape
                if len(kept) == 3:  # narrow: y (b e o, m) = zt @ prefix.T
                    gy = g.reshape(rows * o, m)  # (b e o, m)
                    g_prefix = weight_grad(gy, kept[2]) if need[t] else None  # (m, a k)
                    gz = (
                        gy.mm(prefix).reshape(rows, o, ak).transpose(1, 2).reshape(-1, k * o)
                    )  # (b e a, k o)
                else:  # wide: y (b e, m, o) = prefix @ z
                    gy = g.reshape(rows, m, o)  # (b e, m, o)
                    zz = kept[1].reshape(rows, ak, o)  # (b e, a k, o)
                    g_prefix = torch.einsum("nmo,nko->mk", gy, zz) if need[t] else None  # (m, a k)
                    gz = torch.matmul(prefix.t(), gy).reshape(-1, k * o)  # (b e a, k o)
            flat_in = zin.reshape(-1, c)  # (b e a, c)
            g_suffix = weight_grad(gz, flat_in).reshape(k, o, c) if need[t] else None  # (k, o, c)
            grads[t] = (g_suffix, g_prefix)
            g_in = gz.mm(suffix.reshape(k * o, c)) if wanted else None  # (b e a, c)
        elif step.post == 1:
            g2 = g.reshape(rows, step.g)  # (b e, g)
            grads[t] = weight_grad(g2, kept) if need[t] else None  # (g, f)
            g_in = g2.mm(mat) if wanted else None  # (b e, f)
        else:
            g3 = g.reshape(rows, step.g, step.post)  # (b e, g, post)
            grads[t] = torch.einsum("ngq,nfq->gf", g3, kept) if need[t] else None  # (g, f)
            g_in = torch.matmul(mat.t(), g3) if wanted else None  # (b e, f, post)
        if not wanted:
            break
        before = steps[t - 1].axes if t > 0 else walk.in_axes
        sizes = [s for _, s in before]
        if step.gather == "swaps":
            g = g_in
            for pre, m, k_, post in reversed(step.swaps):
                g = g.reshape(b * pre, k_, m, post).transpose(1, 2)  # (b pre, m, k, post)
        elif step.gather in ("permute", "native"):
            moved = [sizes[q] for q in step.perm]
            g = g_in.reshape(b, *moved).permute(0, *[q + 1 for q in _inverse(step.perm)])
        else:
            g = g_in
    grad_x = g.reshape(b, -1) if need_x else None  # (b, i)
    return grad_x, grads


class _SequentialProduct(torch.autograd.Function):
    """:func:`_run_walk` as one autograd node with :func:`_walk_backward` (first order)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, walk: _Walk, *flat: Tensor | None) -> Tensor:
        mats = _unflatten_matrices(walk, flat)
        saved: list = []
        out = _run_walk(x, mats, walk, bias, saved)
        ctx.walk, ctx.mats, ctx.saved_steps = walk, mats, saved
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        walk, mats = ctx.walk, ctx.mats
        needs = ctx.needs_input_grad
        need = []
        q = 3
        for m in mats:
            width = 2 if isinstance(m, tuple) else 1
            need.append(any(needs[q : q + width]))
            q += width
        grad = grad.contiguous()
        grad_x, grads = _walk_backward(grad, mats, walk, ctx.saved_steps, needs[0], need)
        flat: list[Tensor | None] = []
        for m, gm in zip(mats, grads, strict=True):
            if isinstance(m, tuple):
                pair = gm if gm is not None else (None, None)
                flat += [pair[0], pair[1] if m[1] is not None else None]
            else:
                flat.append(gm)
        grad_bias = grad.sum(0) if ctx.has_bias and needs[1] else None  # (j,)
        return (grad_x, grad_bias, None, *flat)


def _unflatten_matrices(walk: _Walk, flat: Sequence[Tensor | None]) -> list[Any]:
    """Inverse of flattening :func:`_run_walk`'s matrices: one per step, the last one a
    ``(suffix, prefix)`` pair when there is one entry more than steps (an inner product)."""
    num = len(walk.steps)
    if len(flat) == num + 1:
        return [*flat[: num - 1], (flat[num - 1], flat[num])]
    return list(flat)


# --- module ---


@register("kcp")
class KCPMatrix(FactorizedMatrix):
    r"""A weight matrix in Kronecker CP form (Wang et al., TNNLS 2023), KCP.md §2.

    .. math::
        W[j, i] = \sum_{p=1}^{P} \prod_{n=1}^{N} \sum_{r=1}^{R_n} \prod_{d=1}^{D}
                  \mathrm{factors}[n][d][p, r, j_d^{(n)}, i_d^{(n)}]

    ``i`` is the row-major flattening of ``(i_1^(1), ..., i_1^(N), i_2^(1), ..., i_D^(N))``
    (mode-major, factor-minor), and ``j`` likewise: ``x.reshape(B, I_1^(1), ..., I_D^(N))`` is
    the input tensor. For a fixed term ``p`` each Kronecker factor ``n`` is a rank-``R_n`` CP
    tensor over the ``D`` merged modes; within a mode, factor 1 is the most significant index.

    Args:
        in_features: ``Π_d I_d``.
        out_features: ``Π_d J_d``.
        in_modes: ``D`` mode sizes (each split into ``num_factors`` balanced factors), or a nested
            list of ``D`` lists of the ``N`` factor sizes ``I_d^(1), ..., I_d^(N)``.
        out_modes: as ``in_modes``, for the output.
        num_modes: ``D`` when no mode list is given.
        num_factors: ``N`` (default 2); implied by nested mode lists.
        terms: ``P``, the number of Kronecker (KT) terms.
        rank: the CP rank ``R_n`` of every factor, an int or a list of ``N`` ints.
        algorithm: ``"auto"`` (default, cost model :func:`kcp_plan`), ``"sequential"``,
            ``"parallel"`` or ``"dense"`` (reconstruct ``W``, then ``F.linear``).
        device, dtype: factory arguments, as in ``torch.nn``.

    Attributes:
        factors: ``factors[n][d]`` is the parameter of shape ``(P, R_n, J_d^(n), I_d^(n))``.
        in_splits, out_splits: ``D x N`` tuples of factor sizes.
        ranks: ``(R_1, ..., R_N)``.
        terms: ``P``.
        num_factors: ``N``.

    Example:
        >>> w = KCPMatrix(57600, 1024, in_modes=[[2, 4], [4, 5], [4, 5], [3, 6]],
        ...               out_modes=[[4, 4], [2, 2], [2, 2], [2, 2]])
        >>> w.num_params
        78
        >>> w(torch.randn(3, 57600)).shape
        torch.Size([3, 1024])
    """

    algorithms = ("auto", "sequential", "parallel", "dense")
    default_algorithm = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | Sequence[Sequence[int]] | None = None,
        out_modes: Sequence[int] | Sequence[Sequence[int]] | None = None,
        num_modes: int | None = None,
        num_factors: int | None = None,
        terms: int = 1,
        rank: int | Sequence[int] = 1,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_splits, out_splits, num_n = resolve_kcp_splits(
            in_features, out_features, in_modes, out_modes, num_factors
        )
        flat_in = [math.prod(s) for s in in_splits] if in_splits is not None else in_modes
        flat_out = [math.prod(s) for s in out_splits] if out_splits is not None else out_modes
        super().__init__(
            in_features,
            out_features,
            in_modes=flat_in,
            out_modes=flat_out,
            num_modes=num_modes,
            algorithm=algorithm,
            device=device,
            dtype=dtype,
        )
        self.terms = validate_positive_int(terms, "terms")
        self.num_factors = num_n
        self.ranks = validate_kcp_ranks(rank, num_n)
        self.in_splits: Splits = tuple(
            map(tuple, in_splits or [balanced_factors(m, num_n) for m in self.in_modes])
        )
        self.out_splits: Splits = tuple(
            map(tuple, out_splits or [balanced_factors(m, num_n) for m in self.out_modes])
        )
        self.factors = nn.ModuleList(
            nn.ParameterList(
                nn.Parameter(torch.empty(self.terms, r, j[n], i[n], **self.factory_kwargs))
                for i, j in zip(self.in_splits, self.out_splits, strict=False)
            )
            for n, r in enumerate(self.ranks)
        )
        self._cache: tuple[tuple, Any] | None = None  # see _prepared
        self._plans: dict[tuple, KCPPlan] = {}  # see plan
        self.reset_parameters()

    def _factor_list(self) -> list[list[Tensor]]:
        # the ParameterLists' own storage: iterating them is ~10 us per call
        return [list(f._parameters.values()) for f in self.factors._modules.values()]

    def plan(self, rows: int, training: bool | None = None) -> KCPPlan:
        """The plan ``forward`` runs on ``rows`` rows with the current algorithm; ``training``
        (default: whether autograd will differentiate the factors now) prices the backward too."""
        algorithm = "auto" if self.algorithm == "dense" else self.algorithm
        if training is None:
            training = torch.is_grad_enabled() and self._factor_list()[0][0].requires_grad
        prepared = not training and not torch.is_grad_enabled()  # see _prepared
        key = (rows, algorithm, training, prepared)
        plan = self._plans.get(key)
        if plan is None:
            plan = kcp_plan(
                rows,
                self.in_splits,
                self.out_splits,
                self.ranks,
                self.terms,
                algorithm,
                training,
                prepared,
            )
            if len(self._plans) < 64:  # row counts seen (the shapes never change)
                self._plans[key] = plan
        return plan

    def matmul(self, x: Tensor) -> Tensor:
        plan = self.plan(x.shape[0])
        if plan.algorithm == "parallel":
            factors = self._factor_list()
            return kcp_linear_parallel(
                x, factors, plan.split, self._prepared(plan, factors)
            )  # (b, j)
        return self._sequential(plan, x, None)  # (b, j)

    def matmul_bias(self, x: Tensor, bias: Tensor) -> Tensor:
        plan = self.plan(x.shape[0])
        if plan.algorithm == "parallel":
            return torch.add(self.matmul(x), bias)  # (b, j)
        return self._sequential(plan, x, bias)  # (b, j)

    def _sequential(self, plan: KCPPlan, x: Tensor, bias: Tensor | None) -> Tensor:
        factors = self._factor_list()
        if self.num_factors == 1:
            return kcp_linear_sequential(
                x, factors, plan.order, plan.inner, self._prepared(plan, factors), bias
            )  # (b, j)
        walk = _sequential_setup(
            self.in_splits, self.out_splits, self.terms, plan.order, plan.inner, plan.inner_order
        )
        mats = self._prepared(plan, factors, walk)
        if mats is None:
            dense = kcp_sequential_prepare(factors, plan.order, plan.inner, plan.inner_order)
            mats = _walk_matrices(dense, walk.steps)
        return _sequential_run(x, mats, walk, bias)  # (b, j)

    def _prepared(
        self, plan: KCPPlan, factors: list[list[Tensor]], walk: _Walk | None = None
    ) -> Any:
        """The small matrices ``plan`` builds from the factors (laid out for ``walk``'s steps
        when given), kept between calls while autograd is off (inference) and the factors are
        unchanged (same tensors, same version counters: an optimizer step, ``load_state_dict``
        or ``.to()`` rebuilds them); ``None`` otherwise. Skips about ten small kernels per call
        (UCF11 blocked layout: 0.62 -> 0.54 ms)."""
        if torch.is_grad_enabled():
            return None
        params = [p for f in factors for p in f]
        key = (
            plan.algorithm,
            plan.split,
            plan.order,
            plan.inner,
            plan.inner_order,
            walk is not None,
            torch.is_inference_mode_enabled(),
            tuple([(id(p), p.data_ptr(), p._version) for p in params]),
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if plan.algorithm == "parallel":
            built: Any = kcp_parallel_prepare(factors, plan.split)
        else:
            built = kcp_sequential_prepare(factors, plan.order, plan.inner, plan.inner_order)
            if walk is not None:
                built = _walk_matrices(built, walk.steps)
        self._cache = (key, built)
        return built

    def to_dense(self) -> Tensor:
        return kcp_to_dense(self._factor_list())

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        return kcp_plan_flops(self.plan(rows, training=training))

    def reconstruction_macs(self) -> int:
        return kcp_reconstruction_flops(self.in_splits, self.out_splits, self.ranks, self.terms)

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> KCPMatrix:
        """:func:`kcp_from_dense` of ``weight`` ``(out_features, in_features)``; the other
        options are the constructor's (modes, ``terms``, ``rank``, ...)."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        factors = kcp_from_dense(
            weight.detach(), out.in_splits, out.out_splits, out.ranks, out.terms
        )
        with torch.no_grad():
            for mine, new in zip(out.factors, factors, strict=True):
                for p, u in zip(mine, new, strict=True):
                    p.copy_(u)
        return out

    def reset_parameters(self, std: float | None = None) -> None:
        # Var(W[j, i]) = P * prod_n R_n * sigma^(2 D N) for i.i.d. zero-mean entries of variance
        # sigma^2 (KCP.md §2). Entries are +-sigma with random signs: a product of D*N of them has
        # the fixed magnitude sigma^(D N), so the second moment of the reconstruction is exact for
        # P * prod R_n = 1 and a sum of few equal-magnitude terms otherwise (products of normals
        # would be heavy-tailed and make the realized std of W erratic).
        std = self.default_std() if std is None else std
        if not std > 0:
            raise ValueError(f"std must be positive, got std={std}")
        count = self.terms * math.prod(self.ranks)
        exponent = len(self.in_splits) * self.num_factors
        sigma = (std**2 / count) ** (1.0 / (2 * exponent))
        with torch.no_grad():
            for factor in self.factors:
                for p in factor:
                    p.copy_(torch.randint_like(p, 2) * (2 * sigma) - sigma)

    def format_repr_items(self) -> list[str]:
        return [
            f"in_splits={[list(s) for s in self.in_splits]}",
            f"out_splits={[list(s) for s in self.out_splits]}",
            f"ranks={list(self.ranks)}",
            f"terms={self.terms}",
            f"num_factors={self.num_factors}",
        ]
