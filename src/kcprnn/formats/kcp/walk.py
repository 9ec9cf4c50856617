"""The sequential product's walk: which copies bring each factor's axes together, priced by a
cost model. Plain data in, plain data out (no tensors): shared by the planner (:mod:`.plan`)
and the product (:mod:`.sequential`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from ..._cpu.cost import CostModel
from .algebra import Splits
from .layout import (
    Axis,
    AxisKind,
    GatherMode,
    SeqStep,
    Swap,
    Walk,
    final_gathers,
    inner_out_modes,
    input_axes,
    run_of,
    swaps_to_end,
)

__all__ = [
    "WalkSteps",
    "chunk_rows",
    "final_cost",
    "permute_cost",
    "sequential_setup",
    "sequential_walk",
    "swap_cost",
]


class WalkSteps(NamedTuple):
    """:func:`sequential_walk`'s result."""

    steps: tuple[SeqStep, ...]
    final: tuple[int, ...]  # the final permutation of the output axes (empty: none)
    copy_cost: float  # the modelled cost per row of all gathering copies


def swap_cost(swaps: Sequence[Swap], model: CostModel) -> float:
    """Per row, in MAC equivalents: every stage copies everything once; short runs cost more."""
    return sum(
        pre * m * k * post * (model.swap + model.swap_run / post) for pre, m, k, post in swaps
    )


def permute_cost(sizes: Sequence[int], perm: Sequence[int], model: CostModel) -> float:
    """Per row: one permute copy whose contiguous run is the trailing axes it leaves in place."""
    return math.prod(sizes) * model.permute * (0.5 + 3.0 / run_of(sizes, perm))


def final_cost(sizes: Sequence[int], perm: Sequence[int], model: CostModel) -> float:
    """Per row: the final reordering of the output axes (:func:`~.layout.final_gathers`)."""
    if final_gathers(sizes, perm, model.final_gather_run):
        return math.prod(sizes) * model.gather_index
    return permute_cost(sizes, perm, model)


class _Gather(NamedTuple):
    gather: GatherMode
    swaps: tuple[Swap, ...]
    perm: tuple[int, ...]
    pre: int
    f: int
    post: int


def _gather(
    axes: Sequence[Axis], group: Sequence[Axis], g: int, model: CostModel
) -> tuple[_Gather, float]:
    """The cheapest way to bring ``group`` together for a GEMM with ``g`` outputs, and its cost
    per row. The group keeps its relative order (the factor's matrix follows it). A block with
    trailing axes (``post > 1``) runs as batched GEMMs whose width is ``post``, charged
    ``narrow_penalty / post`` per MAC on top; moving it to the end first is often cheaper. The
    compiled gather is an option where ``model.kernels`` (it runs float32 on CPU; torch's
    permute copy elsewhere, or where the kernel cannot be built)."""
    sizes = [a.size for a in axes]
    flags = [a in group for a in axes]
    pos = [t for t, flag in enumerate(flags) if flag]
    f = math.prod(sizes[t] for t in pos)
    if not pos:  # a factor whose input sizes are all 1 multiplies every element
        return _Gather(GatherMode.NONE, (), (), math.prod(sizes), 1, 1), 0.0
    rest = math.prod(sizes) // f
    options: list[tuple[float, _Gather]] = []
    if pos == list(range(pos[0], pos[-1] + 1)):
        pre, post = math.prod(sizes[: pos[0]]), math.prod(sizes[pos[-1] + 1 :])
        batched = model.narrow_penalty * pre * f * g if post > 1 else 0.0
        options.append((batched, _Gather(GatherMode.NONE, (), (), pre, f, post)))
    to_end = tuple(swaps_to_end(sizes, flags))
    to_front = tuple(swaps_to_end(sizes, [not flag for flag in flags]))
    perm = tuple([t for t in range(len(axes)) if not flags[t]] + pos)
    options += [
        (swap_cost(to_end, model), _Gather(GatherMode.SWAPS, to_end, (), rest, f, 1)),
        (
            swap_cost(to_front, model) + (model.narrow_penalty * f * g if rest > 1 else 0.0),
            _Gather(GatherMode.SWAPS, to_front, (), 1, f, rest),
        ),
        (permute_cost(sizes, perm, model), _Gather(GatherMode.PERMUTE, (), perm, rest, f, 1)),
    ]
    if model.kernels:
        native = math.prod(sizes) * (
            model.native_gather + model.native_gather_run / run_of(sizes, perm)
        )
        options.append((native, _Gather(GatherMode.NATIVE, (), perm, rest, f, 1)))
    cost, best = min(options, key=lambda o: o[0])
    return best, cost


@lru_cache(maxsize=1024)
def sequential_walk(
    in_splits: Splits,
    out_splits: Splits,
    terms: int,
    order: tuple[int, ...],
    model: CostModel,
    last_out: tuple[int, ...] = (),
) -> WalkSteps:
    """The steps of the sequential product for ``N >= 2``: each factor's gathering and GEMM
    sizes per row, the final permute of the output axes and the modelled cost per row of all
    gathering copies. ``last_out`` orders the last factor's output modes (default ``0..D-1``;
    an inner CP product lays them out in its own order, :func:`~.layout.inner_out_modes`)."""
    num_d, num_n = len(in_splits), len(in_splits[0])
    axes: list[Axis] = list(input_axes(in_splits))
    p_axis = Axis(AxisKind.TERM, terms)
    steps: list[SeqStep] = []
    copy_cost = 0.0
    for t, n in enumerate(order):
        own = [a for a in axes if a.kind is AxisKind.INPUT and a.factor == n]
        modes = last_out if last_out and t == len(order) - 1 else range(num_d)
        new = tuple(
            Axis(AxisKind.OUTPUT, out_splits[d][n], d, n) for d in modes if out_splits[d][n] > 1
        )
        g = math.prod(out_splits[d][n] for d in range(num_d))
        has_p = p_axis in axes
        if has_p and t < len(order) - 1:  # P > 1 between the first and the last factor
            rest = [a for a in axes if a != p_axis and a not in own]
            sizes = [a.size for a in axes]
            perm = tuple([axes.index(p_axis)] + [axes.index(a) for a in rest + own])
            moved = (perm[0] + 1, 0, *[q + 1 for q in perm[1:]])  # (p, b, rest, own)
            copy_cost += (
                permute_cost([1, *sizes], moved, model)
                + math.prod(a.size for a in rest) * g * terms * model.permute
            )  # and back to (b, p, ...)
            axes = [p_axis, *rest, *new]
            steps.append(
                SeqStep(
                    n,
                    GatherMode.PBATCHED,
                    tuple(own),
                    perm=perm,
                    pre=math.prod(a.size for a in rest),
                    f=math.prod(a.size for a in own),
                    g=g,
                    axes=tuple(axes),
                )
            )
            continue
        group = ([p_axis] if has_p else []) + own  # the last factor sums over p in its GEMM
        group = [a for a in axes if a in group]  # in layout order
        out = ((p_axis,) if terms > 1 and t == 0 else ()) + new
        g_out = g * (terms if t == 0 else 1)
        how, cost = _gather(axes, group, g_out, model)
        copy_cost += cost
        rest = [a for a in axes if a not in group]
        if how.gather is GatherMode.NONE and group:
            first = axes.index(group[0])
            before = [a for a in axes[:first] if a not in group]
            after = [a for a in axes[first:] if a not in group]
            if how.post == 1:
                before, after = before + after, []
        elif how.post == 1:  # gathered at the end, or no input axes at all
            before, after = rest, []
        else:  # gathered at the front
            before, after = [], rest
        axes = [*before, *out, *after]
        steps.append(
            SeqStep(
                n,
                how.gather,
                tuple(group),
                how.swaps,
                how.perm,
                how.pre,
                how.f,
                how.post,
                g_out,
                tuple(axes),
            )
        )
    target = [
        Axis(AxisKind.OUTPUT, out_splits[d][n], d, n)
        for d in range(num_d)
        for n in range(num_n)
        if out_splits[d][n] > 1
    ]
    final = tuple(axes.index(a) for a in target)
    if final == tuple(range(len(final))):
        final = ()
    else:
        copy_cost += final_cost([a.size for a in axes], final, model)
    return WalkSteps(tuple(steps), final, copy_cost)


@lru_cache(maxsize=256)
def sequential_setup(
    in_splits: Splits,
    out_splits: Splits,
    terms: int,
    order: tuple[int, ...],
    inner: int | None,
    inner_order: tuple[int, ...],
    model: CostModel,
) -> Walk:
    """The checked walk of the sequential product (cached per shape, plan and model)."""
    num_d = len(in_splits)
    n_last = order[-1]
    if inner_order:
        kept = [d for d in inner_order if in_splits[d][n_last] > 1]
        if sorted(inner_order) != list(range(num_d)) or kept != sorted(kept):
            raise ValueError(
                f"inner_order must be a permutation of range({num_d}) that keeps the modes "
                f"with more than one input index in order, got inner_order={list(inner_order)}"
            )
    last_out: tuple[int, ...] = ()
    if inner is not None and 0 <= inner < num_d:
        last_out = inner_out_modes(
            [in_splits[d][n_last] for d in range(num_d)],
            [out_splits[d][n_last] for d in range(num_d)],
            inner_order,
            inner,
            model.narrow,
        )
    steps, final, _ = sequential_walk(in_splits, out_splits, terms, order, model, last_out)
    if inner is not None and not (terms == 1 and 0 <= inner < num_d and steps[-1].post == 1):
        raise ValueError(
            f"inner={inner} needs one Kronecker term (terms={terms}), a mode index in "
            f"[0, {num_d}) and a last factor gathered at the end of the rows"
        )
    gathers = bool(final) and final_gathers(
        [a.size for a in steps[-1].axes], final, model.final_gather_run
    )
    return Walk(
        steps,
        final,
        input_axes(in_splits),
        math.prod(map(math.prod, out_splits)),
        terms,
        gathers,
        inner is not None,
        model,
    )


def chunk_rows(rows: int, in_features: int, steps: Sequence[SeqStep], model: CostModel) -> int:
    """Rows per chunk of the sequential product: all of them, unless the first step copies an
    input of more than ``model.gather_chunk`` elements; then chunks of about that size, whose
    copies stay in cache and are reused by the allocator instead of being mapped fresh."""
    copies = (GatherMode.SWAPS, GatherMode.PERMUTE, GatherMode.NATIVE)
    if steps[0].gather in copies and rows * in_features > model.gather_chunk:
        return max(1, model.gather_chunk // in_features)
    return rows
