r"""The factorized product of the hierarchical Tucker format (:mod:`kcprnn.formats.ht`): the
contraction plan (:func:`ht_plan`, searched once per shape, ranks and cost model) and its
execution (:func:`ht_linear`).

Legend for shape comments: b batch, m the intermediate's axes outside the contracted block
(batch included), k the contracted block, a the leading part of a block that wraps around (a
rank bond), n the new axes of a step, j output mode.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .._cpu import CostModel, default_cost_model
from ._ht_tree import DimensionTree, ht_tree

__all__ = ["HTPlan", "HTStep", "ht_linear", "ht_plan"]


# --- the plan ---

# Axis labels of the intermediate tensor and of the factors: ("b", 0) the batch, ("i", d) input
# mode, ("j", d) output mode, ("a", n) the rank bond between node n and its parent.
_Label = tuple[str, int]
_BATCH: _Label = ("b", 0)


@dataclass(frozen=True)
class HTStep:
    """One contraction of :func:`ht_linear`: a matrix product of a block of the intermediate's
    axes with an operator built from a few factors, the new axes placed in front.

    The block is the trailing axes (``where="suffix"``: ``z`` viewed ``(1, M, K)``) or wraps
    around, leading and trailing axes (``"cyclic"``: ``(A, M, K)``, summed over ``A`` by ``A``
    products); anything else is first made trailing by a permutation (``perm``).

    Attributes:
        nodes: the tree nodes whose factors form the operator (a leaf, a leaf with its parent,
            or one internal node; preceded by the root when the root is folded in), in an order
            where each shares one bond with the product of the previous ones.
        equations: the einsums that fold those factors pairwise, then one that lays the
            operator out as the block (as in the intermediate) followed by the new axes.
        where: ``"suffix"`` or ``"cyclic"``.
        axes: sizes of the intermediate's labelled axes before ``perm`` (batch as ``-1``).
        perm: axis permutation applied before the product, or ``None``.
        lead, block, out: ``A`` (the leading part of a cyclic block, else 1), ``K`` (the rest of
            the block) and ``N`` (the operator width).
        rest: per-row size ``M / b`` of the axes outside the block.
    """

    nodes: tuple[int, ...]
    equations: tuple[str, ...]
    where: str
    axes: tuple[int, ...]
    perm: tuple[int, ...] | None
    lead: int
    block: int
    out: int
    rest: int


@dataclass(frozen=True)
class HTPlan:
    """The contraction schedule of :func:`ht_linear` for one shape; built by :func:`ht_plan`.

    Attributes:
        leaf_order: the order in which the input modes are contracted.
        input_perm: permutation of ``x`` viewed ``(b, I_1, ..., I_D)`` that makes the first
            leaf's mode trailing, the second one next, ...; ``None`` for the last-to-first order.
        steps: the contractions in execution order.
        final_axes: sizes of the labelled axes after the last step (batch as ``-1``).
        final_perm: permutation of those axes into ``(j_1, ..., j_D, b)``, or ``None``.
        macs_per_row: multiply-accumulates of the products, per input row.
        macs_fixed: multiply-accumulates of building the operators (independent of rows).
        moved_per_row: elements copied by permutations, per row.
    """

    leaf_order: tuple[int, ...]
    input_perm: tuple[int, ...] | None
    steps: tuple[HTStep, ...]
    final_axes: tuple[int, ...]
    final_perm: tuple[int, ...] | None
    macs_per_row: int
    macs_fixed: int
    moved_per_row: int


def _factor_labels(tree: DimensionTree, node: int) -> list[_Label]:
    """Axis labels of a node's factor: leaf ``(j, i, a)`` (its frame viewed ``(J_d, I_d, r_d)``),
    internal ``(a_L, a_R, a_t)``, root ``(a_L, a_R)``."""
    if tree.is_leaf(node):
        return [("j", node), ("i", node), ("a", node)]
    left, right = tree.split(node)
    labels = [("a", left), ("a", right)]
    return labels if node == tree.root else [*labels, ("a", node)]


def _equation(operands: Sequence[Sequence[_Label]], output: Sequence[_Label]) -> str:
    """An einsum equation over labelled axes, one letter per distinct label in order of
    appearance; e.g. a leaf fused with its parent, output ``(a_1, i_0, a_3, j_0)``:
    ``[[j0, i0, a0], [a0, a1, a3]], [a1, i0, a3, j0] -> "abc,cde->dbea"``."""
    letters: dict[_Label, str] = {}
    for lab in (*(lab for op in operands for lab in op), *output):
        letters.setdefault(lab, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
    ins = ",".join("".join(letters[lab] for lab in op) for op in operands)
    return f"{ins}->{''.join(letters[lab] for lab in output)}"


def _edges(tree: DimensionTree, node: int) -> list[tuple[_Label, int]]:
    """The bonds of a node as ``(label, neighbour)``."""
    out = []
    if node != tree.root:
        out.append((("a", node), tree.parent[node]))
    if not tree.is_leaf(node):
        out.extend((("a", c), c) for c in tree.split(node))
    return out


def _schedule(
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    order: tuple[int, ...],
) -> HTPlan:
    """The schedule that contracts the leaves in ``order`` (see :func:`ht_plan`)."""
    tree = ht_tree(len(in_modes))
    size: dict[_Label, int] = {_BATCH: 1}
    for d in range(tree.num_modes):
        size["i", d], size["j", d] = in_modes[d], out_modes[d]
    for n in range(tree.num_nodes - 1):
        size["a", n] = ranks[n]
    # the first leaf's input axis is trailing, the next one just before it, and so on
    axes: list[_Label] = [_BATCH, *(("i", d) for d in reversed(order))]
    input_perm = None
    moved = 0
    if list(order) != list(reversed(range(tree.num_modes))):
        input_perm = (0, *(1 + d for d in reversed(order)))
        moved = math.prod(in_modes)
    done: set[int] = set()
    alias: dict[_Label, _Label] = {}  # bond to the deferred root -> its open bond on the other side
    steps: list[HTStep] = []
    macs_per_row = macs_fixed = 0

    def open_edges(node: int) -> list[_Label]:
        return [lab for lab, nb in _edges(tree, node) if nb in done]

    def absorb(nodes: tuple[int, ...]) -> None:
        nonlocal axes, macs_per_row, macs_fixed, moved
        wanted = {("i", n) for n in nodes if tree.is_leaf(n)}
        chain = list(nodes)
        for n in nodes:
            for lab, nb in _edges(tree, n):
                if nb in done and lab in alias:  # the bond goes through the deferred root
                    lab = alias.pop(lab)
                    chain = [tree.root, n, *(m for m in nodes if m != n)]
                if nb in done:
                    wanted.add(lab)
        assert wanted <= set(axes), "the block is present in the intermediate"
        new = [
            lab for n in nodes for lab, nb in _edges(tree, n) if nb not in done and nb not in nodes
        ]
        if tree.is_leaf(nodes[0]):
            new.append(("j", nodes[0]))
        shape_in = tuple(-1 if lab == _BATCH else size[lab] for lab in axes)
        flags = [lab in wanted for lab in axes]
        k_lead = flags.index(False)  # block axes at the front
        k_tail = flags[::-1].index(False)  # block axes at the back
        perm = None
        if k_tail == 0 or k_lead + k_tail != len(wanted):  # not trailing, nor wrapping around
            layout = [lab for lab in axes if lab not in wanted] + [
                lab for lab in axes if lab in wanted
            ]
            perm = tuple(axes.index(lab) for lab in layout)
            axes, k_lead, k_tail = layout, 0, len(wanted)
            moved += math.prod(size[lab] for lab in axes)
        lead_labels, tail_labels = axes[:k_lead], axes[len(axes) - k_tail :]
        rest_labels = axes[k_lead : len(axes) - k_tail]
        where = "cyclic" if lead_labels else "suffix"
        a = math.prod(size[lab] for lab in lead_labels)
        k = math.prod(size[lab] for lab in tail_labels)
        n = math.prod(size[lab] for lab in new)
        m = math.prod(size[lab] for lab in rest_labels)
        macs_per_row += a * k * n * m
        # the operator: factors folded pairwise along the chain (each pair shares one bond)
        acc = _factor_labels(tree, chain[0])
        equations = []
        for node in chain[1:]:
            labels = _factor_labels(tree, node)
            macs_fixed += math.prod(size[lab] for lab in {*acc, *labels})
            shared = set(acc) & set(labels)
            out = [lab for lab in (*acc, *labels) if lab not in shared]
            equations.append(_equation([acc, labels], out))
            acc = out
        block_new = [*lead_labels, *tail_labels, *new]
        assert sorted(acc) == sorted(block_new), "the operator has the block and new axes"
        equations.append(_equation([acc], block_new))
        steps.append(HTStep(tuple(chain), tuple(equations), where, shape_in, perm, a, k, n, m))
        axes = new + rest_labels
        done.update(nodes)

    for d in order:
        parent = tree.parent[d]
        others = len(_edges(tree, parent)) - 1
        if parent not in done and len(open_edges(parent)) in (1, others):
            absorb((d, parent))
        else:
            absorb((d,))
        progress = True
        while progress:
            progress = False
            root_open = open_edges(tree.root)
            if tree.root not in done and len(root_open) == 1:
                # defer the root matrix: its open bond stands for the bond to its other child,
                # and the root is folded into the operator of the step that contracts it
                other = next(lab for lab, nb in _edges(tree, tree.root) if nb not in done)
                alias[other] = root_open[0]
                done.add(tree.root)
            for t in (*tree.internal, tree.root):
                if t not in done and len(open_edges(t)) >= 2:
                    absorb((t,))
                    progress = True
    assert done == set(range(tree.num_nodes)) and not alias, "every factor is contracted"
    target = [*(("j", d) for d in range(tree.num_modes)), _BATCH]
    final_axes = tuple(-1 if lab == _BATCH else size[lab] for lab in axes)
    final_perm = None if axes == target else tuple(axes.index(lab) for lab in target)
    if final_perm is not None:
        moved += math.prod(out_modes)
    return HTPlan(
        order, input_perm, tuple(steps), final_axes, final_perm, macs_per_row, macs_fixed, moved
    )


def _cost(plan: HTPlan, move: float) -> float:
    """A plan's cost per row: its multiply-accumulates plus ``move`` per copied element."""
    return plan.macs_per_row + move * plan.moved_per_row


def ht_plan(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    cost_model: CostModel | None = None,
) -> HTPlan:
    """The contraction schedule of :func:`ht_linear`; it depends on the shapes, the ranks and
    the cost model only (not on the number of rows, nor on autograd), and is cached.

    The input ``(b, i_1, ..., i_D)`` is contracted one leaf at a time, always on the trailing
    input axis, and every product puts its new axes in front, so the intermediate rotates
    without permutations (for balanced trees up to ``D = 5``; deeper trees may need one):

    - a leaf whose parent has exactly one other bond open (its sibling's, or the bond to the
      grandparent handed down from above), or all of them, is fused with its parent's transfer
      tensor: block ``(open bond, i_d)``, new axes ``(parent bond, j_d)``; the open bond sits in
      front, so the block is cyclic (leading and trailing axes);
    - otherwise the leaf goes alone: ``i_d -> (a_d, j_d)``;
    - after each step, an internal node with two or more bonds open is contracted alone
      (``(a_L, a_R) -> a_t``); the root with one bond open is not contracted on its own (that
      would be a full pass over the intermediate for an ``r x r`` matrix): it is folded into
      the operator of the step that reaches its other bond.

    Leaves are taken from the last mode to the first unless another order is cheaper once its
    one permutation of the input is paid for: every order is costed (multiply-accumulates plus
    the cost model's ``ht_move`` per copied element) when there are at most ``ht_max_search``
    modes (``D!`` orders). The first product, the only one on the full input, costs
    ``J_d r_d`` per input element, so a trailing mode that would grow the input
    (``J_d r_d > I_d``) is replaced by one that shrinks it when that pays; for UCF11 with the
    default model the trailing mode (``18 -> 16``) is kept, since the best one (``20 -> 16``)
    would save less than copying the input costs.

    Args:
        in_modes, out_modes: the ``D`` mode sizes.
        ranks: the ``2D - 2`` non-root node ranks (see :func:`~kcprnn.formats.ht.HTMatrix`).
        cost_model: default :func:`~kcprnn._cpu.default_cost_model`.
    """
    model = default_cost_model() if cost_model is None else cost_model
    return _search(
        tuple(in_modes), tuple(out_modes), tuple(ranks), model.ht_move, model.ht_max_search
    )


@lru_cache(maxsize=256)
def _search(
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    move: float,
    max_search: int,
) -> HTPlan:
    d = len(in_modes)
    natural = tuple(reversed(range(d)))
    orders = itertools.permutations(natural) if d <= max_search else [natural]
    # the natural order comes first and wins ties
    return min(
        (_schedule(in_modes, out_modes, ranks, o) for o in orders),
        key=lambda plan: _cost(plan, move),
    )


class _RotatingProduct(torch.autograd.Function):
    """``out = Σ_a op[a]^T @ z[a]^T``: op ``(a, k, n)``, z ``(a, m, k)`` -> ``(n, m)``.

    The product of a trailing block (``a = 1``) or a wrapping block with the new axes in front.
    Autograd through ``mm`` on transposed views would return the gradient of ``z`` transposed
    and copy it (and stack the ``a`` slices once more); here each gradient is one ``bmm`` that
    writes it in ``z``'s own layout.
    """

    @staticmethod
    def forward(ctx, op: Tensor, z: Tensor) -> Tensor:
        ctx.save_for_backward(op, z)
        out = op[0].T @ z[0].T  # (n, m)
        for s in range(1, op.shape[0]):
            out.addmm_(op[s].T, z[s].T)  # (n, m)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        op, z = ctx.saved_tensors
        # an incoming gradient with zero strides (from .sum(), say) would send bmm to a slow
        # path; making it contiguous costs one pass over this step's output
        g = grad.contiguous().T.expand(z.shape[0], -1, -1)  # (a, m, n)
        grad_op = torch.bmm(z.transpose(1, 2), g) if ctx.needs_input_grad[0] else None  # (a, k, n)
        grad_z = torch.bmm(g, op.transpose(1, 2)) if ctx.needs_input_grad[1] else None  # (a, m, k)
        return grad_op, grad_z


def _factor(
    node: int,
    tree: DimensionTree,
    leaves: Sequence[Tensor],
    transfers: Sequence[Tensor],
    root: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
) -> Tensor:
    """A node's factor with the axes of :func:`_factor_labels`."""
    if tree.is_leaf(node):
        return leaves[node].reshape(out_modes[node], in_modes[node], -1)  # (j, i, a)
    return root if node == tree.root else transfers[node - tree.num_modes]  # (a, c[, t])


def ht_linear(
    x: Tensor,
    leaves: Sequence[Tensor],
    transfers: Sequence[Tensor],
    root: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    plan: HTPlan | None = None,
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` without forming ``W``: the input meets the leaves first, then the tree.

    Every step is one matrix product (or ``A`` accumulated ones) on a 2-D view of the
    intermediate, with the new axes in front (see :func:`ht_plan`); the input is only reshaped,
    or permuted once where the plan found that cheaper than contracting its trailing mode first.

    Args:
        x: ``(b, I_1⋯I_D)``.
        leaves, transfers, root: the factors, as in :func:`ht_to_dense`.
        plan: the schedule from :func:`ht_plan` (computed with ``cost_model`` when omitted).
        cost_model: the model :func:`ht_plan` searches with (default:
            :func:`~kcprnn._cpu.default_cost_model`); unused when ``plan`` is given.

    Returns:
        ``(b, J_1⋯J_D)``.
    """
    tree = ht_tree(len(in_modes))
    if plan is None:
        ranks = tuple(u.shape[-1] for u in leaves) + tuple(t.shape[-1] for t in transfers)
        plan = ht_plan(in_modes, out_modes, ranks, cost_model)
    b = x.shape[0]
    z = x  # (b, I)
    if plan.input_perm is not None:
        z = z.reshape(b, *in_modes).permute(plan.input_perm)  # (b, i in reverse leaf order)
    for step in plan.steps:
        if step.perm is not None:
            shape = [b if n < 0 else n for n in step.axes]  # the batch is stored as -1
            z = z.reshape(shape).permute(step.perm)  # (permuted axes)
        op = _factor(step.nodes[0], tree, leaves, transfers, root, in_modes, out_modes)
        for node, eq in zip(step.nodes[1:], step.equations[:-1], strict=True):
            op = torch.einsum(
                eq, op, _factor(node, tree, leaves, transfers, root, in_modes, out_modes)
            )
        op = torch.einsum(step.equations[-1], op)  # (block..., new...)
        op = op.reshape(step.lead, step.block, step.out)  # (a, k, n)
        z = _RotatingProduct.apply(op, z.reshape(step.lead, b * step.rest, step.block))  # (n, m)
    if plan.final_perm is not None:
        shape = [b if n < 0 else n for n in plan.final_axes]
        z = z.reshape(shape).permute(plan.final_perm)  # (j_1, ..., j_D, b)
    return z.reshape(math.prod(out_modes), b).T  # (b, J)
