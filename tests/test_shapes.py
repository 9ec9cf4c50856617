import math

import pytest

from kcprnn.shapes import balanced_factors, default_num_modes, resolve_modes, validate_ranks


@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [
        (57600, 4, (16, 16, 15, 15)),
        (1024, 4, (8, 8, 4, 4)),
        (7, 2, (7, 1)),
        (1, 3, (1, 1, 1)),
        (12, 1, (12,)),
        (36, 2, (6, 6)),
    ],
)
def test_balanced_factors_hand_checked(n, d, expected):
    assert balanced_factors(n, d) == expected


@pytest.mark.parametrize("n", [2, 96, 360, 4096, 230400])
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_balanced_factors_product_and_order(n, d):
    f = balanced_factors(n, d)
    assert len(f) == d and math.prod(f) == n and list(f) == sorted(f, reverse=True)
    # no other split has a smaller sum: check against brute force on the small cases
    if n <= 360 and d <= 3:

        def splits(m, k):
            if k == 1:
                yield (m,)
                return
            for a in range(1, m + 1):
                if m % a == 0:
                    for rest in splits(m // a, k - 1):
                        yield (a, *rest)

        assert sum(f) == min(sum(s) for s in splits(n, d))


def test_default_num_modes():
    assert default_num_modes(57600, 1024) == 4
    assert default_num_modes(8, 100) == 3
    assert default_num_modes(1, 100) == 1


def test_resolve_modes_fills_missing_side():
    assert resolve_modes(57600, 1024, [8, 20, 20, 18], None) == ((8, 20, 20, 18), (8, 8, 4, 4))
    assert resolve_modes(12, 6, None, None, num_modes=2) == ((4, 3), (3, 2))


def test_resolve_modes_errors():
    with pytest.raises(ValueError, match=r"out_modes=\[2, 2\] multiply to 4, but out_features=6"):
        resolve_modes(12, 6, None, [2, 2])
    with pytest.raises(ValueError, match="same length"):
        resolve_modes(12, 6, [3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match=r"in_modes\[1\]"):
        resolve_modes(12, 6, [12, 0], None)
    with pytest.raises(TypeError, match="in_features"):
        resolve_modes(12.0, 6, None, None)
    with pytest.raises(ValueError, match="num_modes=3 disagrees"):
        resolve_modes(12, 6, [3, 4], None, num_modes=3)


def test_validate_ranks():
    assert validate_ranks(3, 2) == (3, 3)
    assert validate_ranks([1, 2], 2) == (1, 2)
    with pytest.raises(ValueError, match=r"rank needs 3 entries"):
        validate_ranks([1, 2], 3)
    with pytest.raises(ValueError, match=r"rank\[1\]=0|rank\[1\] must be positive"):
        validate_ranks([1, 0], 2)
