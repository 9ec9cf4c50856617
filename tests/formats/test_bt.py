"""BT format: equals Tucker (one block) and sums of Tuckers (C blocks); the published count."""

import math

import pytest
import torch

from kcprnn.formats.bt import BTMatrix, bt_linear, bt_num_params, bt_to_dense
from kcprnn.formats.tucker import TuckerMatrix, tucker_to_dense

IN_MODES, OUT_MODES = (3, 4, 2), (2, 1, 5)


def test_published_bt_lstm_count():
    # Ye et al. 2018, UCF11 BT-LSTM: 2 blocks, core ranks 4, 57,600 -> 4 x 256
    w = BTMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4, blocks=2)
    assert w.num_params == 3392 == bt_num_params([8, 20, 20, 18], [16, 4, 4, 4], [4] * 4, 2)
    assert int(w.compression_ratio) == 17388  # the paper truncates 17,388.68


def test_one_block_equals_tucker_with_the_same_parameters():
    bt = BTMatrix(
        24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=[2, 3, 2], dtype=torch.float64
    )
    tucker = TuckerMatrix(
        24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=[2, 3, 2], dtype=torch.float64
    )
    with torch.no_grad():
        for a, b in zip(tucker.factors, bt.factors, strict=True):
            a.copy_(b[0])
        tucker.core.copy_(bt.core[0])
    assert bt.num_params == tucker.num_params
    x = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(bt(x), tucker(x))
    torch.testing.assert_close(bt.to_dense(), tucker.to_dense())


def test_blocks_are_a_sum_of_tuckers():
    bt = BTMatrix(
        24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=2, blocks=3, dtype=torch.float64
    )
    expected = sum(
        tucker_to_dense([a[c] for a in bt.factors], bt.core[c], IN_MODES, OUT_MODES)
        for c in range(3)
    )
    torch.testing.assert_close(bt.to_dense(), expected)
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(bt(x), x @ expected.T)


@pytest.mark.parametrize(
    ("in_modes", "out_modes"), [((5,), (3,)), ((2, 3), (4, 1)), ((3, 1, 2, 2), (1, 2, 3, 2))]
)
def test_linear_matches_dense(in_modes, out_modes):
    ranks = (2,) * len(in_modes)
    factors = [
        torch.randn(3, i * j, r, dtype=torch.float64)
        for i, j, r in zip(in_modes, out_modes, ranks, strict=True)
    ]
    core = torch.randn(3, *ranks, dtype=torch.float64)
    x = torch.randn(4, math.prod(in_modes), dtype=torch.float64)
    torch.testing.assert_close(
        bt_linear(x, factors, core, in_modes, out_modes),
        x @ bt_to_dense(factors, core, in_modes, out_modes).T,
    )


def test_gradcheck_pure_function():
    in_modes, out_modes, ranks = (2, 3, 2), (2, 2, 1), (2, 1, 2)
    factors = [
        torch.randn(2, i * j, r, dtype=torch.float64, requires_grad=True)
        for i, j, r in zip(in_modes, out_modes, ranks, strict=True)
    ]
    core = torch.randn(2, *ranks, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, *p):
        return bt_linear(x, p[:-1], p[-1], in_modes, out_modes)

    assert torch.autograd.gradcheck(fn, (x, *factors, core))


def test_flops_scale_with_blocks():
    one = BTMatrix(24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=2)
    three = BTMatrix(24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=2, blocks=3)
    tucker = TuckerMatrix(24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=2)
    assert one.flops(5) == tucker.flops(5) and three.flops(5) == 3 * tucker.flops(5)
    assert three.reconstruction_flops() == 3 * tucker.reconstruction_flops()
    assert three.num_params == 3 * tucker.num_params


def test_repr_and_attributes():
    w = BTMatrix(24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, rank=[1, 2, 3], blocks=2)
    assert "rank=[1, 2, 3]" in repr(w) and "blocks=2" in repr(w)
    assert [tuple(a.shape) for a in w.factors] == [(2, 6, 1), (2, 4, 2), (2, 10, 3)]
    assert tuple(w.core.shape) == (2, 1, 2, 3)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be positive, got rank=0"),
        ({"rank": [2, 2]}, ValueError, r"rank needs 3 entries, got rank=\[2, 2\]"),
        ({"blocks": 0}, ValueError, "blocks must be positive, got blocks=0"),
        ({"blocks": 2.0}, TypeError, "blocks must be a positive int, got 2.0"),
    ],
)
def test_validation(options, error, match):
    with pytest.raises(error, match=match):
        BTMatrix(24, 10, in_modes=IN_MODES, out_modes=OUT_MODES, **options)


def test_from_dense_recovers_one_block_and_more_blocks_never_hurt():
    torch.manual_seed(5)
    f64 = torch.float64
    block = BTMatrix(12, 12, in_modes=[3, 4], out_modes=[4, 3], rank=[2, 3], blocks=1, dtype=f64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    dense = block.to_dense()
    got = BTMatrix.from_dense(dense, in_modes=[3, 4], out_modes=[4, 3], rank=[2, 3])
    torch.testing.assert_close(got.to_dense(), dense, rtol=1e-10, atol=1e-10)
    noise = torch.randn(12, 12, dtype=f64)
    errors = [
        (
            BTMatrix.from_dense(
                noise, in_modes=[3, 4], out_modes=[4, 3], rank=2, blocks=c
            ).to_dense()
            - noise
        )
        .norm()
        .item()
        for c in (1, 2, 3)
    ]
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < errors[0]
    with pytest.raises(ValueError, match=r"2-D weight"):
        BTMatrix.from_dense(torch.randn(3), in_modes=[3], out_modes=[1], rank=1)
