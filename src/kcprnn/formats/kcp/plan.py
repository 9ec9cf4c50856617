"""KCP's planner: the modelled cost of every way to run the product, and the cheapest one.

All costs are in multiply-accumulate equivalents and every weight comes from a
:class:`~kcprnn._cpu.cost.CostModel`. ``cost = MACs + (build - 1) * (elements built for the
small matrices) + io * (elements read and written by the GEMMs) + permute * (elements moved by
copies) + row * (GEMM rows) + kernel * (op launches)`` (``kernel_prepared`` under ``no_grad``),
less what tall GEMMs save on the compiled kernel or oneDNN where the model plans for them.
Planning never builds the compiled kernels: whether they are planned for is
``CostModel.kernels``, so plans and MAC counts do not depend on whether a compiler exists.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

from ..._cpu.cost import CostModel, default_cost_model
from ..._cpu.ops import native_covers, onednn_covers
from .algebra import Splits
from .layout import GatherMode, KCPPlan, SeqStep, inner_orders, inner_out_modes
from .walk import chunk_rows, sequential_walk

__all__ = [
    "kcp_cost",
    "kcp_plan",
    "kcp_plan_flops",
    "kcp_plan_macs",
    "parallel_plan",
    "sequential_plan",
    "tall_saving",
    "training_cost",
]


def _kernel_cost(prepared: bool, model: CostModel) -> float:
    """The modelled cost of one op launch: less under ``no_grad`` (no autograd node)."""
    return model.kernel_prepared if prepared else model.kernel


def tall_saving(rows: int, f: int, outs: int, macs: int, model: CostModel) -> float:
    """MAC equivalents saved when a tall GEMM of ``rows`` rows, ``f`` inputs and ``outs``
    outputs runs on the compiled kernel or oneDNN (:func:`~kcprnn._cpu.ops.tall_linear`)
    instead of MKL: a share of its whole modelled cost (MACs, elements read and written, rows)
    for the kernel, of its MACs for oneDNN."""
    if native_covers(rows, f, outs, model):
        gain = model.native_gain if outs <= model.native_max_out // 2 else model.native_gain_wide
        return (1.0 - gain) * (macs + model.io * rows * (f + outs) + model.row * rows)
    if onednn_covers(rows, f, outs, model):
        return (1.0 - model.onednn_gain) * macs
    return 0.0


def parallel_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    split: int,
    model: CostModel,
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
    if split and o >= model.narrow:
        gemm_rows += rows * m
    elif split:
        gemm_rows += rows * o
        moved = mid + (0 if inner else rows * m * o)
    # z and its transpose, where mapped fresh
    faults = sum(t for t in (mid, mid if moved else 0) if t > model.big_elements)
    saved = tall_saving(rows * a, c, k * o, rows * a * c * k * o, model)
    if prepared:
        kernels -= 2 * len(ins)
    cost = (
        macs
        - saved
        + (-1 if prepared else model.build - 1) * build
        + model.io * io
        + model.permute * moved
        + model.fault * faults
        + model.row * gemm_rows
        + _kernel_cost(prepared, model) * kernels
    )
    return KCPPlan(
        "parallel",
        split=split,
        macs=macs,
        cost=cost,
        peak=max(mid, rows * a * c),
        kernel_saving=saved,
    )


def sequential_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    order: tuple[int, ...],
    model: CostModel,
    prepared: bool = False,
) -> KCPPlan:
    """The sequential product with the factors applied in ``order`` (and, for ``P = 1``, its
    last factor as its own CP product where that is cheaper, :func:`_inner_last`)."""
    num_d = len(in_splits)
    fi = [math.prod(in_splits[d][n] for d in range(num_d)) for n in range(len(ranks))]
    fo = [math.prod(out_splits[d][n] for d in range(num_d)) for n in range(len(ranks))]
    build = sum(terms * r * fi[n] * fo[n] for n, r in enumerate(ranks))
    size = rows * math.prod(fi)
    macs, io, gemm_rows, peak, copies, saved = build, 0.0, 0, size, 0.0, 0.0
    steps: tuple[SeqStep, ...] = ()
    if len(ranks) == 1:  # N == 1: the p-sum of the small matrix, then one GEMM
        macs += terms * fi[0] * fo[0] + size * fo[0]
        io, gemm_rows, kernels = size + rows * fo[0], rows, 2 * num_d + 3
    else:
        steps, final, copies = sequential_walk(in_splits, out_splits, terms, order, model)
        chunks = math.ceil(rows / chunk_rows(rows, math.prod(fi), steps, model)) if rows else 1
        kernels = 0
        for step in steps:
            batch = terms if step.gather is GatherMode.PBATCHED else 1
            new = rows * batch * step.pre * step.g * step.post
            step_macs = rows * batch * step.pre * step.f * step.g * step.post
            macs += step_macs
            if batch == 1 and step.post == 1:
                saved += tall_saving(
                    math.ceil(rows / chunks) * step.pre, step.f, step.g, step_macs, model
                )
            io += size + new
            gemm_rows += rows * batch * step.pre * (1 if step.post == 1 else step.g)
            copied = len(step.swaps) + (
                step.gather in (GatherMode.PERMUTE, GatherMode.NATIVE, GatherMode.PBATCHED)
            )
            if chunks == 1 and size > model.big_elements:  # fresh pages for each copy
                io += model.fault / model.io * size * copied
            if new > model.big_elements:
                io += model.fault / model.io * new
            kernels += 2 + copied
            size = new
            peak = max(peak, size)
        kernels = 2 * num_d * len(ranks) + chunks * (kernels + bool(final)) + 1
    if prepared:
        kernels -= 2 * num_d * len(ranks)
    cost = (
        macs
        - saved
        + (-1 if prepared else model.build - 1) * build
        + model.io * io
        + rows * copies
        + model.row * gemm_rows
        + _kernel_cost(prepared, model) * kernels
    )
    plan = KCPPlan("sequential", order=order, macs=macs, cost=cost, peak=peak, kernel_saving=saved)
    if len(ranks) > 1 and terms == 1:
        plan = _inner_last(
            plan, rows, in_splits, out_splits, ranks, steps[-1], copies, model, prepared
        )
    return plan


def _inner_last(
    plan: KCPPlan,
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    step: SeqStep,
    copies: float,
    model: CostModel,
    prepared: bool = False,
) -> KCPPlan:
    """``plan`` with its last factor applied as its own CP product (the parallel product with
    ``N = 1`` on the gathered rows) when the model finds that cheaper than building the
    factor's dense ``(J^(n), I^(n))`` matrix and multiplying by it; ``P = 1`` only. Every cut and
    mode order of :func:`~.layout.inner_orders` is priced, with the final permute its output
    layout needs (``copies``: the gathering cost per row of ``plan``'s walk)."""
    if step.gather is GatherMode.PBATCHED or step.post != 1:
        return plan
    n, num_d = step.factor, len(in_splits)
    m = rows * step.pre
    build = ranks[n] * step.f * step.g
    dense_saving = tall_saving(m, step.f, step.g, m * step.f * step.g, model)  # in plan.cost
    dense = (
        (0 if prepared else model.build * build)
        + m * step.f * step.g
        - dense_saving
        + model.io * m * (step.f + step.g)
        + model.row * m
        + _kernel_cost(prepared, model) * (2 if prepared else 2 * num_d + 2)
    )
    ins = [in_splits[d][n] for d in range(num_d)]
    outs = [out_splits[d][n] for d in range(num_d)]
    best: tuple[float, KCPPlan, tuple[int, ...]] | None = None
    for order, split in inner_orders(ins):
        modes = order or tuple(range(num_d))
        alt = parallel_plan(
            m,
            tuple((ins[d],) for d in modes),
            tuple((outs[d],) for d in modes),
            (ranks[n],),
            1,
            split,
            model,
            inner=True,
            prepared=prepared,
        )
        last_out = inner_out_modes(ins, outs, order, split, model.narrow)
        walked = sequential_walk(in_splits, out_splits, 1, plan.order, model, last_out).copy_cost
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
    cost_model: CostModel | None = None,
) -> KCPPlan:
    """The cheapest plan of ``algorithm`` (``"parallel"`` or ``"sequential"``) on ``rows`` rows,
    priced by ``cost_model`` (default :func:`~kcprnn._cpu.cost.default_cost_model`).

    The plan also reports ``peak``, its largest intermediate. For ``parallel`` every cut point is
    tried, for ``sequential`` every factor order (up to 4 factors; beyond, the factors that shrink
    the data most go first). ``prepared``: the small matrices are built once and kept (the
    module's inference cache), so building them is not priced. Results are cached per shape
    and model.
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
        default_cost_model() if cost_model is None else cost_model,
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
    model: CostModel,
) -> KCPPlan:
    if algorithm == "parallel":
        plans = [
            parallel_plan(rows, in_splits, out_splits, ranks, terms, s, model, prepared=prepared)
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
            sequential_plan(rows, in_splits, out_splits, ranks, terms, o, model, prepared)
            for o in orders
        ]
    return min(plans, key=lambda plan: plan.cost)


def training_cost(plan: KCPPlan, model: CostModel) -> float:
    """Forward plus backward cost of ``plan`` when the factors need gradients: the backward is
    ``model.backward_ratio(algorithm)`` times the forward, priced without the forward's kernel
    saving (the weight gradients run on MKL or blocked products)."""
    return plan.cost + model.backward_ratio(plan.algorithm) * (plan.cost + plan.kernel_saving)


def kcp_plan(
    rows: int,
    in_splits: Splits,
    out_splits: Splits,
    ranks: Sequence[int],
    terms: int,
    algorithm: str = "auto",
    training: bool = False,
    prepared: bool = False,
    cost_model: CostModel | None = None,
) -> KCPPlan:
    """The plan ``forward`` runs: ``auto`` is the cheaper of the two by :func:`kcp_cost`.

    With ``training=True`` (gradients flow into the factors) ``auto`` compares forward plus
    backward (:func:`training_cost`): the backward of ``parallel`` repeats its GEMM over the
    input and differentiates the per-row step; the backward of ``sequential`` reuses the
    gathered input and skips the permute.

    ``prepared`` (:func:`kcp_cost`): the small matrices are kept between calls (the module's
    inference cache, under ``no_grad``).

    The choice depends on ``rows``, so the MACs of ``auto`` are affine in ``rows`` only
    piecewise, between the row counts where the choice changes.
    """
    model = default_cost_model() if cost_model is None else cost_model
    if algorithm == "auto":
        plans = [
            kcp_cost(rows, in_splits, out_splits, ranks, terms, a, prepared, model)
            for a in ("parallel", "sequential")
        ]
        if training:
            return min(plans, key=lambda plan: training_cost(plan, model))
        return min(plans, key=lambda plan: plan.cost)
    return kcp_cost(rows, in_splits, out_splits, ranks, terms, algorithm, prepared, model)


def kcp_plan_macs(plan: KCPPlan) -> int:
    """Multiply-accumulates of a plan (what ``matmul_macs`` reports)."""
    return plan.macs


kcp_plan_flops = kcp_plan_macs  # the older name: the count is of multiply-accumulates
