"""KCPMatrix's initializations (``init="variance" | "orthogonal"``): the reconstructed
``W``'s scale and spectrum against the target, seeded, on several shapes."""

from __future__ import annotations

import math

import pytest
import torch

from kcprnn.formats.kcp import KCPMatrix

F64 = torch.float64

SHAPES = [  # (in, out, options)
    (256, 1024, {"rank": 12, "terms": 3}),
    (13, 1024, {"rank": 16}),
    (60, 48, {"in_modes": [[3, 4], [5, 1]], "out_modes": [[2, 4], [3, 2]], "rank": [3, 5]}),
    (
        64,
        64,
        {
            "in_modes": [[2, 2, 2], [2, 2, 2]],
            "out_modes": [[2, 2, 2], [2, 2, 2]],
            "rank": 2,
            "terms": 2,
        },
    ),
]


def _std(w: KCPMatrix) -> float:
    return float(w.to_dense().detach().pow(2).mean().sqrt())


@pytest.mark.parametrize("init", ["variance", "orthogonal"])
@pytest.mark.parametrize(("n_in", "n_out", "options"), SHAPES)
def test_reconstruction_has_the_target_std(init, n_in, n_out, options):
    # the root mean square of W over seeds is the target std
    target = 1.0 / math.sqrt(3 * 256)
    realized = []
    for seed in range(8):
        torch.manual_seed(seed)
        w = KCPMatrix(n_in, n_out, init=init, dtype=F64, **options)
        w.reset_parameters(target)
        realized.append(_std(w) ** 2)
    assert math.sqrt(sum(realized) / len(realized)) == pytest.approx(target, rel=0.15)


@pytest.mark.parametrize(
    ("n_in", "n_out", "options", "rank"),
    [
        (256, 1024, {}, 256),  # interleaved (4x2)(4x2)(2x2)(2x2) per factor: all tall
        (60, 48, {"in_modes": [[3, 4], [5, 1]], "out_modes": [[2, 4], [3, 2]]}, 2 * 4 * 3 * 1),
        (13, 1024, {}, 4),  # the narrow input: 4 x 13 is the only factor of rank > 1
    ],
)
def test_orthogonal_single_term_has_a_flat_spectrum(n_in, n_out, options, rank):
    # P = R = 1: a Kronecker product of semi-orthogonal matrices, prod min(J, I) singular
    # values, all equal, with ||W||_F^2 = std^2 * out * in
    torch.manual_seed(0)
    std = 0.05
    w = KCPMatrix(n_in, n_out, init="orthogonal", dtype=F64, **options)
    w.reset_parameters(std)
    s = torch.linalg.svdvals(w.to_dense())
    nonzero = s[s > 1e-9 * s[0]]
    assert nonzero.numel() == rank
    expected = std * math.sqrt(n_in * n_out / rank)
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, expected))


def test_orthogonal_keeps_the_rank_the_variance_rule_loses():
    # +-sigma 2 x 2 factors are singular half of the time: the variance rule's single term has a
    # rank below min(out, in), the orthogonal one never
    torch.manual_seed(3)
    ranks = {}
    for init in ("variance", "orthogonal"):
        w = KCPMatrix(256, 1024, init=init, dtype=F64)
        ranks[init] = int(torch.linalg.matrix_rank(w.to_dense()))
    assert ranks["orthogonal"] == 256
    assert ranks["variance"] < 256


def test_init_is_seeded_and_named_in_the_repr():
    for init in ("variance", "orthogonal"):
        torch.manual_seed(4)
        a = KCPMatrix(30, 20, init=init, rank=2).to_dense()
        torch.manual_seed(4)
        b = KCPMatrix(30, 20, init=init, rank=2).to_dense()
        torch.testing.assert_close(a, b)
    assert "init='variance'" in repr(KCPMatrix(30, 20, init="variance"))
    assert "init=" not in repr(KCPMatrix(30, 20))  # the default, orthogonal


def test_default_init_is_orthogonal():
    # the default draws the orthogonal init's factors: the same numbers for a seed
    torch.manual_seed(5)
    a = KCPMatrix(256, 1024, rank=2, dtype=F64).to_dense()
    torch.manual_seed(5)
    b = KCPMatrix(256, 1024, rank=2, init="orthogonal", dtype=F64).to_dense()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(5)
    c = KCPMatrix(256, 1024, rank=2, init="variance", dtype=F64).to_dense()
    assert not torch.equal(a, c)


def test_unknown_init_is_named():
    with pytest.raises(ValueError, match="unknown KCP init 'xavier'"):
        KCPMatrix(24, 12, init="xavier")
