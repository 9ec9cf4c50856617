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

The code is in three parts: the dimension tree (:mod:`kcprnn.formats._ht_tree`), the
factorized product and its plan (:mod:`kcprnn.formats._ht_product`), and here the format
itself: counts, reconstruction, hierarchical SVD, initialization and the module. The public
names of the other two are re-exported here.

Legend for shape comments: i/j input/output mode, a/c/t ranks (left child, right child, node),
x/y merged-mode indices of a left/right subtree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._cpu import CostModel
from ._base import FactorizedMatrix, listed, orthonormal_, register
from ._chain import ChainSpec, modes_spec
from ._halves import join_halves_plain
from ._ht_product import HTPlan, HTStep, ht_linear, ht_plan
from ._ht_tree import DimensionTree, ht_tree, validate_ht_ranks

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


# --- counts and reconstruction ---


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
    # by halves (kcprnn.formats._halves): the left frame times the root and the right frame,
    # each in the natural layout (small), then one product over the root's right rank
    halves = []
    for frame, (lo, hi) in (
        (frames[left] @ root, tree.spans[left]),  # (x, s)
        (frames[right], tree.spans[right]),  # (y, s)
    ):
        n = hi - lo
        pairs = [size for e in range(lo, hi) for size in (out_modes[e], in_modes[e])]
        half = frame.reshape(*pairs, -1).permute(2 * n, *range(0, 2 * n, 2), *range(1, 2 * n, 2))
        halves.append(
            half.reshape(-1, math.prod(out_modes[lo:hi]), math.prod(in_modes[lo:hi]))
        )  # (s, j_half, i_half)
    return join_halves_plain(halves[0], halves[1])  # (J, I)


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
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
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
        cost_model: CostModel | None = None,
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
            cost_model=cost_model,
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
        self._plan_cache: tuple[CostModel, HTPlan] | None = None
        self.reset_parameters()

    @property
    def plan(self) -> HTPlan:
        """The contraction schedule of :meth:`matmul` (:func:`ht_plan`): it depends on the
        shapes, the ranks and :attr:`cost_model` only, and follows changes of the model."""
        model = self.cost_model
        cached = self._plan_cache  # per model object: this runs on every call
        if cached is None or cached[0] is not model:
            cached = model, ht_plan(self.in_modes, self.out_modes, self.ranks, model)
            self._plan_cache = cached
        return cached[1]

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
                orthonormal_(u, u.shape[0])
            for b in self.transfers:
                orthonormal_(b, b.shape[0] * b.shape[1])
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

    def chain_spec(self) -> ChainSpec | None:
        # by node: leaf d (j_d, i_d, t_d), node t's transfer (t_L, t_R, t_t), the root
        # (t_L, t_R), where t_n labels node n's rank; the chain's order is found by its plan
        operands: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
        for node in range(self.tree.num_nodes):
            if self.tree.is_leaf(node):
                view = (self.out_modes[node], self.in_modes[node], self.ranks[node])
                operands.append((view, (f"j{node}", f"i{node}", f"t{node}")))
                continue
            kids = self.tree.split(node)
            top = (node,) if node != self.tree.root else ()
            shape = tuple(self.ranks[n] for n in (*kids, *top))
            operands.append((shape, tuple(f"t{n}" for n in (*kids, *top))))
        return modes_spec(self.in_modes, tuple(operands))

    def chain_tensors(self) -> list[Tensor]:
        return [*listed(self.leaves), *listed(self.transfers), self.root]  # by node

    def to_dense(self) -> Tensor:
        return ht_to_dense(
            list(self.leaves), list(self.transfers), self.root, self.in_modes, self.out_modes
        )  # (j, i)

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """MACs of :meth:`matmul`: the plan's products per row plus building its operators
        once. The plan does not depend on autograd, so training and inference count the same."""
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
