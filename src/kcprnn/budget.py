r"""Parameter budgets: a float ``rank`` in ``(0, 1]`` asks for that share of the dense matrix's
parameters, and the solver here turns it into each format's own options.

``make_matrix("tt", 256, 1024, rank=0.02)`` builds the TT-matrix whose parameter count is the
largest one of the format's candidate configurations that is not above
``0.02 * 256 * 1024`` (as tensorly-torch's float ranks do, solved for every format). The
candidates, for the modes the options give or the format's default modes:

- ``tt``, ``tr``, ``tucker``, ``ht``: every bond (node) rank ``r`` or ``r + 1``, the first ``k``
  bonds at ``r + 1``: uniform ranks, and between two uniform ranks the steps that raise one bond
  at a time, so consecutive candidates differ by one bond's share of the parameters.
- ``cp``: the CP rank ``R`` (parameters grow linearly with it).
- ``bt``: the per-block Tucker ranks as above, for the block count ``blocks`` given (default 1,
  the format's own).
- ``kcp``: the parameter count is ``P R S``, with ``S = Σ_n Σ_d I_d^(n) J_d^(n)`` fixed by the
  Kronecker split of the modes, so the budget gives the product ``k = P R = floor(target / S)``
  for each split. The splits are the interleaved one (every mode split into two balanced
  factors), the blocked one (each factor owns whole modes, :func:`blocked_splits`) and the
  aligned one (each factor one whole mode of inputs and outputs, :func:`aligned_splits`), all
  listed by :func:`configurations`; a budget builds the layout ``layout=`` or
  :data:`KCP_LAYOUT` names (another only where that one cannot fit), and ``k`` goes into the
  rank (``P = 1``, ``R = k``: :data:`KCP_PREFERENCE`), or for the aligned layout into the terms
  (``P = k``, ``R = 1``). Given ``terms`` or nested modes, only the rank is solved.
- ``dense``: ``rank=1.0`` is the dense matrix itself; any smaller budget is an error.

Options the caller fixed (modes, ``terms``, ``blocks``) are kept; only the free ones are solved.
When even the smallest candidate (rank 1) is above the target, that smallest candidate is used
and a warning is logged on the ``"kcprnn"`` logger: a format cannot store less. So the solved
count is never above ``max(target, smallest)``, and every candidate between it and the target is
absent from the list: it is the closest from below.

:func:`configurations` lists, for a shape and a budget, each format's candidate configurations
with their parameter counts and multiply-accumulates as the CPU plans them (no compiled kernel
is built; the dense matrix and any above 16M parameters are made on the ``"meta"`` device).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .shapes import balanced_factors, resolve_modes

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_CAP",
    "DEFAULT_WIDE_COUNT",
    "DEFAULT_WIDE_FLOOR",
    "KCP_LAYOUT",
    "KCP_LAYOUTS",
    "KCP_PREFERENCE",
    "SOLVED_FORMATS",
    "Configuration",
    "aligned_splits",
    "blocked_splits",
    "budget_options",
    "candidates",
    "configurations",
    "is_budget",
    "split_budget",
    "validate_budget",
]

log = logging.getLogger("kcprnn")

KCP_LAYOUT = "blocked"
"""The Kronecker split a KCP budget builds: ``"blocked"`` (:func:`blocked_splits`) or
``"interleaved"`` (every mode split in two balanced factors, the paper's form). With ``P = 1``
the matrix is one Kronecker product ``A ⊗ B``, and the rank only makes ``A`` and ``B`` more
general: the interleaved split's two factors are as small as the split allows (``64 x 16``
each for ``1024 x 256``), so a budget's rank soon exceeds what they can use, while the blocked
split's first factor holds most of the matrix (``512 x 16``) and takes the rank usefully (FSDD,
docs/accuracy.md: 98.3 % against 97.4 % at the same 32x)."""

KCP_LAYOUTS = ("blocked", "interleaved", "aligned")
"""The Kronecker splits a KCP budget can build; ``layout=`` next to a budget ``rank`` picks one
(default :data:`KCP_LAYOUT`): :func:`blocked_splits`, the interleaved one, or
:func:`aligned_splits` (terms of two full matrices; where the input has at least two modes)."""

KCP_PREFERENCE = "rank"
"""How KCP spends the product ``k = P R`` a budget leaves: ``"rank"`` (``P = 1``, ``R = k``)
or ``"terms"`` (``P = k``, ``R = 1``)."""


DEFAULT_BUDGET = 1 / 32
"""The share of their dense parameters that a recurrent cell's compressed matrices store
together when no ``rank`` is given (:func:`split_budget`)."""

DEFAULT_CAP = 1 / 4
"""The largest share of its own dense parameters :func:`split_budget` gives one matrix."""

DEFAULT_WIDE_COUNT = 2
"""A compressed matrix larger than ``W_hh`` counts in a cell's default budget at most at this
many times ``W_hh``'s dense size (so a wide input raises the budget by a bounded amount)."""

DEFAULT_WIDE_FLOOR = 12_288
"""A compressed matrix larger than ``W_hh`` stores by default at least this many parameters, or
:data:`DEFAULT_BUDGET` of itself where that is fewer: the even split of a wide input's bounded
count would leave a few hundred inputs (the spike stand-in's 700 channels at hidden 128) 1/117
of ``W_ih``; a very wide input (57,600 pixels at hidden 256) gets this many from the split."""

SOLVED_FORMATS = frozenset({"bt", "cp", "ht", "kcp", "tr", "tt", "tucker"})
"""The compressed formats the solver turns a budget into options for (``"dense"`` takes only
``rank=1.0``)."""

_CPU_PLAN_LIMIT = 1 << 24  # parameters up to which configurations() plans on a real CPU matrix


def is_budget(rank: object) -> bool:
    """Whether ``rank`` is a budget: a real number that is not an integer type (``0.1``,
    ``1.0``, ``numpy.float32(0.5)``; not ``4``, ``True`` or a sequence)."""
    return isinstance(rank, numbers.Real) and not isinstance(rank, numbers.Integral)


def validate_budget(rank: object) -> float:
    """The budget as a float in ``(0, 1]``, else a ``ValueError`` naming the value."""
    if not is_budget(rank):
        raise TypeError(f"a parameter budget is a float in (0, 1], got rank={rank!r}")
    value = float(rank)  # type: ignore[arg-type]
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            "a float rank is a parameter budget, the share of the dense matrix's parameters, "
            f"and must lie in (0, 1]; got rank={rank!r} (an int gives the rank itself)"
        )
    return value


@dataclass(frozen=True)
class Configuration:
    """One candidate configuration of a format for an ``(out_features, in_features)`` matrix.

    Attributes:
        format: the format name.
        options: the options that build it with :func:`~kcprnn.formats.make_matrix` (with the
            caller's own options they were solved with).
        num_params: parameters it stores.
        dense_params: ``in_features * out_features``.
        macs: multiply-accumulates of a forward product on one row (inference; filled by
            :func:`configurations`, ``-1`` where not computed).
    """

    format: str
    options: dict[str, Any]
    num_params: int
    dense_params: int
    macs: int = -1
    label: str = field(default="", compare=False)

    @property
    def fraction(self) -> float:
        """``num_params / dense_params``: the budget this configuration uses."""
        return self.num_params / self.dense_params

    @property
    def compression(self) -> float:
        """``dense_params / num_params``."""
        return self.dense_params / self.num_params


# --- candidates per format ---


def _largest_uniform(count: Callable[[tuple[int, ...]], int], num_bonds: int, target: float) -> int:
    """The largest ``r >= 1`` whose uniform ranks fit ``target`` (1 when none does), by doubling
    and bisection: counts grow with every rank."""
    if count((1,) * num_bonds) > target:
        return 1
    lo, hi = 1, 2
    while count((hi,) * num_bonds) <= target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count((mid,) * num_bonds) <= target else (lo, mid)
    return lo


def _scan(
    count: Callable[[tuple[int, ...]], int], num_bonds: int, target: float
) -> list[tuple[tuple[int, ...], int]]:
    """``(ranks, params)`` in non-decreasing parameter order, from uniform ranks one below the
    largest uniform fit, raising one bond at a time (the first ``k`` bonds at ``r + 1``), up to
    the first one above ``target`` (included, so the list is never empty)."""
    r = max(1, _largest_uniform(count, num_bonds, target) - 1)
    out: list[tuple[tuple[int, ...], int]] = []
    while True:
        for k in range(num_bonds):
            ranks = (r + 1,) * k + (r,) * (num_bonds - k)
            n = count(ranks)
            out.append((ranks, n))
            if n > target:
                return out
        r += 1


def _rank_option(ranks: tuple[int, ...]) -> int | list[int]:
    return ranks[0] if len(set(ranks)) == 1 else list(ranks)


def _modes(in_features: int, out_features: int, options: dict[str, Any]) -> tuple[tuple, tuple]:
    return resolve_modes(
        in_features,
        out_features,
        options.get("in_modes"),
        options.get("out_modes"),
        options.get("num_modes"),
    )


def blocked_splits(
    in_modes: Sequence[int], out_modes: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """KCP's blocked layout for two Kronecker factors: factor 1 owns the leading half of the
    input modes and all output modes but the smallest factor (> 1) of the first one, factor 2
    the trailing input modes and that factor.

    Factor 2's inputs are then the contiguous trailing block of every row, so the sequential
    product runs its first GEMM on a view of the input with no gathering copy, and its ``J^(2)``
    outputs per ``I^(2)`` inputs keep that GEMM cheap; taking them from the first output mode
    leaves factor 1's later output modes as one contiguous run, so the final reordering of the
    output moves blocks of ``J_2 ⋯ J_D`` numbers instead of single ones.

    Example:
        >>> blocked_splits([8, 20, 20, 18], [16, 4, 4, 4])
        ([[8, 1], [20, 1], [1, 20], [1, 18]], [[8, 2], [4, 1], [4, 1], [4, 1]])
    """
    half = len(in_modes) // 2
    ins = [[int(m), 1] if d < half else [1, int(m)] for d, m in enumerate(in_modes)]
    first = int(out_modes[0])
    small = next((f for f in range(2, first + 1) if first % f == 0), 1)
    outs = [[first // small, small]] + [[int(m), 1] for m in out_modes[1:]]
    return ins, outs


def aligned_splits(
    in_modes: Sequence[int], out_features: int
) -> tuple[list[list[int]], list[list[int]]]:
    """KCP's aligned layout for two Kronecker factors: factor 1 takes the leading half of the
    input modes merged into one mode, factor 2 the rest, and the outputs are split between them
    so that the two factors' matrices are about equally large (``J_1 I_1`` nearest ``J_2
    I_2``). Each factor then owns one whole mode of inputs and outputs: every term ``A_p ⊗ B_p``
    is a Kronecker product of two full matrices (Van Loan's nearest Kronecker sum), and a rank
    above 1 adds nothing, so a budget spends itself on terms. For stacked speech frames,
    ``[3, 80]`` frames by bands with 1,024 gates: ``A_p`` 128 x 3 across frames, ``B_p`` 8 x 80
    across bands.

    Example:
        >>> aligned_splits([3, 80], 1024)
        ([[3, 1], [1, 80]], [[128, 1], [1, 8]])
    """
    half = max(1, len(in_modes) // 2)
    i1, i2 = math.prod(in_modes[:half]), math.prod(in_modes[half:])
    divisors = [j for j in range(1, out_features + 1) if out_features % j == 0]
    j2 = min(divisors, key=lambda j: (abs(out_features // j * i1 - j * i2), j))
    return [[i1, 1], [1, i2]], [[out_features // j2, 1], [1, j2]]


def _kcp_candidates(
    in_features: int, out_features: int, options: dict[str, Any], target: float
) -> list[Configuration]:
    from .formats.kcp.algebra import kcp_num_params, resolve_kcp_splits

    dense = in_features * out_features
    in_splits, out_splits, n = resolve_kcp_splits(
        in_features,
        out_features,
        options.get("in_modes"),
        options.get("out_modes"),
        options.get("num_factors"),
    )
    layouts: list[tuple[str, Any, Any]] = []
    if in_splits is not None and out_splits is not None:
        layouts.append(("given", in_splits, out_splits))
    else:
        flat = {
            k: (None if s is not None else options.get(k))
            for k, s in (("in_modes", in_splits), ("out_modes", out_splits))
        }
        im, om = _modes(in_features, out_features, {**options, **flat})
        ins = in_splits or tuple(balanced_factors(m, n) for m in im)
        outs = out_splits or tuple(balanced_factors(m, n) for m in om)
        layouts.append(("interleaved", ins, outs))
        if n == 2 and in_splits is None and out_splits is None:
            bi, bo = blocked_splits(im, om)
            layouts.append(("blocked", bi, bo))
            if len(im) > 1:
                layouts.append(("aligned", *aligned_splits(im, out_features)))
    out = []
    for name, ins, outs in layouts:
        s = kcp_num_params(ins, outs, (1,) * n, 1)  # S: parameters per unit of P R
        fixed_terms = options.get("terms")
        unit = s * (fixed_terms or 1)
        k_max = max(1, math.floor(target / unit))
        for k in sorted({1, k_max, k_max + 1}):
            if fixed_terms is not None:
                terms, rank = fixed_terms, k
            elif KCP_PREFERENCE == "terms" or name == "aligned":
                terms, rank = k, 1
            else:
                terms, rank = 1, k
            opts = {"rank": rank, "terms": terms}
            if name != "given" or in_splits is None:
                opts["in_modes"] = [list(x) for x in ins]
                opts["out_modes"] = [list(x) for x in outs]
            out.append(
                Configuration(
                    "kcp", opts, kcp_num_params(ins, outs, (rank,) * n, terms), dense, label=name
                )
            )
    return out


def candidates(
    format: str, in_features: int, out_features: int, budget: float, **options: Any
) -> list[Configuration]:
    """Candidate configurations of ``format`` around ``budget`` (see the module docstring),
    sorted by parameter count; the list reaches the first candidate above the target, so the
    solution is the last one not above it. ``options`` are the caller's fixed options (modes,
    ``terms``, ``blocks``, ...); ``rank`` among them is ignored."""
    from .formats import FORMATS

    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {sorted(FORMATS)}")
    budget = validate_budget(budget)
    options = {k: v for k, v in options.items() if k != "rank"}
    dense = in_features * out_features
    target = budget * dense
    found: list[Configuration]
    if format == "dense":
        found = [Configuration("dense", {}, dense, dense)]
    elif format == "kcp":
        found = _kcp_candidates(in_features, out_features, options, target)
    else:
        found = _ranked_candidates(format, in_features, out_features, options, target)
    return sorted(found, key=lambda c: (c.num_params, c.label != "interleaved"))


def _ranked_candidates(
    format: str, in_features: int, out_features: int, options: dict[str, Any], target: float
) -> list[Configuration]:
    from .formats.cp import cp_num_params
    from .formats.ht import ht_num_params
    from .formats.tr import tr_num_params
    from .formats.tt import tt_num_params
    from .formats.tucker import tucker_num_params

    dense = in_features * out_features
    im, om = _modes(in_features, out_features, options)
    d = len(im)
    count: Callable[[tuple[int, ...]], int]
    if format == "cp":  # linear in the rank: the largest fit directly
        top = max(1, math.floor(target / cp_num_params(im, om, 1)))
        return [
            Configuration("cp", {"rank": r}, cp_num_params(im, om, r), dense)
            for r in sorted({1, max(1, top - 1), top, top + 1})
        ]
    if format == "tt":
        bonds = d - 1
        if bonds == 0:  # one core: the matrix itself
            return [Configuration("tt", {"rank": 1}, tt_num_params(im, om, (1, 1)), dense)]

        def count(r: tuple[int, ...]) -> int:
            return tt_num_params(im, om, (1, *r, 1))

    elif format == "tr":
        bonds = d

        def count(r: tuple[int, ...]) -> int:
            return tr_num_params(im, om, r)

    elif format == "ht":
        if d < 2:
            raise ValueError(
                f"the HT format needs at least 2 modes, got in_modes={list(im)}, "
                f"out_modes={list(om)}"
            )
        bonds = 2 * d - 2

        def count(r: tuple[int, ...]) -> int:
            return ht_num_params(im, om, r)

    elif format in ("tucker", "bt"):
        bonds = d
        if format == "bt":
            return _bt_candidates(im, om, options, target, dense)

        def count(r: tuple[int, ...]) -> int:
            return tucker_num_params(im, om, r)

    else:
        raise ValueError(f"format {format!r} has no parameter-budget solver")
    return [
        Configuration(format, {"rank": _rank_option(r)}, n, dense)
        for r, n in _scan(count, bonds, target)
    ]


def _bt_candidates(
    im: tuple, om: tuple, options: dict[str, Any], target: float, dense: int
) -> list[Configuration]:
    from .formats.bt import bt_num_params

    blocks = options.get("blocks", 1)  # the format's default: one block
    return [
        Configuration("bt", {"rank": _rank_option(r), "blocks": blocks}, n, dense)
        for r, n in _scan(lambda r: bt_num_params(im, om, r, blocks), len(im), target)
    ]


def _solve(found: list[Configuration], target: float, layout: str = KCP_LAYOUT) -> Configuration:
    fits = [c for c in found if c.num_params <= target]
    preferred = [c for c in fits if c.label == layout]
    fits = preferred or fits
    if not fits:
        return found[0]
    best = max(c.num_params for c in fits)
    # ties: the earliest in the sorted list (among KCP fallbacks, the interleaved layout)
    return next(c for c in fits if c.num_params == best)


def split_budget(
    sizes: Sequence[int],
    budget: float = DEFAULT_BUDGET,
    cap: float = DEFAULT_CAP,
    *,
    base: int | None = None,
) -> list[float]:
    """Shares of their own dense sizes for matrices stored together in ``budget`` of ``base``
    parameters (default: their summed dense sizes): the total ``budget * base`` is split evenly
    in parameters, no matrix above ``cap`` of its own size, the remainder split evenly among the
    others (what no matrix can take under its cap is left unused).

    A narrow input matrix (an LSTM's ``1024 x 13`` next to its ``1024 x 256`` hidden one) gets
    ``cap`` of itself and the hidden one the rest; matrices of equal size get ``budget`` each.

    Example:
        >>> [round(s, 5) for s in split_budget([1024 * 13, 1024 * 256])]
        [0.25, 0.02014]
        >>> split_budget([1024 * 256, 1024 * 256])
        [0.03125, 0.03125]
    """
    budget = validate_budget(budget)
    cap = validate_budget(cap)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes):
        raise ValueError(f"sizes must be positive ints, got {list(sizes)!r}")
    if base is None:
        base = sum(sizes)
    elif isinstance(base, bool) or not isinstance(base, int) or base <= 0:
        raise ValueError(f"base must be a positive int, got base={base!r}")
    left = budget * base
    shares: dict[int, float] = {}
    open_ = sorted(range(len(sizes)), key=lambda k: sizes[k])  # smallest caps first
    while open_:
        even = left / len(open_)
        k = open_[0]
        if even > cap * sizes[k]:  # the smallest one is capped; the rest re-split
            shares[k] = cap
            left -= cap * sizes[k]
            open_.pop(0)
            continue
        for k in open_:
            shares[k] = min(cap, even / sizes[k])
        break
    return [shares[k] for k in range(len(sizes))]


def budget_options(
    format: str,
    in_features: int,
    out_features: int,
    options: dict[str, Any],
    *,
    warn: bool = True,
) -> dict[str, Any]:
    """``options`` with the budget ``options["rank"]`` replaced by the solved configuration's
    options (what :func:`~kcprnn.formats.make_matrix` does with a float rank). ``warn=False``
    drops the warning when the smallest configuration is above the budget."""
    budget = validate_budget(options.get("rank"))
    layout = options.get("layout", KCP_LAYOUT)
    if format != "kcp" and "layout" in options:
        raise ValueError(f"layout={layout!r} is a KCP budget option, not one of {format!r}")
    if layout not in KCP_LAYOUTS:
        raise ValueError(f"layout must be one of {list(KCP_LAYOUTS)}, got layout={layout!r}")
    options = {k: v for k, v in options.items() if k != "layout"}
    found = candidates(format, in_features, out_features, budget, **options)
    target = budget * in_features * out_features
    if format == "dense":
        if budget != 1.0:
            raise ValueError(
                f"the dense format stores every entry: its only parameter budget is rank=1.0, "
                f"got rank={options['rank']!r}"
            )
        return {k: v for k, v in options.items() if k != "rank"}
    best = _solve(found, target, layout)
    if best.num_params > target and warn:
        log.warning(
            "%s (%d x %d): budget %g asks for %.1f parameters, below the smallest "
            "configuration (%s, %d parameters); using that one",
            format,
            out_features,
            in_features,
            budget,
            target,
            best.options,
            best.num_params,
        )
    return {**{k: v for k, v in options.items() if k != "rank"}, **best.options}


def configurations(
    in_features: int,
    out_features: int,
    budget: float,
    formats: Sequence[str] | None = None,
    *,
    rows: int = 1,
    limit: int | None = 8,
    **options: Any,
) -> dict[str, list[Configuration]]:
    """Per format, the candidate configurations that fit ``budget`` (a share of the dense
    matrix's parameters, in ``(0, 1]``): first the one ``rank=budget`` builds, then the others
    that fit, largest first. A format whose smallest configuration is above the budget lists
    that one alone.
    ``macs`` are of a forward product on ``rows`` rows (inference), as the format plans it;
    ``limit`` keeps the largest few per format (``None``: all). ``options`` are fixed options
    every format accepts (``in_modes``, ``out_modes``, ``num_modes``).

    Example:
        >>> best = configurations(256, 1024, 0.02, ["tt"])["tt"][0]
        >>> best.num_params <= 0.02 * 256 * 1024, best.options
        (True, {'rank': [10, 10, 9]})
    """
    from .formats import FORMATS, make_matrix

    names = sorted(FORMATS) if formats is None else list(formats)
    target = validate_budget(budget) * in_features * out_features
    out: dict[str, list[Configuration]] = {}
    for name in names:
        found = candidates(name, in_features, out_features, budget, **options)
        best = _solve(found, target)
        fits = [c for c in found if c.num_params <= target and c != best]
        listed = []
        for c in [best, *sorted(fits, key=lambda c: -c.num_params)][:limit]:
            fixed = {k: v for k, v in options.items() if k not in ("rank", "device")}
            # the CPU's plan (a "meta" matrix plans for no device); huge ones stay unallocated
            device = "cpu" if c.num_params <= _CPU_PLAN_LIMIT and name != "dense" else "meta"
            m = make_matrix(name, in_features, out_features, **fixed, **c.options, device=device)
            listed.append(
                Configuration(
                    c.format, c.options, m.num_params, c.dense_params, m.macs(rows), c.label
                )
            )
        out[name] = listed
    return out
