"""TT-matrix: hand-computed cases, published parameter counts, TT-SVD, both sweeps, validation."""

import itertools
import math

import pytest
import torch

from kcprnn._cpu import CostModel
from kcprnn.formats.tt import (
    ORDERS,
    TTMatrix,
    ring_chunk_rows,
    ring_contraction_order,
    ring_intermediate_size,
    ring_linear_flops,
    tt_linear,
    tt_num_params,
    tt_svd,
    tt_to_dense,
    validate_tt_ranks,
)

F64 = torch.float64


def loop_reference(cores):
    """W[j, i] by the definition: the product of the core slices, one entry at a time."""
    out_modes = [c.shape[1] for c in cores]
    in_modes = [c.shape[2] for c in cores]
    w = torch.empty(math.prod(out_modes), math.prod(in_modes), dtype=cores[0].dtype)
    for j, jj in enumerate(itertools.product(*map(range, out_modes))):
        for i, ii in enumerate(itertools.product(*map(range, in_modes))):
            prod = torch.eye(1, dtype=cores[0].dtype)
            for core, jd, id_ in zip(cores, jj, ii, strict=True):
                prod = prod @ core[:, jd, id_, :]
            w[j, i] = prod[0, 0]
    return w


def test_one_core_is_a_plain_matrix():
    w = TTMatrix(5, 3, in_modes=[5], out_modes=[3], dtype=F64)
    assert w.ranks == (1, 1) and w.num_params == 15
    m = w.cores[0][0, :, :, 0]
    torch.testing.assert_close(w.to_dense(), m)
    x = torch.randn(4, 5, dtype=F64)
    for order in ORDERS:
        torch.testing.assert_close(tt_linear(x, list(w.cores), order), x @ m.T)


def test_two_cores_of_rank_one_are_a_kronecker_product():
    w = TTMatrix(12, 6, in_modes=[3, 4], out_modes=[2, 3], rank=1, dtype=F64)
    a, b = w.cores[0][0, :, :, 0], w.cores[1][0, :, :, 0]
    torch.testing.assert_close(w.to_dense(), torch.kron(a, b))
    x = torch.randn(5, 12, dtype=F64)
    for order in ORDERS:
        torch.testing.assert_close(tt_linear(x, list(w.cores), order), x @ torch.kron(a, b).T)


@pytest.mark.parametrize("order", ORDERS)
def test_matches_entrywise_definition(order):
    cores = [
        torch.randn(1, 2, 3, 2, dtype=F64),
        torch.randn(2, 3, 1, 3, dtype=F64),
        torch.randn(3, 1, 2, 2, dtype=F64),
        torch.randn(2, 2, 2, 1, dtype=F64),
    ]
    ref = loop_reference(cores)
    torch.testing.assert_close(tt_to_dense(cores), ref)
    x = torch.randn(3, 12, dtype=F64)
    torch.testing.assert_close(tt_linear(x, cores, order), x @ ref.T)


def test_published_parameter_counts():
    # TT-LSTM and TT-GRU on UCF11 (Yang et al. 2017): gates folded into the first output mode
    lstm = TTMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=4)
    gru = TTMatrix(57600, 768, in_modes=[8, 20, 20, 18], out_modes=[12, 4, 4, 4], rank=4)
    assert lstm.num_params == 3360 and gru.num_params == 3232
    # 1*16*8*4 + 4*4*20*4 + 4*4*20*4 + 4*4*18*1
    assert 512 + 1280 + 1280 + 288 == 3360
    assert tt_num_params(lstm.in_modes, lstm.out_modes, lstm.ranks) == 3360
    assert round(57600 * 1024 / lstm.num_params) == 17554


def test_rank_forms_are_equivalent():
    assert validate_tt_ranks(3, 4) == (1, 3, 3, 3, 1)
    assert validate_tt_ranks([2, 3, 4], 4) == (1, 2, 3, 4, 1)
    assert validate_tt_ranks([1, 2, 3, 4, 1], 4) == (1, 2, 3, 4, 1)
    assert validate_tt_ranks(5, 1) == (1, 1)
    w = TTMatrix(24, 10, in_modes=[3, 4, 2], out_modes=[2, 1, 5], rank=[2, 3])
    assert [tuple(c.shape) for c in w.cores] == [(1, 2, 3, 2), (2, 1, 4, 3), (3, 5, 2, 1)]
    assert "ranks=[1, 2, 3, 1]" in repr(w)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        ([2, 3], ValueError, r"D=4 cores needs the 3 inner ranks .*rank=\[2, 3\] \(2\)"),
        ([2, 2, 3, 4, 1], ValueError, r"r_0 = r_D = 1; got rank=\[2, 2, 3, 4, 1\]"),
        ([1, 2, 3, 4, 2], ValueError, r"r_0 = r_D = 1"),
        ([2, 0, 3], ValueError, r"rank\[1\] must be positive"),
        (0, ValueError, "rank must be positive, got rank=0"),
        (2.5, TypeError, "rank must be a positive int, got 2.5"),
        (True, TypeError, "rank must be a positive int, got True"),
        ("4", TypeError, "rank must be a positive int, got '4'"),
    ],
)
def test_rank_validation(rank, error, match):
    with pytest.raises(error, match=match):
        TTMatrix(57600, 1024, in_modes=[8, 20, 20, 18], out_modes=[16, 4, 4, 4], rank=rank)


def test_unknown_order():
    cores = [torch.randn(1, 2, 3, 1)]
    with pytest.raises(ValueError, match="order must be one of .*got order='middle'"):
        tt_linear(torch.randn(2, 3), cores, "middle")
    with pytest.raises(ValueError, match="order must be one of .*got order='middle'"):
        ring_linear_flops([3], [2], [1, 1], 2, "middle")


@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_both_orders(order):
    cores = [
        torch.randn(1, 2, 3, 2, dtype=F64),
        torch.randn(2, 3, 2, 3, dtype=F64),
        torch.randn(3, 2, 2, 1, dtype=F64),
    ]
    cores = [c.requires_grad_() for c in cores]
    x = torch.randn(3, 12, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *c: tt_linear(x, c, order), (x, *cores))


def test_flops_hand_count():
    # in (3, 4), out (2, 5), ranks (1, 2, 1), 7 rows
    # right to left: (7*3, 4) @ (4, 2*5) -> 7*3*4*10; then (7*5, 3*2) @ (6, 2) -> 7*5*6*2
    assert ring_linear_flops([3, 4], [2, 5], [1, 2, 1], 7, "right_to_left") == 840 + 420
    # left to right: (2*2, 3) @ (3, 4) per row -> 7*4*3*4; then (5, 2*4) @ (8, 1) per (row, j1)
    assert ring_linear_flops([3, 4], [2, 5], [1, 2, 1], 7, "left_to_right") == 336 + 560
    w = TTMatrix(12, 10, in_modes=[3, 4], out_modes=[2, 5], rank=2)
    assert w.contraction_order(7) == "left_to_right"
    assert w.flops(7) == 896
    assert w.reconstruction_flops() == 2 * 5 * 2 * 3 * 4  # rows(J1 I1) * ranks * (J2 I2)


def test_cost_model_starts_at_the_cheap_end():
    # gates folded into J_1 = 16: contracting I_4 first costs a quarter of contracting I_1 first
    args = ([8, 20, 20, 18], [16, 4, 4, 4], [1, 4, 4, 4, 1], 96)
    assert ring_contraction_order(*args) == "right_to_left"
    assert ring_linear_flops(*args, "right_to_left") < ring_linear_flops(*args, "left_to_right") / 2
    # mirrored shapes: the mirrored choice
    assert ring_contraction_order([18, 20, 20, 8], [4, 4, 4, 16], [1, 4, 4, 4, 1], 96) == (
        "left_to_right"
    )


def test_tt_svd_full_rank_reproduces_matrix():
    weight = torch.randn(10, 24, dtype=F64)
    w = TTMatrix.from_dense(weight, in_modes=[3, 4, 2], out_modes=[2, 1, 5], rank=1000)
    assert w.ranks == (1, 6, 10, 1)  # capped at the unfolding ranks
    assert w.cores[0].dtype == F64
    torch.testing.assert_close(w.to_dense(), weight, rtol=0, atol=1e-12)
    x = torch.randn(3, 24, dtype=F64)
    torch.testing.assert_close(w(x), x @ weight.T)


def test_tt_svd_recovers_a_low_rank_tt_and_error_falls_with_rank():
    modes = dict(in_modes=[4, 3, 4], out_modes=[3, 4, 2])
    target = TTMatrix(48, 24, rank=3, dtype=F64, **modes)
    weight = target.to_dense().detach()
    exact = TTMatrix.from_dense(weight, rank=3, **modes)
    torch.testing.assert_close(exact.to_dense(), weight, rtol=0, atol=1e-12)
    noisy = weight / weight.norm() + 0.3 * torch.randn_like(weight) / math.sqrt(weight.numel())
    errors = [
        (TTMatrix.from_dense(noisy, rank=r, **modes).to_dense() - noisy).norm().item()
        for r in (1, 2, 3, 6, 12)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-12


def test_tt_svd_keeps_weight_dtype_and_rejects_vectors():
    weight = torch.randn(6, 8)
    cores = tt_svd(weight, (2, 4), (3, 2), (1, 2, 1))
    assert [c.dtype for c in cores] == [torch.float32] * 2
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2, 2), (2, 2, 4, 1)]
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(8,\)"):
        TTMatrix.from_dense(torch.randn(8))


def test_init_std_with_unequal_ranks():
    w = TTMatrix(120, 48, in_modes=[4, 6, 5], out_modes=[4, 3, 4], rank=[2, 5], dtype=F64)
    second = []
    for seed in range(20):
        torch.manual_seed(seed)
        w.reset_parameters(0.1)
        second.append(w.to_dense().pow(2).mean())
    assert torch.stack(second).mean().sqrt().item() == pytest.approx(0.1, rel=0.15)


@pytest.mark.parametrize("rank", [[2, 5], [20, 30]], ids=["ranks-below-rows", "rank-above-rows"])
def test_orthogonal_init(rank):
    """``init="orthogonal"``: every core but the last has orthonormal columns in its
    ``(r_{d-1} J I, r_d)`` unfolding where ``r_d`` fits (orthonormal rows scaled where it does
    not), times one scale shared by all cores, and every draw's ``W`` has mean square ``std²``
    exactly where all fit, within 20 % averaged over draws otherwise."""
    torch.manual_seed(3)
    w0 = TTMatrix(120, 48, in_modes=[4, 6, 5], out_modes=[4, 3, 4], rank=rank, dtype=F64)
    w = TTMatrix(
        120, 48, in_modes=[4, 6, 5], out_modes=[4, 3, 4], rank=rank, dtype=F64, init="orthogonal"
    )
    assert "init='orthogonal'" in repr(w) and "init=" not in repr(w0)
    squares = []
    for seed in range(10):
        torch.manual_seed(seed)
        w.reset_parameters(0.1)
        scale = (0.1 * math.sqrt(120 * 48)) ** (2 / 3)  # every core's share of ||W||², squared
        for core in list(w.cores)[:-1]:
            m = core.detach().reshape(-1, core.shape[-1])  # (r J I, r')
            if m.shape[1] <= m.shape[0]:
                torch.testing.assert_close(m.T @ m, scale * torch.eye(m.shape[1], dtype=F64))
            else:
                ratio = scale * m.shape[1] / m.shape[0]
                torch.testing.assert_close(m @ m.T, ratio * torch.eye(m.shape[0], dtype=F64))
        squares.append(w.to_dense().detach().pow(2).mean().item())
    if rank == [2, 5]:
        assert squares == pytest.approx([0.01] * 10, rel=1e-9)
    else:
        assert math.sqrt(sum(squares) / 10) == pytest.approx(0.1, rel=0.2)


def test_unknown_init_is_refused():
    with pytest.raises(
        ValueError,
        match=r"init must be one of \('uniform', 'orthogonal'\), "
        r"got init='qr'",
    ):
        TTMatrix(12, 8, in_modes=[3, 4], out_modes=[2, 4], init="qr")


@pytest.mark.parametrize("order", ORDERS)
def test_rows_swept_in_chunks(order):
    cores = [
        torch.randn(1, 2, 3, 2, dtype=F64),
        torch.randn(2, 3, 2, 3, dtype=F64),
        torch.randn(3, 2, 2, 1, dtype=F64),
    ]
    # per row, right to left: after core 3 (I_1 I_2, r_2 J_3) = 6 * 6, after core 2
    # (I_1, r_1 J_2, J_3) = 3 * 6 * 2; left to right: after core 2 (J_1 J_2, r_2, I_3) = 6 * 3 * 2.
    # 100 entries make chunks of 2 rows: 7 rows run as 2 + 2 + 2 + 1
    shape = ([3, 2, 2], [2, 3, 2], [1, 2, 3, 1])
    assert ring_intermediate_size(*shape, "right_to_left") == 36
    assert ring_intermediate_size(*shape, "left_to_right") == 36
    small = CostModel().replace(tt_chunk_entries=100)
    assert ring_chunk_rows(*shape, order, small) == 2
    assert ring_chunk_rows(*shape, order) > 7  # the default does not split 7 rows
    x = torch.randn(7, 12, dtype=F64, requires_grad=True)
    reference = x @ tt_to_dense(cores).T
    torch.testing.assert_close(tt_linear(x, cores, order, cost_model=small), reference)
    assert torch.autograd.gradcheck(lambda x: tt_linear(x, cores, order, cost_model=small), (x,))
    # the module sweeps with its own cost model
    w = TTMatrix(12, 12, in_modes=[3, 2, 2], out_modes=[2, 3, 2], rank=[2, 3], dtype=F64)
    w.cost_model = small
    with torch.no_grad():
        for param, core in zip(w.cores, cores, strict=True):
            param.copy_(core)
    torch.testing.assert_close(w(x), reference)


def test_module_chunks_with_its_cost_model(monkeypatch):
    import kcprnn.formats._ring as ring_module

    sizes = []
    for name in ("_sweep_right_to_left", "_sweep_left_to_right"):
        sweep = getattr(ring_module, name)

        def spy(x, cores, sweep=sweep):
            sizes.append(x.shape[0])
            return sweep(x, cores)

        monkeypatch.setattr(ring_module, name, spy)
    small = CostModel().replace(tt_chunk_entries=100)
    w = TTMatrix(12, 12, in_modes=[3, 2, 2], out_modes=[2, 3, 2], rank=[2, 3], cost_model=small)
    w(torch.randn(7, 12))
    assert sizes == [2, 2, 2, 1]  # 36 entries per row in either sweep
    sizes.clear()
    w.cost_model = None  # the default model: one sweep
    w(torch.randn(7, 12))
    assert sizes == [7]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("ring", [1, 2])
def test_empty_batch(order, ring):
    cores = [torch.randn(ring, 2, 3, 2), torch.randn(2, 3, 2, ring)]
    cores = [c.requires_grad_() for c in cores]
    y = tt_linear(torch.randn(0, 6), cores, order)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert all(torch.equal(c.grad, torch.zeros_like(c)) for c in cores)
