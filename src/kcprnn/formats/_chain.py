"""A format's product on a few rows as one chain of pairwise contractions in one autograd node.

On a few rows a format's own product (:meth:`FactorizedMatrix.matmul`) costs its operator
launches, not its arithmetic: a TT product on one row runs about 40 reshapes, permutes and
GEMMs forward and as many autograd nodes backward, for a few thousand multiply-accumulates.
Here the product is written as a chain: the input, viewed as ``(b, I_1, ..., I_D)``, absorbs
the format's tensors one at a time, each step one GEMM (or a batched GEMM over the labels the
step keeps on both sides, such as a CP rank or a BT block) after a permutation of both
operands. The compiled kernel (:mod:`kcprnn._cpu.native_chain`) runs the whole chain as one
autograd node whose backward is the chain run back (per step ``grad_A = G B^T`` and
``grad_B = A^T G``); :func:`chain_reference` runs it on torch operations, for the tests and for
second derivatives.

A format describes its chain by labels (:class:`ChainSpec`): the input modes, each tensor's
axes in the order it is absorbed, and the output modes. A label shared by the current state and
the tensor is contracted when no later tensor nor the output has it, else kept as a batch axis
of the step; every other label of either side is carried into the next state. The plan
(:func:`chain_plan`) turns the labels into permutations and GEMM shapes once per matrix.

Legend for shape comments: b rows, n batch axes of a step (the labels kept on both sides),
m the state's carried axes (``b`` among them), k contracted axes, p the tensor's carried axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._cpu.native_chain import native_chain

__all__ = [
    "ChainPlan",
    "ChainSpec",
    "MAX_SEARCH",
    "best_plan",
    "chain_forward",
    "chain_linear",
    "chain_macs",
    "chain_plan",
    "chain_reference",
    "cheapest_order",
    "greedy_order",
    "modes_spec",
]

ROWS = "b"
"""The label of the input's rows; a format's labels must not use it."""


@dataclass(frozen=True)
class ChainSpec:
    """A format's product as a chain of labelled contractions.

    Attributes:
        in_labels: labels of the input modes ``I_1, ..., I_D`` (row-major in ``in_features``).
        in_sizes: their sizes.
        operands: per tensor, in the order the chain absorbs it, the shape it is viewed as and
            the label of each axis of that view.
        out_labels: labels of the output modes ``J_1, ..., J_D`` (row-major in
            ``out_features``); their sizes come from the operands.
    """

    in_labels: tuple[str, ...]
    in_sizes: tuple[int, ...]
    operands: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]
    out_labels: tuple[str, ...]


def modes_spec(
    in_modes: Sequence[int], operands: Sequence[tuple[tuple[int, ...], tuple[str, ...]]]
) -> ChainSpec:
    """A :class:`ChainSpec` whose input modes are labelled ``i0, i1, ...`` and output modes
    ``j0, j1, ...`` (the labels the formats' operands use)."""
    d = len(in_modes)
    return ChainSpec(
        in_labels=tuple(f"i{e}" for e in range(d)),
        in_sizes=tuple(in_modes),
        operands=tuple(operands),
        out_labels=tuple(f"j{e}" for e in range(d)),
    )


@dataclass(frozen=True)
class _Step:
    view: tuple[int, ...]  # the tensor's view (its labels' sizes)
    perm_a: tuple[int, ...]  # state -> (n, m, k)
    perm_at: tuple[int, ...]  # state -> (n, k, m)
    perm_b: tuple[int, ...]  # tensor view -> (n, k, p)
    n: int
    m: int  # carried size of the state per row
    k: int
    p: int
    a_shape: tuple[int, ...]  # the permuted state with rows as -1
    b_shape: tuple[int, ...]  # the permuted tensor view
    out_shape: tuple[int, ...]  # the next state (n, m..., p...) with rows as -1


@dataclass(frozen=True)
class ChainPlan:
    """Permutations and GEMM shapes of a :class:`ChainSpec` (see :func:`chain_plan`)."""

    in_sizes: tuple[int, ...]
    steps: tuple[_Step, ...]
    out_perm: tuple[int, ...]  # last state -> (b, J_1, ..., J_D)
    out_features: int
    order: tuple[int, ...]  # the spec's operands in the chain's order
    # the kernel's layouts per row count (:func:`kcprnn._cpu.native_chain.chain_layout`)
    native: dict[int, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def macs(self, rows: int) -> int:
        """Multiply-accumulates of the chain on ``rows`` rows, forward."""
        return sum(s.n * rows * s.m * s.k * s.p for s in self.steps)


def greedy_order(spec: ChainSpec) -> tuple[int, ...]:
    """An order of ``spec``'s operands for its chain on one row: at each step the operand
    whose contraction costs the fewest multiply-accumulates (ties: the smaller next state)
    among those whose own labels are all needed later. For formats whose tensors form a tree
    (HT) rather than a line."""
    sizes = dict(zip(spec.in_labels, spec.in_sizes, strict=True))
    for view, axes in spec.operands:
        sizes.update(zip(axes, view, strict=True))
    state = set(spec.in_labels)
    left = list(range(len(spec.operands)))
    order: list[int] = []

    def after(index: int) -> set[str] | None:
        """The state after absorbing operand ``index``; ``None`` where it sums its own label."""
        labels = set(spec.operands[index][1])
        later = {lab for j in left if j != index for lab in spec.operands[j][1]}
        later |= set(spec.out_labels)
        if any(lab not in later for lab in labels - state):
            return None
        return (state - labels) | (labels - state) | (state & labels & later)

    while left:
        best: tuple[int, int, int, set[str]] | None = None
        for index in left:
            kept = after(index)
            if kept is None:
                continue
            macs = math.prod(sizes[lab] for lab in state | set(spec.operands[index][1]))
            size = math.prod(sizes[lab] for lab in kept)
            if best is None or (macs, size) < best[:2]:
                best = (macs, size, index, kept)
        if best is None:
            raise ValueError(f"no operand of the chain can come next after {order}")
        state = best[3]
        order.append(best[2])
        left.remove(best[2])
    return tuple(order)


MAX_SEARCH = 12
"""Most operands whose cheapest order :func:`cheapest_order` searches for (``2^n`` sets of
them, about 0.1 s at 12); past it :func:`best_plan` takes the cheaper of the listed and the
greedy order. Every format's chain at up to 6 modes (HT: ``2D - 1`` tensors) is searched."""


@functools.lru_cache(maxsize=256)
def cheapest_order(spec: ChainSpec) -> tuple[int, ...] | None:
    """The order of ``spec``'s operands whose chain costs the fewest multiply-accumulates on
    one row, by dynamic programming over the sets of operands absorbed so far: the state
    after absorbing a set (the labels it holds that are still needed) does not depend on the
    order within the set, so the cheapest way to each set extends the cheapest way to one of
    its subsets. ``None`` past :data:`MAX_SEARCH` operands or where no order describes the
    product."""
    n = len(spec.operands)
    if n > MAX_SEARCH:
        return None
    sizes = dict(zip(spec.in_labels, spec.in_sizes, strict=True))
    for view, axes in spec.operands:
        sizes.update(zip(axes, view, strict=True))
    names = sorted(sizes)
    bit = {label: 1 << k for k, label in enumerate(names)}

    def mask(labels: Sequence[str]) -> int:
        return functools.reduce(lambda acc, lab: acc | bit[lab], labels, 0)

    ops = [mask(axes) for _, axes in spec.operands]
    inputs, outputs = mask(spec.in_labels), mask(spec.out_labels)
    union = [0] * (1 << n)  # the labels of each set of operands
    for s in range(1, 1 << n):
        low = s & -s
        union[s] = union[s ^ low] | ops[low.bit_length() - 1]
    full = (1 << n) - 1

    def macs(labels: int) -> int:
        return math.prod(sizes[name] for k, name in enumerate(names) if labels >> k & 1)

    best: dict[int, tuple[int, tuple[int, ...]]] = {0: (0, ())}
    for s in range(full):  # every subset of a set comes before it
        if s not in best:
            continue
        cost, order = best[s]
        state = (inputs | union[s]) & (outputs | union[full ^ s])
        for o in range(n):
            if s >> o & 1:
                continue
            later = outputs | union[full ^ s ^ (1 << o)]
            if ops[o] & ~state & ~later:  # it would sum a label of its own
                continue
            t, c = s | 1 << o, cost + macs(state | ops[o])
            if t not in best or c < best[t][0]:
                best[t] = (c, (*order, o))
    found = best.get(full)
    return None if found is None else found[1]


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for k, p in enumerate(perm):
        inv[p] = k
    return tuple(inv)


def chain_plan(spec: ChainSpec, order: Sequence[int] | None = None) -> ChainPlan:
    """The permutations and GEMM shapes of ``spec``'s chain with its operands in ``order``
    (default: as listed); raises ``ValueError`` when the labels do not describe a product (a
    label summed inside one tensor, a repeated label, an output mode never produced)."""
    order = tuple(range(len(spec.operands))) if order is None else tuple(order)
    if sorted(order) != list(range(len(spec.operands))):
        raise ValueError(f"order {order} is not a permutation of the {len(spec.operands)} operands")
    spec = dataclasses.replace(spec, operands=tuple(spec.operands[i] for i in order))
    if ROWS in spec.in_labels or any(ROWS in labels for _, labels in spec.operands):
        raise ValueError(f"chain labels must not use the rows' label {ROWS!r}")
    sizes: dict[str, int] = dict(zip(spec.in_labels, spec.in_sizes, strict=True))
    state = [ROWS, *spec.in_labels]
    steps = []
    for index, (view, labels) in enumerate(spec.operands):
        if len(set(labels)) != len(labels) or len(view) != len(labels):
            raise ValueError(f"operand {index} of the chain has labels {labels} for view {view}")
        for label, size in zip(labels, view, strict=True):
            if sizes.setdefault(label, size) != size:
                raise ValueError(f"label {label!r} has sizes {sizes[label]} and {size}")
        later = {lab for _, labs in spec.operands[index + 1 :] for lab in labs}
        later |= set(spec.out_labels)
        shared = [lab for lab in state if lab in labels]
        batch = [lab for lab in shared if lab in later]
        contracted = [lab for lab in shared if lab not in later]
        carried_a = [lab for lab in state if lab not in labels]
        carried_b = [lab for lab in labels if lab not in state]
        if any(lab not in later for lab in carried_b):
            raise ValueError(f"operand {index} of the chain sums its own label(s) {carried_b}")
        order_a = batch + carried_a + contracted
        order_b = batch + contracted + carried_b
        n = math.prod(sizes[lab] for lab in batch)
        m = math.prod(sizes[lab] for lab in carried_a if lab != ROWS)
        k = math.prod(sizes[lab] for lab in contracted)
        p = math.prod(sizes[lab] for lab in carried_b)
        out = batch + carried_a + carried_b

        def shape(labs: list[str]) -> tuple[int, ...]:
            return tuple(-1 if lab == ROWS else sizes[lab] for lab in labs)

        steps.append(
            _Step(
                view=tuple(view),
                perm_a=tuple(state.index(lab) for lab in order_a),
                perm_at=tuple(state.index(lab) for lab in batch + contracted + carried_a),
                perm_b=tuple(labels.index(lab) for lab in order_b),
                n=n,
                m=m,
                k=k,
                p=p,
                a_shape=shape(order_a),
                b_shape=shape(order_b),
                out_shape=shape(out),
            )
        )
        state = out
    if sorted(state) != sorted([ROWS, *spec.out_labels]):
        raise ValueError(f"the chain ends with labels {state}, not the output {spec.out_labels}")
    out_perm = tuple(state.index(lab) for lab in (ROWS, *spec.out_labels))
    out_features = math.prod(sizes[lab] for lab in spec.out_labels)
    return ChainPlan(tuple(spec.in_sizes), tuple(steps), out_perm, out_features, order)


def best_plan(spec: ChainSpec) -> ChainPlan:
    """The plan of ``spec``'s operands as listed, in :func:`greedy_order` or in
    :func:`cheapest_order` (up to :data:`MAX_SEARCH` operands), whichever costs the fewest
    multiply-accumulates on one row, the first of them on a tie (orders of equal cost differ
    in their permuted copies, which the count does not see)."""
    orders = [None, greedy_order(spec), cheapest_order(spec)]
    plans = [chain_plan(spec, order) for k, order in enumerate(orders) if k == 0 or order]
    return min(plans, key=lambda plan: chain_macs(plan, 1))


def _gemm(a: Tensor, b: Tensor) -> Tensor:
    return torch.mm(a[0], b[0]).unsqueeze(0) if a.shape[0] == 1 else torch.bmm(a, b)


def _tensor_matrix(step: _Step, t: Tensor) -> Tensor:
    return t.reshape(step.view).permute(step.perm_b).reshape(step.n, step.k, step.p)  # (n, k, p)


def chain_forward(
    plan: ChainPlan, x: Tensor, tensors: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """The chain's forward on torch operations, ``tensors`` in the chain's order: the output
    ``(b, out_features)`` and every step's packed state."""
    rows = x.shape[0]
    z = x.reshape(rows, *plan.in_sizes)  # (b, I_1, ..., I_D)
    states = []
    for step, t in zip(plan.steps, tensors, strict=True):
        a = z.permute(step.perm_a).reshape(step.n, rows * step.m, step.k)  # (n, b m, k)
        states.append(a)
        z = _gemm(a, _tensor_matrix(step, t)).reshape(
            _rows_shape(step.out_shape, rows)
        )  # (n, m..., p...)
    return z.permute(plan.out_perm).reshape(rows, plan.out_features), states


def _rows_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    return tuple(rows if s == -1 else s for s in shape)


def chain_reference(x: Tensor, plan: ChainPlan, tensors: Sequence[Tensor]) -> Tensor:
    """The chain on torch operations (autograd records every one): what the kernel computes,
    for tests and second derivatives. ``(b, in_features) -> (b, out_features)``; ``tensors``
    in the spec's order."""
    return chain_forward(plan, x, [tensors[i] for i in plan.order])[0]


def chain_linear(
    x: Tensor, plan: ChainPlan, tensors: Sequence[Tensor], bias: Tensor | None = None
) -> Tensor | None:
    """``x @ W.T`` (``+ bias``) for rows ``x`` ``(b, in_features)`` through ``plan`` (from the
    format's :class:`ChainSpec`) and the format's tensors in the spec's order, in the compiled
    kernel as one autograd node (:mod:`kcprnn._cpu.native_chain`): ``(b, out_features)``, or
    ``None`` where the kernel cannot run (the caller then runs the format's own product)."""
    return native_chain(x, plan, [tensors[i] for i in plan.order], bias)


def chain_macs(plan: ChainPlan, rows: int) -> int:
    """Multiply-accumulates of the chain on ``rows`` rows, forward."""
    return plan.macs(rows)
