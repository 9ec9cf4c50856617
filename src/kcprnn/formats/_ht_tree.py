"""The dimension tree of the hierarchical Tucker format (:mod:`kcprnn.formats.ht`).

A balanced binary tree over the ``D`` modes. Node numbering (used by per-node ranks): leaves are
nodes ``0 .. D-1`` (node ``d`` is mode ``d``), internal nodes follow in post-order (children
before parents), and the root is the last node, ``2D - 2``. A node over modes ``[lo, hi)``
splits them into ``[lo, lo + ceil((hi - lo) / 2))`` and the rest, so ``D = 3`` gives the tree
``((0, 1), 2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..shapes import validate_ranks

__all__ = ["DimensionTree", "ht_tree", "validate_ht_ranks"]


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
