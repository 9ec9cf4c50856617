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

Legend for shape comments: b batch, p axes before the contracted block, k contracted block,
q axes after it, n new axes of a step, i/j input/output mode, a/c ranks (child/parent),
x/y merged-mode indices of a left/right subtree.
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

    def is_left_child(self, node: int) -> bool:
        p = self.parent[node]
        return p >= 0 and self.children[p][0] == node  # type: ignore[index]


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


def _node_sizes(in_modes: Sequence[int], out_modes: Sequence[int], tree: DimensionTree) -> list[int]:
    """Per node, the product of its merged mode sizes ``Π J_d I_d``."""
    return [
        math.prod(out_modes[d] * in_modes[d] for d in range(lo, hi)) for lo, hi in tree.spans
    ]


def ht_num_params(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> int:
    """Parameter count; ``Σ_d I_d J_d r + (D - 2) r³ + r²`` with a single rank ``r``."""
    tree = ht_tree(len(in_modes))
    count = sum(in_modes[d] * out_modes[d] * ranks[d] for d in range(tree.num_modes))
    for t in (*tree.internal, tree.root):
        left, right = tree.children[t]  # type: ignore[misc]
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
    for t, transfer in zip(tree.internal, transfers):
        left, right = tree.children[t]  # type: ignore[misc]
        u_l, u_r = frames.pop(left), frames.pop(right)  # (x, a), (y, c)
        ra, rc, rt = transfer.shape
        z = u_l @ transfer.reshape(ra, rc * rt)  # (x, c*t)
        z = torch.einsum("xct,yc->xyt", z.reshape(-1, rc, rt), u_r)  # (x, y, t)
        frames[t] = z.reshape(-1, rt)  # (x*y, t)
    left, right = tree.children[tree.root]  # type: ignore[misc]
    w = frames[left] @ root @ frames[right].T  # (x, y): merged modes (j_1 i_1)(j_2 i_2)...
    d = tree.num_modes
    w = w.reshape([s for pair in zip(out_modes, in_modes) for s in pair])  # (j_1, i_1, ..., j_D, i_D)
    w = w.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))  # (j_1, ..., j_D, i_1, ..., i_D)
    return w.reshape(math.prod(out_modes), math.prod(in_modes))  # (J, I)


def _reconstruction_macs(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    tree = ht_tree(len(in_modes))
    size = _node_sizes(in_modes, out_modes, tree)
    macs = 0
    for t in tree.internal:
        left, right = tree.children[t]  # type: ignore[misc]
        ra, rc, rt = ranks[left], ranks[right], ranks[t]
        macs += size[left] * ra * rc * rt + size[left] * size[right] * rc * rt
    left, right = tree.children[tree.root]  # type: ignore[misc]
    macs += size[left] * ranks[left] * ranks[right] + size[left] * ranks[right] * size[right]
    return macs


# --- factorized product ---

# Axis labels of the intermediate tensor: ("i", d) input mode, ("j", d) output mode,
# ("a", node) the open rank bond from ``node`` to its parent.
_Label = tuple[str, int]


@dataclass(frozen=True)
class HTStep:
    """One contraction of :func:`ht_linear`: an optional permutation of the intermediate, then a
    matrix product of a contiguous block of its axes with a small operator.

    Attributes:
        kind: ``"leaf"`` (``i_d -> j_d, a_d``), ``"fused"`` (a leaf together with its sibling's
            bond and its parent's transfer: ``a_s, i_d -> j_d, a_p``) or ``"merge"``
            (``a_L, a_R -> a_p``: two complete subtrees meet at their parent).
        node: the leaf (``leaf``, ``fused``) or the internal node (``merge``).
        axes: per-row sizes of the intermediate's labelled axes before ``perm``.
        perm: axis permutation (batch excluded) applied before the product, or ``None``.
        before, block, after: sizes ``P, K, Q`` the (permuted) intermediate is viewed as, per row.
        out: operator width ``N``; the result per row is ``(P, N, Q)``.
        out_order: how the new axes are ordered: ``"ja"``, ``"aj"`` or ``"j"`` (root, no bond).
    """

    kind: str
    node: int
    axes: tuple[int, ...]
    perm: tuple[int, ...] | None
    before: int
    block: int
    after: int
    out: int
    out_order: str


@dataclass(frozen=True)
class HTPlan:
    """The contraction schedule of :func:`ht_linear` for one shape; built by :func:`ht_plan`.

    Attributes:
        steps: the contractions in execution order.
        final_axes: per-row sizes of the labelled axes after the last step.
        final_perm: permutation of those axes into ``(j_1, ..., j_D)``, or ``None``.
        order: per internal node, whether its right child is processed first.
        macs_per_row: multiply-accumulates per input row.
        macs_fixed: multiply-accumulates of building the operators (independent of rows).
        moved_per_row: elements copied by permutations, per row.
    """

    tree: DimensionTree
    steps: tuple[HTStep, ...]
    final_axes: tuple[int, ...]
    final_perm: tuple[int, ...] | None
    order: tuple[bool, ...]
    macs_per_row: int
    macs_fixed: int
    moved_per_row: int


def _simulate(
    tree: DimensionTree,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    right_first: dict[int, bool],
) -> HTPlan:
    """Build the steps for one choice of child order, tracking the labelled axes."""
    size: dict[_Label, int] = {}
    for d in range(tree.num_modes):
        size["i", d], size["j", d] = in_modes[d], out_modes[d]
    for n in range(tree.num_nodes - 1):
        size["a", n] = ranks[n]
    axes: list[_Label] = [("i", d) for d in range(tree.num_modes)]
    steps: list[HTStep] = []
    macs_per_row = macs_fixed = moved = 0

    def bond_order(node: int) -> str:
        # put the bond on the side that faces the sibling, where its partner will appear
        if node == tree.root:
            return "j"
        return "ja" if tree.is_left_child(node) else "aj"

    def contract(kind: str, node: int, block: list[_Label], anchor: _Label, new: list[_Label]) -> None:
        nonlocal axes, macs_per_row, moved
        pos = [axes.index(lab) for lab in block]
        shape_in = tuple(size[lab] for lab in axes)
        perm = None
        if pos != list(range(pos[0], pos[0] + len(block))):
            # bring the block together around its anchor; the other axes keep their order
            rest = [lab for lab in axes if lab not in block or lab == anchor]
            k = rest.index(anchor)
            new_axes = rest[:k] + block + rest[k + 1 :]
            perm = tuple(axes.index(lab) for lab in new_axes)
            axes = new_axes
            moved += math.prod(size[lab] for lab in axes)
        start = axes.index(block[0])
        p = math.prod(size[lab] for lab in axes[:start])
        k = math.prod(size[lab] for lab in block)
        q = math.prod(size[lab] for lab in axes[start + len(block) :])
        n = math.prod(size[lab] for lab in new)
        macs_per_row += p * k * n * q
        order = "".join(lab[0] for lab in new).replace("i", "")
        steps.append(HTStep(kind, node, shape_in, perm, p, k, q, n, order or "j"))
        axes = axes[:start] + new + axes[start + len(block) :]

    def new_axes(d: int, bond_node: int) -> list[_Label]:
        order = bond_order(bond_node)
        if order == "j":
            return [("j", d)]
        return [("j", d), ("a", bond_node)] if order == "ja" else [("a", bond_node), ("j", d)]

    def visit(node: int) -> None:
        nonlocal macs_fixed
        if tree.is_leaf(node):
            contract("leaf", node, [("i", node)], ("i", node), new_axes(node, node))
            return
        left, right = tree.children[node]  # type: ignore[misc]
        first, second = (right, left) if right_first[node] else (left, right)
        visit(first)
        if tree.is_leaf(second):
            block = [("a", left), ("i", right)] if second == right else [("i", left), ("a", right)]
            contract("fused", second, block, ("i", second), new_axes(second, node))
            r_p = 1 if node == tree.root else ranks[node]
            macs_fixed += in_modes[second] * out_modes[second] * ranks[second] * ranks[first] * r_p
        else:
            visit(second)
            new = [] if node == tree.root else [("a", node)]
            contract("merge", node, [("a", left), ("a", right)], ("a", left), new)

    visit(tree.root)
    target = [("j", d) for d in range(tree.num_modes)]
    final_perm = None if axes == target else tuple(axes.index(lab) for lab in target)
    if final_perm is not None:
        moved += math.prod(out_modes)
    order = tuple(right_first[t] for t in (*tree.internal, tree.root))
    final_axes = tuple(size[lab] for lab in axes)
    return HTPlan(tree, tuple(steps), final_axes, final_perm, order, macs_per_row, macs_fixed, moved)


# Relative cost of copying one element in a permutation versus one multiply-accumulate.
_MOVE_COST = 4
# Child orders are searched exhaustively up to this many internal nodes (2**n candidates).
_MAX_SEARCH = 10


@lru_cache(maxsize=256)
def ht_plan(in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]) -> HTPlan:
    """Choose the contraction schedule of :func:`ht_linear`.

    The input is contracted with the leaves first and then up the tree; each internal node
    processes one child completely, then the other, fusing a leaf second child with its sibling's
    bond and the node's transfer tensor into one product. Every choice of which child goes first
    is simulated and the cheapest one (multiply-accumulates plus ``_MOVE_COST`` per element moved
    by a permutation) is kept, so the first product on the full input is the one that shrinks it
    most whenever that pays off overall. Beyond ``_MAX_SEARCH`` internal nodes only the
    left-first order is used.
    """
    tree = ht_tree(len(in_modes))
    nodes = (*tree.internal, tree.root)
    choices = (
        itertools.product((False, True), repeat=len(nodes))
        if len(nodes) <= _MAX_SEARCH
        else [(False,) * len(nodes)]
    )
    best: HTPlan | None = None
    for choice in choices:
        plan = _simulate(tree, in_modes, out_modes, ranks, dict(zip(nodes, choice)))
        cost = plan.macs_per_row + _MOVE_COST * plan.moved_per_row
        if best is None or cost < best.macs_per_row + _MOVE_COST * best.moved_per_row:
            best = plan
    assert best is not None
    return best


def _operator(
    step: HTStep,
    tree: DimensionTree,
    leaves: Sequence[Tensor],
    transfers: Sequence[Tensor],
    root: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
) -> Tensor:
    """The ``(K, N)`` matrix of one step, built from the (small) factors."""
    node = step.node
    if step.kind == "merge":
        core = root if node == tree.root else transfers[node - tree.num_modes]  # (a, c[, t])
        return core.reshape(step.block, step.out)  # (a*c, t)
    j, i = out_modes[node], in_modes[node]
    u = leaves[node].reshape(j, i, -1)  # (j, i, a)
    if step.kind == "leaf":
        if step.out_order == "ja":
            return u.permute(1, 0, 2).reshape(i, -1)  # (i, j*a)
        return u.permute(1, 2, 0).reshape(i, -1)  # (i, a*j)
    parent = tree.parent[node]
    core = root if parent == tree.root else transfers[parent - tree.num_modes]
    if core.dim() == 2:
        core = core.unsqueeze(-1)  # (a_L, a_R, 1)
    if tree.is_left_child(node):
        # block (i, c): c is the right sibling's bond; the leaf's bond a is summed
        v = torch.einsum("jia,act->ictj", u, core)  # (i, c, t, j)
    else:
        v = torch.einsum("jic,act->aitj", u, core)  # (a, i, t, j)
    if step.out_order == "aj":
        return v.reshape(step.block, step.out)  # (k, t*j)
    return v.transpose(2, 3).reshape(step.block, step.out)  # (k, j*t)


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

    Each step views the intermediate as ``(b*P, K, Q)`` and multiplies the block ``K`` by a small
    operator with ``matmul``; the full input is never permuted (the plan only permutes after the
    first product, and only when that is cheaper than the alternatives).

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
    for step in plan.steps:
        if step.perm is not None:
            z = z.reshape(b, *step.axes).permute(0, *(1 + p for p in step.perm))  # (b, permuted axes)
        op = _operator(step, tree, leaves, transfers, root, in_modes, out_modes)  # (k, n)
        if step.after == 1:
            z = z.reshape(b * step.before, step.block) @ op  # (b*p, n)
        else:
            z = torch.matmul(op.T, z.reshape(b * step.before, step.block, step.after))  # (b*p, n, q)
    if plan.final_perm is not None:
        z = z.reshape(b, *plan.final_axes).permute(0, *(1 + p for p in plan.final_perm))  # (b, j_1, ..., j_D)
    return z.reshape(b, math.prod(out_modes))  # (b, J)


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
        mat = w.reshape(math.prod(merged[:lo]), rows, -1).transpose(0, 1).reshape(rows, -1)  # (x_t, rest)
        u = torch.linalg.svd(mat, full_matrices=False)[0][:, : ranks[node]]  # (x_t, <=r_t)
        frames.append(torch.cat([u, u.new_zeros(rows, ranks[node] - u.shape[1])], dim=1))  # (x_t, r_t)
    transfers = []
    for t in tree.internal:
        left, right = tree.children[t]  # type: ignore[misc]
        u_t = frames[t].reshape(frames[left].shape[0], frames[right].shape[0], -1)  # (x, y, t)
        transfers.append(torch.einsum("xa,yc,xyt->act", frames[left], frames[right], u_t))  # (a, c, t)
    left, right = tree.children[tree.root]  # type: ignore[misc]
    w = w.reshape(frames[left].shape[0], frames[right].shape[0])  # (x, y)
    root = frames[left].T @ w @ frames[right]  # (a, c)
    return frames[:d], transfers, root


# --- module ---


def _orthonormal_(param: Tensor, rows: int) -> None:
    """Fill ``param`` (viewed as ``(rows, cols)``) with a random matrix whose map ``v -> M v``
    preserves squared norms: orthonormal columns when ``cols <= rows`` (exact), otherwise
    orthonormal rows scaled by ``sqrt(cols / rows)`` (exact in expectation over isotropic ``v``)."""
    cols = param.numel() // rows
    dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.randn(max(rows, cols), min(rows, cols), device=param.device, dtype=dtype)
    q, r = torch.linalg.qr(g)  # (max, min) orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1)  # Haar: fix signs
    m = q if cols <= rows else q.T * math.sqrt(cols / rows)  # (rows, cols)
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
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype:
            as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: the rank of every non-root node (default 4, the paper's UCF11 setting), or a
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
            in_features, out_features, in_modes=in_modes, out_modes=out_modes,
            num_modes=num_modes, algorithm=algorithm, device=device, dtype=dtype,
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
            for j, i, r in zip(self.out_modes, self.in_modes, self.ranks)
        )
        self.transfers = nn.ParameterList(
            nn.Parameter(torch.empty(*(self.ranks[c] for c in self.tree.children[t]), self.ranks[t], **fk))  # type: ignore[union-attr]
            for t in self.tree.internal
        )
        left, right = self.tree.children[self.tree.root]  # type: ignore[misc]
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
            x, list(self.leaves), list(self.transfers), self.root,
            self.in_modes, self.out_modes, self.plan,
        )  # (b, j)

    def to_dense(self) -> Tensor:
        return ht_to_dense(
            list(self.leaves), list(self.transfers), self.root, self.in_modes, self.out_modes
        )  # (j, i)

    def matmul_flops(self, rows: int) -> int:
        return rows * self.plan.macs_per_row + self.plan.macs_fixed

    def reconstruction_flops(self) -> int:
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
            for p, v in zip((*out.leaves, *out.transfers, out.root), (*leaves, *transfers, root)):
                p.copy_(v)
        return out
