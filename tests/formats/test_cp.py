"""CP format: hand-computed cases, counts, validation, gradcheck of the pure functions."""

import math

import pytest
import torch

import kcprnn.formats.cp as cp_module
from kcprnn._cpu import CostModel
from kcprnn.formats.cp import (
    CPMatrix,
    cp_als,
    cp_linear,
    cp_linear_flops,
    cp_num_params,
    cp_reconstruction_flops,
    cp_to_dense,
)


def _factors(in_modes, out_modes, rank, dtype=torch.float64):
    return [torch.randn(rank, j, i, dtype=dtype) for i, j in zip(in_modes, out_modes, strict=True)]


def test_rank_one_two_modes_is_kron():
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    w = cp_to_dense([a[None], b[None]])
    torch.testing.assert_close(w, torch.kron(a, b))


def test_rank_r_is_sum_of_krons():
    factors = _factors((2, 3, 2), (3, 1, 2), rank=3)
    u, v, t = factors
    expected = sum(torch.kron(torch.kron(u[r], v[r]), t[r]) for r in range(3))
    torch.testing.assert_close(cp_to_dense(factors), expected)


def test_element_formula():
    factors = _factors((2, 3), (3, 2), rank=2)
    w = cp_to_dense(factors)
    # W[j, i] with j = j_1 * 2 + j_2, i = i_1 * 3 + i_2
    j1, j2, i1, i2 = 2, 1, 1, 2
    expected = sum(factors[0][r, j1, i1] * factors[1][r, j2, i2] for r in range(2))
    torch.testing.assert_close(w[j1 * 2 + j2, i1 * 3 + i2], expected)


@pytest.mark.parametrize(
    ("in_modes", "out_modes"), [((5,), (3,)), ((2, 3), (4, 1)), ((3, 1, 2, 2), (1, 2, 3, 2))]
)
def test_linear_matches_dense(in_modes, out_modes):
    factors = _factors(in_modes, out_modes, rank=2)
    x = torch.randn(4, math.prod(in_modes), dtype=torch.float64)
    torch.testing.assert_close(cp_linear(x, factors), x @ cp_to_dense(factors).T)


def test_gradcheck_pure_function():
    factors = [f.requires_grad_() for f in _factors((2, 3, 2), (2, 2, 1), rank=2)]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *f: cp_linear(x, f), (x, *factors))


def test_counts_by_hand():
    # R * sum(I_d J_d) = 4 * (8*16 + 20*4 + 20*4 + 18*4)
    assert cp_num_params([8, 20, 20, 18], [16, 4, 4, 4], 4) == 4 * 360 == 1440
    w = CPMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4)
    assert w.num_params == 1440
    # steps D..1 on (3, 2) -> (2, 5), rank 2, b rows: 2*b*5*(3*2) + 2*b*(2*5)*3
    assert cp_linear_flops(7, (3, 2), (2, 5), 2) == 2 * 7 * 5 * 6 + 2 * 7 * 10 * 3
    # merged sizes 6, 10: R * 6 * 10
    assert cp_reconstruction_flops((3, 2), (2, 5), 2) == 120


def test_init_std_targets_reconstruction():
    w = CPMatrix(120, 48, in_modes=(4, 6, 5), out_modes=(4, 3, 4), rank=5, dtype=torch.float64)
    stds = []
    for seed in range(10):
        torch.manual_seed(seed)
        w.reset_parameters(0.02)
        stds.append(w.to_dense().pow(2).mean())
    assert torch.stack(stds).mean().sqrt().item() == pytest.approx(0.02, rel=0.1)


def test_repr_and_attributes():
    w = CPMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=3)
    assert "rank=3" in repr(w) and w.rank == 3
    assert [tuple(f.shape) for f in w.factors] == [(3, 2, 3), (3, 1, 4), (3, 5, 2)]
    assert [n for n, _ in w.named_parameters()] == ["factors.0", "factors.1", "factors.2"]


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (0, ValueError, "rank must be positive, got rank=0"),
        (-2, ValueError, "rank must be positive"),
        (2.5, TypeError, "rank must be a positive int, got 2.5"),
        ([2, 2], TypeError, r"rank must be a positive int, got \[2, 2\]"),
        (True, TypeError, "rank must be a positive int"),
    ],
)
def test_rank_validation(rank, error, match):
    with pytest.raises(error, match=match):
        CPMatrix(24, 10, rank=rank)


def test_from_dense_recovers_an_exact_cp():
    in_modes, out_modes = (3, 2, 2), (2, 3, 2)
    weight = cp_to_dense(_factors(in_modes, out_modes, rank=2))
    w = CPMatrix.from_dense(weight, in_modes=in_modes, out_modes=out_modes, rank=2)
    assert w.rank == 2 and w.factors[0].dtype == torch.float64
    torch.testing.assert_close(w.to_dense(), weight, rtol=1e-8, atol=1e-8)
    # the column norms are balanced over the factors
    norms = torch.stack([u.detach().flatten(1).norm(dim=1) for u in w.factors])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))


def test_from_dense_rank_one_is_the_best_kron_fit():
    # a rank-1 CP of a sum of two Krons cannot be exact; ALS must not do worse than the
    # leading singular pair of the rearranged matrix (Van Loan-Pitsianis), which is optimal
    weight = cp_to_dense(_factors((3, 2), (2, 3), rank=2))
    w = CPMatrix.from_dense(weight, in_modes=(3, 2), out_modes=(2, 3), rank=1)
    rearranged = weight.reshape(2, 3, 3, 2).permute(0, 2, 1, 3).reshape(6, 6)
    best = torch.linalg.svdvals(rearranged)[1:].norm()
    assert (w.to_dense() - weight).norm() <= best * (1 + 1e-6)


def test_from_dense_one_mode():
    weight = torch.randn(3, 4, dtype=torch.float64)
    w = CPMatrix.from_dense(weight, in_modes=(4,), out_modes=(3,), rank=2)
    torch.testing.assert_close(w.to_dense(), weight)


def test_from_dense_errors():
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(4,\)"):
        CPMatrix.from_dense(torch.randn(4))
    with pytest.raises(ValueError, match="rank must be positive, got rank=0"):
        cp_als(torch.randn(4, 6), (3, 2), (2, 2), 0)


def test_row_chunks_give_the_same_product():
    factors = _factors((3, 2, 2), (2, 3, 1), rank=3)
    x = torch.randn(7, 12, dtype=torch.float64)
    whole = cp_linear(x, factors)
    small = CostModel().replace(tucker_chunk_elements=40)  # 84 elements -> 3 chunks
    chunked = cp_linear(x, factors, cost_model=small)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked, x @ cp_to_dense(factors).T)


def test_module_chunks_rows_with_its_cost_model(monkeypatch):
    seen = []
    chunks = cp_module.map_row_chunks

    def spy(fn, x, chunk_elements=None):
        seen.append(chunk_elements)
        return chunks(fn, x, chunk_elements)

    monkeypatch.setattr(cp_module, "map_row_chunks", spy)
    small = CostModel().replace(tucker_chunk_elements=40)
    w = CPMatrix(12, 6, in_modes=(3, 2, 2), out_modes=(2, 3, 1), rank=3, cost_model=small)
    x = torch.randn(7, 12)
    torch.testing.assert_close(w(x), x @ w.to_dense().T)
    w.cost_model = None
    w(x)
    assert seen == [40, CostModel().tucker_chunk_elements]
