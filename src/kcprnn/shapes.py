"""Tensorized shapes: balanced factorizations of feature sizes and the validators shared by formats.

Every format views an ``(out_features, in_features)`` matrix through ``D`` modes,
``in_features = I_1 ⋯ I_D`` and ``out_features = J_1 ⋯ J_D`` (row-major flattening).
The helpers here choose such modes when the user does not, and check them when the user does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "balanced_factors",
    "default_num_modes",
    "resolve_modes",
    "validate_modes",
    "validate_positive_int",
    "validate_ranks",
]


def validate_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise with its name."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a positive int, got {value!r} of type {type(value).__name__}"
        )
    if value < 1:
        raise ValueError(f"{name} must be positive, got {name}={value}")
    return value


@lru_cache(maxsize=4096)
def _divisors(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted(set(small + [n // d for d in small])))


@lru_cache(maxsize=4096)
def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors whose product is ``n``, as equal as possible.

    "As equal as possible" means the smallest sum of factors (for a fixed product the sum is
    smallest when the factors are equal). Factors are returned in non-increasing order.

    Example:
        >>> balanced_factors(57600, 4)
        (16, 16, 15, 15)
        >>> balanced_factors(1024, 4)
        (8, 8, 4, 4)
        >>> balanced_factors(7, 2)
        (7, 1)
    """
    validate_positive_int(n, "n")
    validate_positive_int(d, "d")
    best: tuple[int, tuple[int, ...]] | None = None

    def search(rest: int, slots: int, cap: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if slots == 1:
            if rest <= cap:
                cand = acc + (rest,)
                key = sum(cand)
                if best is None or key < best[0]:
                    best = (key, cand)
            return
        # next factor f: f <= cap, and f**slots >= rest so the remaining ones can stay <= f
        for f in reversed(_divisors(rest)):
            if f > cap:
                continue
            if f**slots < rest:
                break
            if best is not None and sum(acc) + f + (slots - 1) > best[0]:
                continue
            search(rest // f, slots - 1, f, acc + (f,))

    search(n, d, n, ())
    assert best is not None
    return best[1]


def default_num_modes(in_features: int, out_features: int) -> int:
    """Number of modes ``D`` used when the user gives none.

    Four modes (the paper's UCF11 tensorization) when both sizes are large enough for every mode to
    be at least 2, otherwise as many as the smaller size allows (at least 1).
    """
    smallest = min(in_features, out_features)
    d = 4
    while d > 1 and smallest < 2**d:
        d -= 1
    return d


def validate_modes(
    features: int, modes: Sequence[int], name: str, features_name: str
) -> tuple[int, ...]:
    """Check that ``modes`` are positive ints whose product is ``features``."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or len(modes) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {modes!r}")
    out = tuple(validate_positive_int(m, f"{name}[{k}]") for k, m in enumerate(modes))
    if math.prod(out) != features:
        raise ValueError(
            f"the product of {name} must equal {features_name}: "
            f"{name}={list(out)} multiply to {math.prod(out)}, but {features_name}={features}"
        )
    return out


def resolve_modes(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    num_modes: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return validated ``(in_modes, out_modes)`` of equal length, deriving missing ones.

    A missing side is split with :func:`balanced_factors` into as many modes as the given side has
    (or ``num_modes``, or :func:`default_num_modes`).
    """
    validate_positive_int(in_features, "in_features")
    validate_positive_int(out_features, "out_features")
    if in_modes is not None:
        in_modes = validate_modes(in_features, in_modes, "in_modes", "in_features")
    if out_modes is not None:
        out_modes = validate_modes(out_features, out_modes, "out_modes", "out_features")
    if num_modes is not None:
        validate_positive_int(num_modes, "num_modes")
    d = (
        len(in_modes)
        if in_modes is not None
        else len(out_modes)
        if out_modes is not None
        else num_modes or default_num_modes(in_features, out_features)
    )
    if num_modes is not None and num_modes != d:
        raise ValueError(f"num_modes={num_modes} disagrees with the {d} modes given")
    if in_modes is None:
        in_modes = balanced_factors(in_features, d)
    if out_modes is None:
        out_modes = balanced_factors(out_features, d)
    if len(in_modes) != len(out_modes):
        raise ValueError(
            f"in_modes and out_modes need the same length: in_modes={list(in_modes)} has "
            f"{len(in_modes)}, out_modes={list(out_modes)} has {len(out_modes)}"
        )
    return tuple(in_modes), tuple(out_modes)


def validate_ranks(rank: int | Sequence[int], count: int, name: str = "rank") -> tuple[int, ...]:
    """Resolve an int (broadcast) or a sequence of ``count`` positive ints into a tuple."""
    if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if len(rank) != count:
            raise ValueError(f"{name} needs {count} entries, got {name}={list(rank)} ({len(rank)})")
        return tuple(validate_positive_int(r, f"{name}[{k}]") for k, r in enumerate(rank))
    return (validate_positive_int(rank, name),) * count
