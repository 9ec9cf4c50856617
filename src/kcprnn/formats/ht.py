r"""Hierarchical Tucker (HT) format over the ``D`` merged modes ``(J_d I_d)``.

The weight is viewed as a ``D``-way tensor whose mode ``d`` merges output and input index,
``(j_d, i_d)`` of size ``J_d I_d`` (row-major, ``j_d`` major). A balanced binary
:class:`DimensionTree` over the modes carries the factors:

- leaf ``d``: a frame ``U_d`` of shape ``(J_d I_d, r_d)``;
- each internal node ``t`` other than the root: a transfer tensor ``B_t`` of shape
  ``(r_L, r_R, r_t)`` (ranks of its left child, right child, itself);
- the root: a matrix ``B_root`` of shape ``(r_L, r_R)``.

A node's frame is ``U_t = (U_L ⊗ U_R) B_t`` and ``W = U_L B_root U_R^T`` at the root (in merged
mode order), so with one rank ``r`` there are ``Σ_d I_d J_d r + (D - 2) r³ + r²`` parameters.

Node numbering (used by per-node ranks): leaves are nodes ``0 .. D-1`` (node ``d`` is mode ``d``),
internal nodes follow in post-order (children before parents), and the root is the last node,
``2D - 2``. A node over modes ``[lo, hi)`` splits them into ``[lo, lo + ceil((hi - lo) / 2))`` and
the rest, so ``D = 3`` gives the tree ``((0, 1), 2)``.

Ranks are not capped: a rank above what a node's matricization can carry is allowed (it only
adds redundant parameters). A single mode (``D = 1``) has no tree and raises ``ValueError``.

Legend for shape comments: b batch, m the intermediate's axes outside the contracted block
(batch included), k the contracted block, a the leading part of a block that wraps around (a
rank bond), n the new axes of a step, i/j input/output mode, a/c/t ranks (left child, right
child, node), x/y merged-mode indices of a left/right subtree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..shapes import validate_ranks
from ._base import FactorizedMatrix, register

__all__ = [
    "DimensionTree",
    "HTMatrix",
    "HTPlan",
    "HTStep",
    "ht_linear",
    "ht_num_params",
    "ht_plan",
    "ht_to_dense",
    "ht_tree",
    "validate_ht_ranks",
]


# --- dimension tree ---


@dataclass(frozen=True)
class DimensionTree:
    """A balanced binary tree over modes ``0 .. num_modes - 1`` (see the module docstring).

    Attributes:
        num_modes: ``D``, the number of leaves.
        children: per node, ``(left, right)`` child ids, or ``None`` for a leaf.
        spans: per node, the half-open range ``(lo, hi)`` of modes below it.
        parent: per node, its parent id (``-1`` for the root).
    """

    num_modes: int
    children: tuple[tuple[int, int] | None, ...]
    spans: tuple[tuple[int, int], ...]
    parent: tuple[int, ...]

    @property
    def root(self) -> int:
        return len(self.children) - 1

    @property
    def num_nodes(self) -> int:
        return len(self.children)

    @property
    def internal(self) -> tuple[int, ...]:
        """Internal non-root nodes in post-order: the owners of the transfer tensors."""
        return tuple(range(self.num_modes, self.root))

    def is_leaf(self, node: int) -> bool:
        return self.children[node] is None

    def split(self, node: int) -> tuple[int, int]:
        """The ``(left, right)`` children of an internal node."""
        kids = self.children[node]
        if kids is None:
            raise ValueError(f"node {node} is a leaf of the dimension tree; it has no children")
        return kids


@lru_cache(maxsize=64)
def ht_tree(num_modes: int) -> DimensionTree:
    """The balanced dimension tree over ``num_modes >= 2`` modes.

    Example:
        >>> ht_tree(3).children
        (None, None, None, (0, 1), (3, 2))
    """
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 2:
        raise ValueError(
            "the HT format needs at least 2 modes (a root with two subtrees), "
            f"got num_modes={num_modes!r}; pass num_modes >= 2 or mode lists of length >= 2"
        )
    children: list[tuple[int, int] | None] = [None] * num_modes
    spans: list[tuple[int, int]] = [(d, d + 1) for d in range(num_modes)]

    def build(lo: int, hi: int) -> int:
        if hi - lo == 1:
            return lo
        mid = lo + (hi - lo + 1) // 2
        left, right = build(lo, mid), build(mid, hi)
        children.append((left, right))
        spans.append((lo, hi))
        return len(children) - 1

    build(0, num_modes)
    parent = [-1] * len(children)
    for node, kids in enumerate(children):
        if kids is not None:
            parent[kids[0]] = parent[kids[1]] = node
    return DimensionTree(num_modes, tuple(children), tuple(spans), tuple(parent))


def validate_ht_ranks(rank: int | Sequence[int], tree: DimensionTree) -> tuple[int, ...]:
    """Ranks of the ``2D - 2`` non-root nodes (leaves first, then internal nodes in post-order).

    An int is used for every node; a sequence gives one rank per non-root node.
    """
    return validate_ranks(rank, tree.num_nodes - 1, "rank")


def _node_sizes(
    in_modes: Sequence[int], out_modes: Sequence[int], tree: DimensionTree
) -> list[int]:
    """Per node, the product of its merged mode sizes ``Π J_d I_d``."""
    return [math.prod(out_modes[d] * in_modes[d] for d in range(lo, hi)) for lo, hi in tree.spans]


def ht_num_params(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameter count; ``Σ_d I_d J_d r + (D - 2) r³ + r²`` with a single rank ``r``."""
    tree = ht_tree(len(in_modes))
    count = sum(in_modes[d] * out_modes[d] * ranks[d] for d in range(tree.num_modes))
    for t in (*tree.internal, tree.root):
        left, right = tree.split(t)
        count += ranks[left] * ranks[right] * (ranks[t] if t != tree.root else 1)
    return count


# --- reconstruction ---


def ht_to_dense(
    leaves: Sequence[Tensor],
    transfers: Sequence[Tensor],
    root: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
) -> Tensor:
    """Rebuild ``W`` of shape ``(J_1⋯J_D, I_1⋯I_D)`` bottom-up through the node frames.

    Args:
        leaves: ``D`` frames ``(J_d I_d, r_d)``.
        transfers: ``D - 2`` tensors ``(r_L, r_R, r_t)``, internal nodes in post-order.
        root: ``(r_L, r_R)``.
    """
    tree = ht_tree(len(in_modes))
    frames: dict[int, Tensor] = dict(enumerate(leaves))
    for t, transfer in zip(tree.internal, transfers, strict=True):
        left, right = tree.split(t)
        u_l, u_r = frames.pop(left), frames.pop(right)  # (x, a), (y, c)
        ra, rc, rt = transfer.shape
        z = u_l @ transfer.reshape(ra, rc * rt)  # (x, c*t)
        z = torch.einsum("xct,yc->xyt", z.reshape(-1, rc, rt), u_r)  # (x, y, t)
        frames[t] = z.reshape(-1, rt)  # (x*y, t)
    left, right = tree.split(tree.root)
    w = frames[left] @ root @ frames[right].T  # (x, y): merged modes (j_1 i_1)(j_2 i_2)...
    d = tree.num_modes
    w = w.reshape(
        [s for pair in zip(out_modes, in_modes, strict=True) for s in pair]
    )  # (j_1, i_1, ..., j_D, i_D)
    w = w.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))  # (j_1, ..., j_D, i_1, ..., i_D)
    return w.reshape(math.prod(out_modes), math.prod(in_modes))  # (J, I)


def _reconstruction_macs(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> int:
    tree = ht_tree(len(in_modes))
    size = _node_sizes(in_modes, out_modes, tree)
    macs = 0
    for t in tree.internal:
        left, right = tree.split(t)
        ra, rc, rt = ranks[left], ranks[right], ranks[t]
        macs += size[left] * ra * rc * rt + size[left] * size[right] * rc * rt
    left, right = tree.split(tree.root)
    macs += size[left] * ranks[left] * ranks[right] + size[left] * ranks[right] * size[right]
    return macs


# --- factorized product ---

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


# Cost of copying one element in a permutation, in multiply-accumulates (measured on the UCF11
# shapes: a transposing copy of the input takes about as long as a 10-MAC-per-element product).
_MOVE_COST = 8
# Leaf orders are searched exhaustively up to this many modes (D! candidates).
_MAX_SEARCH = 5


def _cost(plan: HTPlan) -> int:
    return plan.macs_per_row + _MOVE_COST * plan.moved_per_row


@lru_cache(maxsize=256)
def ht_plan(
    in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]
) -> HTPlan:
    """The contraction schedule of :func:`ht_linear`.

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
    ``_MOVE_COST`` per copied element) up to ``_MAX_SEARCH`` modes. The first product, the only
    one on the full input, costs ``J_d r_d`` per input element, so a trailing mode that would
    grow the input (``J_d r_d > I_d``) is replaced by one that shrinks it when that pays; for
    UCF11 the trailing mode (``18 -> 16``) is kept, since the best one (``20 -> 16``) would save
    less than copying the input costs.
    """
    d = len(in_modes)
    natural = tuple(reversed(range(d)))
    orders = itertools.permutations(natural) if d <= _MAX_SEARCH else [natural]
    # the natural order comes first and wins ties
    return min((_schedule(in_modes, out_modes, ranks, o) for o in orders), key=_cost)


class _RotatingProduct(torch.autograd.Function):
    """``out = Σ_a op[a]^T @ z[a]^T``: op ``(a, k, n)``, z ``(a, m, k)`` -> ``(n, m)``.

    The product of a trailing block (``a = 1``) or a wrapping block with the new axes in front.
    Autograd through ``mm`` on transposed views would return the gradient of ``z`` transposed
    and copy it (and stack the ``a`` slices once more); here each gradient is one ``bmm`` that
    writes it in ``z``'s own layout (about 6x faster on the UCF11 shapes).
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
) -> Tensor:
    """``x @ W.T`` without forming ``W``: the input meets the leaves first, then the tree.

    Every step is one matrix product (or ``A`` accumulated ones) on a 2-D view of the
    intermediate, with the new axes in front (see :func:`ht_plan`); the input is only reshaped,
    or permuted once where the plan found that cheaper than contracting its trailing mode first.

    Args:
        x: ``(b, I_1⋯I_D)``.
        leaves, transfers, root: the factors, as in :func:`ht_to_dense`.
        plan: the schedule from :func:`ht_plan` (computed when omitted).

    Returns:
        ``(b, J_1⋯J_D)``.
    """
    tree = ht_tree(len(in_modes))
    if plan is None:
        ranks = tuple(u.shape[-1] for u in leaves) + tuple(t.shape[-1] for t in transfers)
        plan = ht_plan(tuple(in_modes), tuple(out_modes), ranks)
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


# --- decomposition ---


def _ht_hsvd(
    weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Hierarchical SVD (Grasedyck 2010): each node's frame is the leading ``r_t`` left singular
    vectors of the matricization of ``W`` (merged modes of the node as rows); transfer tensors
    and the root are the projections onto the children's frames. Frames are padded with zero
    columns when ``r_t`` exceeds the matricization's rank bound; with ranks at least that bound
    the decomposition reproduces ``W`` exactly."""
    tree = ht_tree(len(in_modes))
    d = tree.num_modes
    merged = [out_modes[k] * in_modes[k] for k in range(d)]
    w = weight.reshape(*out_modes, *in_modes)  # (j_1, ..., j_D, i_1, ..., i_D)
    w = w.permute(*(v for k in range(d) for v in (k, d + k))).reshape(merged)  # (x_1, ..., x_D)
    frames: list[Tensor] = []
    for node in range(tree.num_nodes - 1):
        lo, hi = tree.spans[node]
        rows = math.prod(merged[lo:hi])
        mat = (
            w.reshape(math.prod(merged[:lo]), rows, -1).transpose(0, 1).reshape(rows, -1)
        )  # (x_t, rest)
        u = torch.linalg.svd(mat, full_matrices=False)[0][:, : ranks[node]]  # (x_t, <=r_t)
        frames.append(
            torch.cat([u, u.new_zeros(rows, ranks[node] - u.shape[1])], dim=1)
        )  # (x_t, r_t)
    transfers = []
    for t in tree.internal:
        left, right = tree.split(t)
        u_t = frames[t].reshape(frames[left].shape[0], frames[right].shape[0], -1)  # (x, y, t)
        transfers.append(
            torch.einsum("xa,yc,xyt->act", frames[left], frames[right], u_t)
        )  # (a, c, t)
    left, right = tree.split(tree.root)
    w = w.reshape(frames[left].shape[0], frames[right].shape[0])  # (x, y)
    root = frames[left].T @ w @ frames[right]  # (a, c)
    return frames[:d], transfers, root


# --- module ---


def _orthonormal_(param: Tensor, rows: int) -> None:
    """Fill ``param`` (viewed as ``(rows, cols)``) with a random matrix whose map ``v -> M v``
    preserves squared norms: orthonormal columns when ``cols <= rows`` (exact), otherwise
    orthonormal rows scaled by ``sqrt(cols / rows)`` (exact in expectation over isotropic ``v``).

    Gram-Schmidt (each vector orthogonalized twice) on a Gaussian draw gives the Haar
    distribution; it is used instead of ``torch.linalg.qr`` because these matrices are tiny and a
    multithreaded LAPACK call on them can take tens of milliseconds on a busy machine.
    """
    cols = param.numel() // rows
    dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.randn(max(rows, cols), min(rows, cols), device=param.device, dtype=dtype)
    for k in range(g.shape[1]):
        v = g[:, k]  # (m,)
        for _ in range(2):
            v = v - g[:, :k] @ (g[:, :k].T @ v)  # (m,)
        g[:, k] = v / v.norm()
    m = g if cols <= rows else g.T * math.sqrt(cols / rows)  # (rows, cols)
    param.copy_(m.reshape(param.shape))


@register("ht")
class HTMatrix(FactorizedMatrix):
    r"""Weight in hierarchical Tucker format over the merged modes ``(J_d I_d)``.

    .. math::
        W = U_L\, B_{\mathrm{root}}\, U_R^\top, \qquad U_t = (U_{t_L} \otimes U_{t_R})\, B_t,

    in merged-mode order, over a balanced binary :class:`DimensionTree` of the ``D`` modes
    (``D >= 2``; a single mode raises ``ValueError``). See the module docstring for the node
    numbering.

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
            cost_model:
            as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: the rank of every non-root node (default 4, the rank of the UCF11 baselines), or a
            sequence of ``2D - 2`` ranks, one per non-root node in node order (leaves
            ``0 .. D-1``, then internal nodes in post-order).

    Attributes:
        tree: the :class:`DimensionTree`.
        ranks: per non-root node rank.
        leaves: ``D`` frames ``(J_d I_d, r_d)``.
        transfers: ``D - 2`` transfer tensors ``(r_L, r_R, r_t)``, internal nodes in post-order.
        root: ``(r_L, r_R)``.

    Example:
        >>> w = HTMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=2)
        >>> w.num_params  # 2 * (6 + 4 + 10) + 2**3 + 2**2
        52
        >>> w(torch.ones(3, 24)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_modes: int | None = None,
        rank: int | Sequence[int] = 4,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            in_modes=in_modes,
            out_modes=out_modes,
            num_modes=num_modes,
            algorithm=algorithm,
            device=device,
            dtype=dtype,
        )
        if len(self.in_modes) < 2:
            raise ValueError(
                "the HT format needs at least 2 modes (a root with two subtrees), got "
                f"in_modes={list(self.in_modes)}, out_modes={list(self.out_modes)}; "
                "pass num_modes >= 2 or mode lists of length >= 2"
            )
        self.tree = ht_tree(len(self.in_modes))
        self.ranks = validate_ht_ranks(rank, self.tree)
        fk = self.factory_kwargs
        self.leaves = nn.ParameterList(
            nn.Parameter(torch.empty(j * i, r, **fk))
            for j, i, r in zip(
                self.out_modes, self.in_modes, self.ranks[: self.num_modes], strict=True
            )
        )
        self.transfers = nn.ParameterList(
            nn.Parameter(
                torch.empty(*(self.ranks[c] for c in self.tree.split(t)), self.ranks[t], **fk)
            )
            for t in self.tree.internal
        )
        left, right = self.tree.split(self.tree.root)
        self.root = nn.Parameter(torch.empty(self.ranks[left], self.ranks[right], **fk))
        self.plan = ht_plan(self.in_modes, self.out_modes, self.ranks)
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        # Orthogonal HT form: when every frame and every matricized transfer (r_L r_R, r_t) has
        # orthonormal columns, all node frames U_t = (U_L ⊗ U_R) B_t do too (a product of
        # isometries), so ||W||_F = ||U_L B_root U_R^T||_F = ||B_root||_F. Drawing the root with
        # ||B_root||_F = std * sqrt(I J) exactly then gives mean(W**2) = std**2 for every draw,
        # not only on average (iid Gaussian factors instead give Var W = Π_e r_e Π_n σ_n², a
        # product of 2D - 1 random norms whose sample estimate is heavy-tailed). A frame with more
        # columns than rows cannot be orthonormal; it is scaled to preserve norms in expectation.
        std = self.default_std() if std is None else std
        with torch.no_grad():
            for u in self.leaves:
                _orthonormal_(u, u.shape[0])
            for b in self.transfers:
                _orthonormal_(b, b.shape[0] * b.shape[1])
            self.root.normal_()
            self.root.mul_(std * math.sqrt(self.in_features * self.out_features) / self.root.norm())

    def matmul(self, x: Tensor) -> Tensor:
        return ht_linear(
            x,
            list(self.leaves),
            list(self.transfers),
            self.root,
            self.in_modes,
            self.out_modes,
            self.plan,
        )  # (b, j)

    def to_dense(self) -> Tensor:
        return ht_to_dense(
            list(self.leaves), list(self.transfers), self.root, self.in_modes, self.out_modes
        )  # (j, i)

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        return rows * self.plan.macs_per_row + self.plan.macs_fixed

    def reconstruction_macs(self) -> int:
        return _reconstruction_macs(self.in_modes, self.out_modes, self.ranks)

    def format_repr_items(self) -> list[str]:
        ranks = self.ranks[0] if len(set(self.ranks)) == 1 else list(self.ranks)
        return [f"rank={ranks}"]

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> HTMatrix:
        """Decompose ``weight`` by hierarchical SVD (exact when the ranks reach the
        matricization ranks; truncated, quasi-optimal otherwise). ``options`` as in the
        constructor."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        leaves, transfers, root = _ht_hsvd(
            weight.detach().to(out.root.dtype), out.in_modes, out.out_modes, out.ranks
        )
        with torch.no_grad():
            for p, v in zip(
                (*out.leaves, *out.transfers, out.root), (*leaves, *transfers, root), strict=True
            ):
                p.copy_(v)
        return out
