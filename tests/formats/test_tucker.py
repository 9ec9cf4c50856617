"""Tucker format: hand-computed cases, HOSVD, counts, validation, gradcheck of pure functions."""

import math

import pytest
import torch

import kcprnn.formats.tucker as tucker_module
from kcprnn._cpu import CostModel
from kcprnn.formats.tucker import (
    TuckerMatrix,
    hosvd,
    tucker_linear,
    tucker_linear_flops,
    tucker_num_params,
    tucker_reconstruction_flops,
    tucker_to_dense,
)


def _tucker(in_modes, out_modes, ranks, dtype=torch.float64):
    shapes = zip(in_modes, out_modes, ranks, strict=True)
    factors = [torch.randn(i * j, r, dtype=dtype) for i, j, r in shapes]
    return factors, torch.randn(ranks, dtype=dtype)


def test_identity_factors_give_the_core_rearranged():
    in_modes, out_modes = (3, 2), (2, 4)
    core = torch.randn(6, 8, dtype=torch.float64)  # full ranks: R_d = J_d I_d
    factors = [torch.eye(6, dtype=torch.float64), torch.eye(8, dtype=torch.float64)]
    w = tucker_to_dense(factors, core, in_modes, out_modes)
    # core[(j_1, i_1), (j_2, i_2)] -> W[(j_1, j_2), (i_1, i_2)]
    expected = core.reshape(2, 3, 4, 2).permute(0, 2, 1, 3).reshape(8, 6)
    torch.testing.assert_close(w, expected)


def test_element_formula():
    (a1, a2), core = _tucker((2, 3), (3, 2), (2, 3))
    w = tucker_to_dense([a1, a2], core, (2, 3), (3, 2))
    j1, j2, i1, i2 = 1, 1, 0, 2
    expected = sum(
        core[r, s] * a1[j1 * 2 + i1, r] * a2[j2 * 3 + i2, s] for r in range(2) for s in range(3)
    )
    torch.testing.assert_close(w[j1 * 2 + j2, i1 * 3 + i2], expected)


def test_rank_one_is_kron():
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    core = torch.full((1, 1), 2.5, dtype=torch.float64)
    w = tucker_to_dense([a.reshape(-1, 1), b.reshape(-1, 1)], core, (2, 5), (3, 4))
    torch.testing.assert_close(w, 2.5 * torch.kron(a, b))


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "ranks"),
    [
        ((5,), (3,), (2,)),
        ((2, 3), (4, 1), (3, 2)),
        ((3, 1, 2, 2), (1, 2, 3, 2), (2, 1, 3, 2)),
    ],
)
def test_linear_matches_dense(in_modes, out_modes, ranks):
    factors, core = _tucker(in_modes, out_modes, ranks)
    x = torch.randn(4, math.prod(in_modes), dtype=torch.float64)
    torch.testing.assert_close(
        tucker_linear(x, factors, core, in_modes, out_modes),
        x @ tucker_to_dense(factors, core, in_modes, out_modes).T,
    )


def test_gradcheck_pure_function():
    in_modes, out_modes = (2, 3, 2), (2, 2, 1)
    factors, core = _tucker(in_modes, out_modes, (2, 3, 2))
    params = [p.requires_grad_() for p in (*factors, core)]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, *p):
        return tucker_linear(x, p[:-1], p[-1], in_modes, out_modes)

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_hosvd_full_rank_reproduces_weight():
    in_modes, out_modes = (3, 2, 2), (2, 2, 3)
    weight = torch.randn(12, 12, dtype=torch.float64)
    w = TuckerMatrix.from_dense(weight, in_modes=in_modes, out_modes=out_modes, rank=[6, 4, 6])
    assert w.core.dtype == torch.float64
    torch.testing.assert_close(w.to_dense(), weight, rtol=1e-12, atol=1e-12)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ weight.T)


def test_hosvd_truncated_recovers_low_multilinear_rank():
    in_modes, out_modes, ranks = (3, 4), (2, 3), (2, 3)
    factors, core = _tucker(in_modes, out_modes, ranks)
    weight = tucker_to_dense(factors, core, in_modes, out_modes)
    w = TuckerMatrix.from_dense(weight, in_modes=in_modes, out_modes=out_modes, rank=list(ranks))
    torch.testing.assert_close(w.to_dense(), weight)
    # the factors are orthonormal, as HOSVD promises
    for a in w.factors:
        torch.testing.assert_close(a.T @ a, torch.eye(a.shape[1], dtype=torch.float64))


def test_hosvd_rank_too_large():
    with pytest.raises(ValueError, match=r"rank\[1\] <= .* = 6, got rank\[1\]=7"):
        hosvd(torch.randn(6, 6), (3, 2), (2, 3), (2, 7))


def test_from_dense_needs_a_matrix():
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(2, 3, 4\)"):
        TuckerMatrix.from_dense(torch.randn(2, 3, 4))


def test_counts_by_hand():
    # sum(I_d J_d R_d) + prod(R_d) = 4 * 360 + 256
    assert tucker_num_params([8, 20, 20, 18], [16, 4, 4, 4], [4] * 4) == 1696
    w = TuckerMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=[1, 2, 3])
    assert w.num_params == 6 * 1 + 4 * 2 + 10 * 3 + 6
    # (3, 2) -> (2, 5), ranks (2, 3), b rows: mode 2: b*(3*5)*(3*2); core: b*5*3*2*3; mode 1:
    # b*5*3*2*2
    b = 7
    expected = b * 15 * 6 + b * 5 * 3 * 2 * 3 + b * 5 * 3 * 2 * 2
    assert tucker_linear_flops(b, (3, 2), (2, 5), (2, 3)) == expected
    # merged modes (6, 10): mode 2 first, core (2, 3) times A_2^T (3, 10): 2*3*10; then
    # A_1 (6, 2) times that (2, 10): 6*2*10
    assert tucker_reconstruction_flops((3, 2), (2, 5), (2, 3)) == 60 + 120


def test_repr_and_attributes():
    w = TuckerMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=2)
    assert "rank=[2, 2, 2]" in repr(w) and w.ranks == (2, 2, 2)
    assert [tuple(a.shape) for a in w.factors] == [(6, 2), (4, 2), (10, 2)]
    assert tuple(w.core.shape) == (2, 2, 2)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (0, ValueError, "rank must be positive, got rank=0"),
        ([2, 0, 1], ValueError, r"rank\[1\] must be positive"),
        ([2, 2], ValueError, r"rank needs 3 entries, got rank=\[2, 2\] \(2\)"),
        (1.5, TypeError, "rank must be a positive int, got 1.5"),
        ([2, "a", 1], TypeError, r"rank\[1\] must be a positive int"),
    ],
)
def test_rank_validation(rank, error, match):
    with pytest.raises(error, match=match):
        TuckerMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=rank)


def test_row_chunks_give_the_same_product():
    in_modes, out_modes, ranks = (3, 2, 2), (2, 3, 1), (2, 3, 2)
    factors, core = _tucker(in_modes, out_modes, ranks)
    x = torch.randn(7, 12, dtype=torch.float64)
    whole = tucker_linear(x, factors, core, in_modes, out_modes)
    small = CostModel().replace(tucker_chunk_elements=30)  # 84 elements -> 3 chunks of 3 rows
    chunked = tucker_linear(x, factors, core, in_modes, out_modes, cost_model=small)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked, x @ tucker_to_dense(factors, core, in_modes, out_modes).T)


def test_module_chunks_rows_with_its_cost_model(monkeypatch):
    seen = []
    chunks = tucker_module.map_row_chunks

    def spy(fn, x, chunk_elements=None):
        seen.append(chunk_elements)
        return chunks(fn, x, chunk_elements)

    monkeypatch.setattr(tucker_module, "map_row_chunks", spy)
    small = CostModel().replace(tucker_chunk_elements=30)
    w = TuckerMatrix(12, 6, in_modes=(3, 2, 2), out_modes=(2, 3, 1), rank=2, cost_model=small)
    x = torch.randn(7, 12)
    torch.testing.assert_close(w(x), x @ w.to_dense().T)
    w.cost_model = None
    w(x)
    assert seen == [30, CostModel().tucker_chunk_elements]


@pytest.mark.parametrize(("limit", "sizes"), [(10, [5]), (4, [2, 2, 1]), (1, [1, 1, 1, 1, 1])])
def test_map_row_chunks_split(limit, sizes):
    seen = []
    x = torch.arange(10.0).reshape(5, 2)

    def fn(part):
        seen.append(part.shape[0])
        return part * 2

    torch.testing.assert_close(tucker_module.map_row_chunks(fn, x, limit), x * 2)
    assert seen == sizes  # ceil(10 / limit) chunks of equal rows, at most one per row
