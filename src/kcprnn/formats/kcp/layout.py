"""The plain data of KCP's plans: what each product does to the rows, as typed values.

Nothing here touches tensors. A :class:`KCPPlan` names one way to evaluate ``x @ W.T``; the
sequential product's :class:`Walk` lists its :class:`SeqStep` s, each bringing one factor's
input :class:`Axis` es together (:class:`GatherMode`) for one GEMM. The geometry helpers below
(block transposes, contiguous runs, the final reordering, the inner product's mode orders)
are shared by the planner (:mod:`.plan`, :mod:`.walk`) and the products.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..._cpu.cost import CostModel
    from .algebra import Splits

__all__ = [
    "Axis",
    "AxisKind",
    "GatherMode",
    "KCPPlan",
    "SeqStep",
    "Swap",
    "Walk",
    "final_gathers",
    "inner_orders",
    "inner_out_modes",
    "input_axes",
    "inverse",
    "run_of",
    "swaps_to_end",
]


@dataclass(frozen=True)
class KCPPlan:
    """One way to evaluate ``x @ W.T``.

    ``algorithm`` is ``"parallel"`` (``split`` = first axis of the suffix chunk) or
    ``"sequential"`` (``order`` = factors in the order they are applied; ``inner``, when set,
    applies the last factor, on the small data left by the others, as its own rank-``R_n`` CP
    product cut at that mode instead of through its dense matrix; its modes are taken in
    ``inner_order``, which moves modes with one input index into the prefix). ``macs`` counts
    every multiply-accumulate (building the small dense matrices included), ``cost`` is the
    modelled time in MAC equivalents, ``peak`` the largest intermediate, ``kernel_saving`` what
    the forward saves by running tall GEMMs on the compiled kernel or oneDNN (the model prices
    their backward without it)."""

    algorithm: str
    split: int = 0
    order: tuple[int, ...] = ()
    macs: int = 0
    cost: float = 0.0
    peak: int = 0
    inner: int | None = None  # sequential: the last factor as its own CP product cut here
    inner_order: tuple[int, ...] = ()  # its modes in that product's order (empty: 0..D-1)
    kernel_saving: float = 0.0  # modelled forward cost saved by the kernel and oneDNN


class AxisKind(enum.Enum):
    """What an axis of the rows indexes."""

    INPUT = "i"  # an input index i_d^(n), not yet contracted
    OUTPUT = "j"  # an output index j_d^(n), produced by factor n
    TERM = "p"  # the Kronecker term p, open between the first and the last factor


@dataclass(frozen=True)
class Axis:
    """One axis of a row's layout: its kind, size and, for input and output axes, the mode
    ``d`` and factor ``n`` it belongs to."""

    kind: AxisKind
    size: int
    mode: int | None = None
    factor: int | None = None


class GatherMode(enum.Enum):
    """How a step brings its factor's axes together before its GEMM."""

    NONE = "none"  # already one contiguous block of the layout: a view
    SWAPS = "swaps"  # block transposes (:class:`Swap`)
    PERMUTE = "permute"  # one permute copy
    NATIVE = "native"  # the same permutation in one pass of the compiled gather (torch's
    # permute copy where that does not run)
    PBATCHED = "pbatched"  # permute to (p, b, rest, group), one BMM per term, back


class Swap(NamedTuple):
    """One block transpose of every row: ``(pre, m, k, post) -> (pre, k, m, post)``."""

    pre: int
    m: int
    k: int
    post: int


@dataclass(frozen=True)
class SeqStep:
    """One factor of the sequential product on the row layout ``(b, *axes)`` (size-1 axes are
    dropped). ``gather`` says how the factor's axes (``group``) are brought together; ``swaps``
    are the block transposes of :attr:`GatherMode.SWAPS`, ``perm`` the permutation of the axes
    after the rows of ``PERMUTE``, ``NATIVE`` and ``PBATCHED``. The contraction itself is a GEMM
    over ``f`` with ``g`` outputs on the view ``(b pre, f, post)``."""

    factor: int
    gather: GatherMode
    group: tuple[Axis, ...]
    swaps: tuple[Swap, ...] = ()
    perm: tuple[int, ...] = ()
    pre: int = 1
    f: int = 1
    post: int = 1
    g: int = 1
    axes: tuple[Axis, ...] = ()  # the layout after the step


@dataclass(frozen=True)
class Walk:
    """Everything the sequential product needs besides the data: the steps, the final
    permutation of the output axes (empty: none), the input axes, the output size, the number
    of terms, whether the final reordering runs as an ``index_select`` (:func:`final_gathers`),
    whether the last step is the last factor's own CP product (``inner``), and the cost model
    whose routing the GEMMs follow."""

    steps: tuple[SeqStep, ...]
    final: tuple[int, ...]
    in_axes: tuple[Axis, ...]
    out_features: int
    terms: int
    gathers: bool
    inner: bool
    model: CostModel

    def __hash__(self) -> int:
        # computed once: walks key caches looked up at every call of the product
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(
                (self.steps, self.final, self.in_axes, self.out_features, self.terms)
                + (self.gathers, self.inner, self.model)
            )
            object.__setattr__(self, "_hash", cached)
        return cached


def input_axes(in_splits: Splits) -> tuple[Axis, ...]:
    """The input's axes after the rows, mode-major and factor-minor, size-1 axes dropped."""
    return tuple(
        Axis(AxisKind.INPUT, s, d, n)
        for d, split in enumerate(in_splits)
        for n, s in enumerate(split)
        if s > 1
    )


def swaps_to_end(sizes: Sequence[int], flags: Sequence[bool]) -> list[Swap]:
    """Block transposes moving the flagged axes behind the others, both keeping their order."""
    sizes, flags = list(sizes), list(flags)
    out: list[Swap] = []
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
            Swap(
                math.prod(sizes[:s]),
                math.prod(sizes[s:e]),
                math.prod(sizes[e:f]),
                math.prod(sizes[f:]),
            )
        )
        sizes = sizes[:s] + sizes[e:f] + sizes[s:e] + sizes[f:]
        flags = flags[:s] + flags[e:f] + flags[s:e] + flags[f:]


def run_of(sizes: Sequence[int], perm: Sequence[int]) -> int:
    """The contiguous run of a permute copy: the trailing axes it leaves in place."""
    run, t = 1, len(perm) - 1
    while t >= 0 and perm[t] == t:
        run *= sizes[t]
        t -= 1
    return run


def final_gathers(sizes: Sequence[int], perm: Sequence[int], min_run: int) -> bool:
    """Whether the final reordering of the output axes ``sizes`` into ``perm`` runs as one
    ``index_select`` of every row rather than a permuted copy: where, after merging the axes
    that stay adjacent (size-1 axes ignored), more than two axes remain and the contiguous run
    the reordering leaves is under ``min_run`` numbers (the cost model's
    ``final_gather_run``). Strided copies with short runs and many axes crawl; a flat gather
    costs the same for every order."""
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
    return run < min_run


def inner_orders(in_sizes: Sequence[int]) -> list[tuple[tuple[int, ...], int]]:
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


def inner_out_modes(
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    order: Sequence[int],
    split: int,
    narrow: int,
) -> tuple[int, ...]:
    """The modes of the inner CP product's output, in the order the parallel product lays them
    out: prefix then suffix, or suffix then prefix when the suffix has fewer than ``narrow``
    outputs (the cost model's ``narrow``: step 2 then runs as one tall GEMM)."""
    order = tuple(order) or tuple(range(len(in_sizes)))
    head, tail = order[:split], order[split:]
    if split and math.prod(out_sizes[d] for d in tail) < narrow:
        return (*tail, *head)
    return order


def inverse(perm: Sequence[int]) -> list[int]:
    """The inverse permutation."""
    inv = [0] * len(perm)
    for t, q in enumerate(perm):
        inv[q] = t
    return inv
