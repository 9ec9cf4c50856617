"""Tensor ring: hand-computed cases, the TT special case, TR-SVD, both sweeps, validation."""

import itertools
import math

import pytest
import torch

from kcprnn.formats.tr import TRMatrix, tr_linear, tr_num_params, tr_svd, tr_to_dense
from kcprnn.formats.tt import ORDERS, TTMatrix, tt_to_dense

F64 = torch.float64


def loop_reference(cores):
    """W[j, i] by the definition: the trace of the product of the core slices."""
    out_modes = [c.shape[1] for c in cores]
    in_modes = [c.shape[2] for c in cores]
    w = torch.empty(math.prod(out_modes), math.prod(in_modes), dtype=cores[0].dtype)
    for j, jj in enumerate(itertools.product(*map(range, out_modes))):
        for i, ii in enumerate(itertools.product(*map(range, in_modes))):
            prod = torch.eye(cores[0].shape[0], dtype=cores[0].dtype)
            for core, jd, id_ in zip(cores, jj, ii, strict=True):
                prod = prod @ core[:, jd, id_, :]
            w[j, i] = torch.trace(prod)
    return w


@pytest.mark.parametrize("order", ORDERS)
def test_matches_entrywise_definition(order):
    cores = [
        torch.randn(2, 2, 3, 3, dtype=F64),
        torch.randn(3, 3, 1, 1, dtype=F64),
        torch.randn(1, 1, 2, 2, dtype=F64),
        torch.randn(2, 2, 2, 2, dtype=F64),
    ]
    ref = loop_reference(cores)
    torch.testing.assert_close(tr_to_dense(cores), ref)
    x = torch.randn(3, 12, dtype=F64)
    torch.testing.assert_close(tr_linear(x, cores, order), x @ ref.T)


def test_one_core_ring_sums_the_diagonal_slices():
    w = TRMatrix(5, 3, in_modes=[5], out_modes=[3], rank=3, dtype=F64)
    g = w.cores[0]  # (3, 3, 5, 3)
    ref = g[0, :, :, 0] + g[1, :, :, 1] + g[2, :, :, 2]
    torch.testing.assert_close(w.to_dense(), ref)
    x = torch.randn(4, 5, dtype=F64)
    for order in ORDERS:
        torch.testing.assert_close(tr_linear(x, list(w.cores), order), x @ ref.T)


def test_ring_rank_one_is_the_tt_with_the_same_cores():
    tr = TRMatrix(24, 10, in_modes=[3, 4, 2], out_modes=[2, 1, 5], rank=[1, 3, 2], dtype=F64)
    tt = TTMatrix(24, 10, in_modes=[3, 4, 2], out_modes=[2, 1, 5], rank=[3, 2], dtype=F64)
    tt.load_state_dict(tr.state_dict())
    torch.testing.assert_close(tr.to_dense(), tt.to_dense())
    x = torch.randn(4, 24, dtype=F64)
    torch.testing.assert_close(tr(x), tt(x))
    assert tr.num_params == tt.num_params


def test_trace_is_cyclic():
    # rotating the cores by one permutes the modes of W the same way
    cores = [
        torch.randn(2, 2, 3, 3, dtype=F64),
        torch.randn(3, 3, 2, 4, dtype=F64),
        torch.randn(4, 2, 2, 2, dtype=F64),
    ]
    w = tr_to_dense(cores).reshape(2, 3, 2, 3, 2, 2)  # (j1, j2, j3, i1, i2, i3)
    rotated = tr_to_dense(cores[1:] + cores[:1]).reshape(3, 2, 2, 2, 2, 3)
    torch.testing.assert_close(rotated, w.permute(1, 2, 0, 4, 5, 3))


def test_parameter_counts():
    w = TRMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4)
    assert w.num_params == 16 * (16 * 8 + 4 * 20 + 4 * 20 + 4 * 18) == 5760
    w = TRMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=[1, 2, 3, 4])
    # bonds (1, 2, 3, 4, 1)
    assert w.num_params == 1 * 16 * 8 * 2 + 2 * 4 * 20 * 3 + 3 * 4 * 20 * 4 + 4 * 4 * 18 * 1 == 1984
    assert tr_num_params(w.in_modes, w.out_modes, w.ranks) == 1984
    assert [tuple(c.shape) for c in w.cores][-1] == (4, 4, 18, 1)
    assert "ranks=[1, 2, 3, 4]" in repr(w)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        ([2, 3, 4], ValueError, r"rank needs 4 entries, got rank=\[2, 3, 4\] \(3\)"),
        ([2, 3, 4, 2, 2], ValueError, r"rank needs 4 entries"),
        ([2, 0, 3, 1], ValueError, r"rank\[1\] must be positive"),
        (-1, ValueError, "rank must be positive, got rank=-1"),
        (1.0, TypeError, "rank must be a positive int, got 1.0"),
    ],
)
def test_rank_validation(rank, error, match):
    with pytest.raises(error, match=match):
        TRMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=rank)


@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_both_orders(order):
    cores = [
        torch.randn(2, 2, 3, 2, dtype=F64),
        torch.randn(2, 1, 2, 3, dtype=F64),
        torch.randn(3, 2, 2, 2, dtype=F64),
    ]
    cores = [c.requires_grad_() for c in cores]
    x = torch.randn(2, 12, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *c: tr_linear(x, c, order), (x, *cores))


def test_tr_svd_full_rank_reproduces_matrix():
    weight = torch.randn(10, 24, dtype=F64)
    w = TRMatrix.from_dense(weight, in_modes=[3, 4, 2], out_modes=[2, 1, 5], rank=100)
    torch.testing.assert_close(w.to_dense(), weight, rtol=0, atol=1e-12)
    x = torch.randn(3, 24, dtype=F64)
    torch.testing.assert_close(w(x), x @ weight.T)


def test_tr_svd_error_falls_with_rank():
    modes = dict(in_modes=[4, 3, 4], out_modes=[3, 4, 2])
    weight = torch.randn(24, 48, dtype=F64)
    errors = [
        (TRMatrix.from_dense(weight, rank=r, **modes).to_dense() - weight).norm().item()
        for r in (1, 2, 3, 4)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors))


def test_tr_svd_ring_of_rank_one_is_tt_svd():
    weight = torch.randn(6, 8, dtype=F64)
    cores = tr_svd(weight, (2, 4), (3, 2), (1, 2))
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2, 2), (2, 2, 4, 1)]
    tt = TTMatrix.from_dense(weight, in_modes=(2, 4), out_modes=(3, 2), rank=2)
    torch.testing.assert_close(tt_to_dense(cores), tt.to_dense().detach())


def test_tr_svd_closes_the_ring_with_the_requested_rank():
    weight = torch.randn(16, 16, dtype=F64)
    cores = tr_svd(weight, (4, 4), (4, 4), (2, 3))
    assert [tuple(c.shape) for c in cores] == [(2, 4, 4, 3), (3, 4, 4, 2)]
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(2, 3, 4\)"):
        TRMatrix.from_dense(torch.randn(2, 3, 4))


def test_orthogonal_init():
    """``init="orthogonal"``: every core's ``(r_{d-1} J I, r_d)`` unfolding has orthonormal
    columns up to one shared scale, and ``W``'s mean square averaged over draws is ``std²``
    within 15 %."""
    w = TRMatrix(
        120, 48, in_modes=[4, 6, 5], out_modes=[4, 3, 4], rank=3, dtype=F64, init="orthogonal"
    )
    assert "init='orthogonal'" in repr(w)
    squares = []
    for seed in range(20):
        torch.manual_seed(seed)
        w.reset_parameters(0.1)
        scales = []
        for core in w.cores:
            m = core.detach().reshape(-1, core.shape[-1])  # (r J I, r')
            gram = m.T @ m
            scales.append(gram[0, 0].item())
            torch.testing.assert_close(gram, scales[-1] * torch.eye(m.shape[1], dtype=F64))
        assert scales == pytest.approx([scales[0]] * len(scales))
        squares.append(w.to_dense().detach().pow(2).mean().item())
    assert math.sqrt(sum(squares) / len(squares)) == pytest.approx(0.1, rel=0.15)
