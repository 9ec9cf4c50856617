"""KCP format: hand-computed cases, the element formula, both fast products against the dense
reconstruction, gradients, the parameter count formula, validation errors and the auto choice."""

import itertools
import math
import threading

import pytest
import torch

from kcprnn._cpu import ops
from kcprnn._cpu.cost import CostModel
from kcprnn.formats.kcp import (
    KCPMatrix,
    kcp_cost,
    kcp_linear_parallel,
    kcp_linear_sequential,
    kcp_num_params,
    kcp_plan,
    kcp_to_dense,
)
from kcprnn.formats.kcp import sequential as seq_module
from kcprnn.formats.kcp.layout import GatherMode, final_gathers, inner_orders, swaps_to_end
from kcprnn.formats.kcp.plan import parallel_plan, sequential_plan, training_cost
from kcprnn.formats.kcp.walk import sequential_walk

F64 = torch.float64
DEFAULT = CostModel()
NONE, SWAPS, PERMUTE, NATIVE, PBATCHED = (
    GatherMode.NONE,
    GatherMode.SWAPS,
    GatherMode.PERMUTE,
    GatherMode.NATIVE,
    GatherMode.PBATCHED,
)


def _sequential_walk(in_splits, out_splits, terms, order, model=DEFAULT):
    return sequential_walk(in_splits, out_splits, terms, tuple(order), model)


def factors_of(w):
    return [list(f) for f in w.factors]


def element_formula(factors, in_splits, out_splits):
    """W[j, i] by a direct loop over the indices of the format's formula."""
    num_d, num_n = len(in_splits), len(in_splits[0])
    in_sizes = [in_splits[d][n] for d in range(num_d) for n in range(num_n)]
    out_sizes = [out_splits[d][n] for d in range(num_d) for n in range(num_n)]
    terms = factors[0][0].shape[0]
    w = torch.zeros(math.prod(out_sizes), math.prod(in_sizes), dtype=F64)
    for j, jj in enumerate(itertools.product(*map(range, out_sizes))):
        for i, ii in enumerate(itertools.product(*map(range, in_sizes))):
            total = 0.0
            for p in range(terms):
                prod_n = 1.0
                for n in range(num_n):
                    sum_r = 0.0
                    for r in range(factors[n][0].shape[1]):
                        prod_d = 1.0
                        for d in range(num_d):
                            k = d * num_n + n  # mode-major, factor-minor position
                            prod_d *= factors[n][d][p, r, jj[k], ii[k]].item()
                        sum_r += prod_d
                    prod_n *= sum_r
                total += prod_n
            w[j, i] = total
    return w


def randomize(w):
    with torch.no_grad():
        for factor in w.factors:
            for p in factor:
                p.normal_()
    return w


# (in_modes, out_modes, terms, rank): nested uneven splits, size-1 factors, D = 1, N = 1, N = 3
CASES = [
    ([[2, 3]], [[3, 2]], 2, [2, 1]),
    ([[3], [4]], [[2], [5]], 2, 3),
    ([[2, 1], [3, 2]], [[1, 3], [2, 2]], 1, [1, 2]),
    ([[2, 1, 2], [1, 3, 1]], [[2, 2, 1], [1, 1, 3]], 2, [2, 1, 3]),
    ([[2, 2], [3, 1], [1, 2]], [[1, 2], [2, 2], [3, 1]], 3, [3, 2]),
    ([[1, 1], [5, 1]], [[1, 1], [1, 1]], 1, 2),
    # whole modes per factor (factor 2 owns the trailing modes: no gathering copy), P = 2
    ([[3, 1], [2, 1], [1, 4], [1, 3]], [[2, 1], [1, 2], [2, 1], [1, 3]], 2, [2, 3]),
    # N = 3 with P = 3: the middle factor runs one GEMM per term
    ([[2, 2, 3], [3, 1, 2]], [[2, 1, 2], [1, 3, 2]], 3, [1, 2, 2]),
]


def make_case(case, **kw):
    in_modes, out_modes, terms, rank = case
    in_f = math.prod(map(math.prod, in_modes))
    out_f = math.prod(map(math.prod, out_modes))
    return randomize(
        KCPMatrix(
            in_f,
            out_f,
            in_modes=in_modes,
            out_modes=out_modes,
            terms=terms,
            rank=rank,
            dtype=F64,
            **kw,
        )
    )


# --- hand-computed cases ---


def test_one_mode_is_a_sum_of_kronecker_products():
    w = make_case(([[2, 3]], [[3, 2]], 2, [2, 1]))
    f = factors_of(w)
    expected = sum(torch.kron(f[0][0][p].sum(0), f[1][0][p].sum(0)) for p in range(2))
    torch.testing.assert_close(w.to_dense(), expected)


@pytest.mark.parametrize(
    "shapes",
    [
        [(2, 3)],
        [(2, 3), (3, 1)],
        [(4, 2), (1, 3), (2, 2)],
        [(2, 1), (1, 1), (3, 2), (1, 2), (2, 3)],
    ],
)
@pytest.mark.parametrize(
    "flat", [False, True, "bmm"], ids=["kron-groups", "flat-groups", "flat-groups-bmm"]
)
def test_factor_dense_is_the_sum_over_the_rank_of_kronecker_products(shapes, flat, monkeypatch):
    """``factor_dense`` (the rank summed by one GEMM between two groups of modes, each group
    formed as Kronecker products of matrices or flat, the flat groups' backward broadcast or
    by batched products) against ``Σ_r kron(F_1[p, r], ..., F_D[p, r])`` by ``torch.kron``,
    and its gradients by gradcheck, in float64."""
    from kcprnn.formats.kcp import algebra
    from kcprnn.formats.kcp.algebra import factor_dense

    monkeypatch.setattr(algebra, "FLAT_GROUPS", 0 if flat else 1 << 40)
    monkeypatch.setattr(algebra, "OUTER_BMM_ROWS", 0 if flat == "bmm" else 1 << 40)
    monkeypatch.setattr(algebra, "OUTER_BMM_COLUMNS", 0)

    torch.manual_seed(len(shapes))
    factor = [torch.randn(2, 3, j, i, dtype=F64, requires_grad=True) for j, i in shapes]
    expected = []
    for p in range(2):
        total = 0
        for r in range(3):
            k = factor[0][p, r]
            for f in factor[1:]:
                k = torch.kron(k, f[p, r])
            total = total + k
        expected.append(total)
    torch.testing.assert_close(factor_dense(factor), torch.stack(expected))
    assert torch.autograd.gradcheck(lambda *f: factor_dense(f), factor)


def test_outer_rows_backward_by_batched_products():
    """``outer_rows`` above its threshold (one autograd node with a backward of batched
    products) against the broadcast product in float64: values, gradients by gradcheck,
    second derivatives by gradgradcheck, and under ``torch.func.vmap``; below the threshold,
    and with one column, the broadcast itself."""
    from kcprnn.formats.kcp.algebra import OUTER_BMM_COLUMNS, OUTER_BMM_ROWS, outer_rows

    torch.manual_seed(11)
    m, n = OUTER_BMM_COLUMNS, 3
    k = -(-OUTER_BMM_ROWS // m)
    a = torch.randn(k, m, dtype=F64, requires_grad=True)
    b = torch.randn(k, n, dtype=F64, requires_grad=True)
    out = outer_rows(a, b)
    assert type(out.grad_fn).__name__ == "_OuterRowsBackward"
    torch.testing.assert_close(out, torch.einsum("qs,qt->qst", a, b).reshape(k, m * n))
    small = (a[:3].detach().requires_grad_(), b[:3].detach().requires_grad_())
    narrow = (a[:, :5].detach().requires_grad_(), b.detach().requires_grad_())
    assert type(outer_rows(*narrow).grad_fn).__name__ != "_OuterRowsBackward"
    assert type(outer_rows(*small).grad_fn).__name__ != "_OuterRowsBackward"
    assert type(outer_rows(a, b[:, :1]).grad_fn).__name__ != "_OuterRowsBackward"
    g = torch.randn(k, m * n, dtype=F64)
    da, db = torch.autograd.grad(out, (a, b), g)
    ref = torch.autograd.grad((a[:, :, None] * b[:, None, :]).reshape(k, -1), (a, b), g)
    torch.testing.assert_close(da, ref[0])
    torch.testing.assert_close(db, ref[1])
    few = (a[:8].detach().requires_grad_(), b[:8].detach().requires_grad_())
    with pytest.MonkeyPatch.context() as mp:
        from kcprnn.formats.kcp import algebra

        mp.setattr(algebra, "OUTER_BMM_ROWS", 0)
        mp.setattr(algebra, "OUTER_BMM_COLUMNS", 0)
        assert torch.autograd.gradcheck(outer_rows, few)
        assert torch.autograd.gradgradcheck(outer_rows, few)
        batched = torch.randn(2, 8, m, dtype=F64)
        got = torch.func.vmap(lambda x: outer_rows(x, few[1]))(batched)
        torch.testing.assert_close(got, torch.stack([outer_rows(x, few[1]) for x in batched]))


def test_one_factor_is_plain_cp():
    w = make_case(([[3], [4]], [[2], [5]], 2, 3))
    ((u1, u2),) = factors_of(w)
    expected = sum(torch.kron(u1[p, r], u2[p, r]) for p in range(2) for r in range(3))
    torch.testing.assert_close(w.to_dense(), expected)


def test_rank_one_terms_are_kronecker_of_all_pieces():
    # P = 1, R = (1, 1), D = 2, N = 2: W is a Kronecker product of the four small matrices,
    # arranged mode-major: W = kron(M11, M12, M21, M22) with M_dn = factors[n][d][0, 0].
    w = make_case(([[2, 3], [2, 2]], [[2, 1], [3, 2]], 1, 1))
    f = factors_of(w)
    pieces = [f[n][d][0, 0] for d in range(2) for n in range(2)]
    expected = pieces[0]
    for m in pieces[1:]:
        expected = torch.kron(expected, m)
    torch.testing.assert_close(w.to_dense(), expected)


def test_tiny_case_by_hand():
    # D = 1, N = 2, P = 1, R = 1, all 1x2 / 1x1 factors: W = [a b] kron [c d] = [ac ad bc bd]
    w = KCPMatrix(4, 1, in_modes=[[2, 2]], out_modes=[[1, 1]], dtype=F64)
    with torch.no_grad():
        w.factors[0][0].copy_(torch.tensor([[[[2.0, 3.0]]]]))
        w.factors[1][0].copy_(torch.tensor([[[[5.0, 7.0]]]]))
    torch.testing.assert_close(w.to_dense(), torch.tensor([[10.0, 14.0, 15.0, 21.0]], dtype=F64))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=F64)
    for algorithm in ("sequential", "parallel"):
        w.algorithm = algorithm
        torch.testing.assert_close(w(x), torch.tensor([[60.0]], dtype=F64))


@pytest.mark.parametrize("case", CASES[2:5])
def test_element_formula(case):
    w = make_case(case)
    expected = element_formula(factors_of(w), w.in_splits, w.out_splits)
    torch.testing.assert_close(w.to_dense(), expected, rtol=1e-12, atol=1e-12)


# --- fast products against the reconstruction ---


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_every_split_and_order_is_exact(case):
    w = make_case(case)
    f = factors_of(w)
    x = torch.randn(5, w.in_features, dtype=F64)
    ref = x @ w.to_dense().T
    for split in range(len(w.in_splits) * w.num_factors):
        assert rel_err(kcp_linear_parallel(x, f, split), ref) < 1e-10
    for order in itertools.permutations(range(w.num_factors)):
        assert rel_err(kcp_linear_sequential(x, f, order), ref) < 1e-10


@pytest.mark.parametrize("algorithm", ["auto", "sequential", "parallel", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_algorithms_match_dense(case, algorithm):
    w = make_case(case, algorithm=algorithm)
    x = torch.randn(2, 3, w.in_features, dtype=F64)
    assert rel_err(w(x), x @ w.to_dense().T) < 1e-10


# the blocked layout with free output modes in the last factor (inner_order moves them)
BLOCKED_CASE = ([[2, 1], [3, 1], [1, 4], [1, 3]], [[2, 2], [2, 1], [3, 1], [2, 1]], 1, [2, 3])

# small enough for numerical Jacobians: D = 1; N = 3; D = 3 with a size-1 factor
GRAD_CASES = [
    CASES[0],
    ([[2, 1, 2], [1, 2, 1]], [[1, 2, 1], [2, 1, 1]], 2, [1, 2, 1]),
    ([[2, 1], [1, 2], [2, 1]], [[1, 2], [2, 1], [1, 1]], 2, [2, 1]),
    ([[2, 1], [1, 3]], [[1, 2], [2, 1]], 2, [2, 1]),  # whole modes per factor: no gathering
]


@pytest.mark.parametrize("algorithm", ["sequential", "parallel"])
@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case, algorithm):
    w = make_case(case)
    f = factors_of(w)
    sizes = [[p.shape for p in fac] for fac in f]
    flat = [p.detach().clone().requires_grad_(True) for fac in f for p in fac]
    x = torch.randn(3, w.in_features, dtype=F64, requires_grad=True)
    num_d = len(sizes[0])

    def fn(x, *ps):
        nested = [list(ps[n * num_d : (n + 1) * num_d]) for n in range(len(sizes))]
        if algorithm == "parallel":
            return kcp_linear_parallel(x, nested, split=len(w.in_splits) * w.num_factors // 2)
        return kcp_linear_sequential(x, nested, order=tuple(reversed(range(len(sizes)))))

    assert torch.autograd.gradcheck(fn, (x, *flat))


def _walk_choices(w):
    """Every factor order of ``w`` and, for P = 1, every cut and mode order of the last factor's
    inner CP product: ``(order, inner, inner_order)``."""
    for order in itertools.permutations(range(w.num_factors)):
        yield order, None, ()
        steps, _, _ = _sequential_walk(w.in_splits, w.out_splits, w.terms, order)
        if w.terms > 1 or steps[-1].post != 1:
            continue
        ins = [w.in_splits[d][order[-1]] for d in range(len(w.in_splits))]
        for inner_order, cut in inner_orders(ins):
            yield order, cut, inner_order


@pytest.mark.parametrize("case", CASES + [BLOCKED_CASE])
def test_sequential_backward_matches_the_dense_reconstruction(case):
    # the hand-written backward of the whole walk (_SequentialProduct), every gather, order and
    # inner product, against autograd through x @ to_dense().T + bias
    w = make_case(case)
    f = factors_of(w)
    x = torch.randn(5, w.in_features, dtype=F64, requires_grad=True)
    bias = torch.randn(w.out_features, dtype=F64, requires_grad=True)
    g = torch.randn(5, w.out_features, dtype=F64)
    params = [x, bias, *[p for fac in f for p in fac]]
    ref = torch.autograd.grad(((x @ w.to_dense().T + bias) * g).sum(), params)
    count = 0
    for order, inner, inner_order in _walk_choices(w):
        y = kcp_linear_sequential(x, f, order, inner, bias=bias, inner_order=inner_order)
        got = torch.autograd.grad((y * g).sum(), params)
        for a, b in zip(got, ref, strict=True):
            assert rel_err(a, b) < 1e-10, (order, inner, inner_order)
        count += 1
    assert count >= math.factorial(w.num_factors)


@pytest.fixture
def torch_gathers():
    """A model that prices the compiled one-pass gather out: walks gather on torch, by block
    transposes or a permute copy, as where the kernel does not run (float64, CUDA)."""
    return DEFAULT.replace(native_gather=1e12)


@pytest.fixture
def native_gathers():
    """A model that prices block transposes and torch's permute out: interleaved axes are
    gathered by the compiled one-pass gather (float32 on CPU; torch's permute copy otherwise)."""
    from kcprnn._cpu import native

    if not native.available():
        pytest.skip("needs the compiled kernels")
    return DEFAULT.replace(swap=1e12, narrow_penalty=1e12, permute=1e12)


@pytest.fixture
def permute_gathers():
    """A model that prices block transposes, batched GEMMs and the compiled gather out: every
    factor whose axes are not already the trailing block of the rows is gathered there by one
    permute copy."""
    return DEFAULT.replace(swap=1e12, narrow_penalty=1e12, native_gather=1e12)


@pytest.mark.parametrize(
    "case", [CASES[3][:2] + (1,) + CASES[3][3:], CASES[4][:2] + (1,) + CASES[4][3:], CASES[4]]
)
def test_permute_gathers_forward_and_backward(case, permute_gathers):
    # P = 1: one autograd node with the hand-written backward; P = 3: autograd's graph
    w = make_case(case)
    f = factors_of(w)
    x = torch.randn(4, w.in_features, dtype=F64, requires_grad=True)
    g = torch.randn(4, w.out_features, dtype=F64)
    params = [x, *[p for fac in f for p in fac]]
    dense = x @ w.to_dense().T
    ref = torch.autograd.grad((dense * g).sum(), params)
    gathers = set()
    model = permute_gathers
    for order in itertools.permutations(range(w.num_factors)):
        steps, _, _ = _sequential_walk(w.in_splits, w.out_splits, w.terms, order, model)
        gathers |= {step.gather for step in steps}
        y = kcp_linear_sequential(x, f, order, cost_model=model)
        assert rel_err(y, dense) < 1e-10
        for a, b in zip(torch.autograd.grad((y * g).sum(), params), ref, strict=True):
            assert rel_err(a, b) < 1e-10
    assert PERMUTE in gathers and SWAPS not in gathers


def test_gradients_match_dense_path():
    w = make_case(CASES[4])
    x = torch.randn(4, w.in_features, dtype=F64)
    grads = {}
    for algorithm in ("sequential", "parallel", "dense"):
        w.zero_grad()
        w.algorithm = algorithm
        w(x).pow(2).sum().backward()
        grads[algorithm] = [p.grad.clone() for p in w.parameters()]
    for algorithm in ("sequential", "parallel"):
        for g, ref in zip(grads[algorithm], grads["dense"], strict=False):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["auto", "sequential", "parallel"])
def test_five_factors_use_the_greedy_order(algorithm):
    in_modes = [[2, 1, 1, 1, 2], [1, 2, 1, 3, 1]]
    case = (in_modes, [[1, 1, 2, 1, 1], [2, 1, 1, 1, 3]], 2, [1, 2, 1, 1, 2])
    w = make_case(case, algorithm=algorithm)
    x = torch.randn(3, w.in_features, dtype=F64)
    assert rel_err(w(x), x @ w.to_dense().T) < 1e-10
    plan = kcp_cost(3, w.in_splits, w.out_splits, w.ranks, w.terms, "sequential")
    # J^(n) / I^(n) = 2/2, 1/2, 2/1, 1/3, 3/2: the factors that shrink the data most go first
    assert plan.order == (3, 1, 0, 4, 2)


@pytest.mark.parametrize("algorithm", ["sequential", "parallel"])
def test_empty_batch(algorithm):
    w = make_case(CASES[4], algorithm=algorithm)
    y = w(torch.randn(0, w.in_features, dtype=F64))
    assert y.shape == (0, w.out_features)
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in w.parameters())


def test_swaps_to_end_by_hand():
    # axes g r g r (group flagged): swap (g) with (r) -> r g g r, then (g g) with (r) -> r r g g
    assert swaps_to_end([2, 3, 4, 5], [True, False, True, False]) == [(1, 2, 3, 20), (3, 8, 5, 1)]
    assert swaps_to_end([2, 3], [False, True]) == []


def test_walk_gathers_only_interleaved_axes(torch_gathers):
    # whole modes per factor: factor 2 (trailing 360 inputs) goes first on a view of the input,
    # then factor 1 on the small result; interleaved: factor 2's axes must be gathered
    model = torch_gathers
    blocked = ((8, 1), (20, 1), (1, 20), (1, 18)), ((16, 1), (4, 1), (4, 1), (1, 4))
    steps, _, _ = _sequential_walk(*blocked, 1, (1, 0), model)
    assert (steps[0].gather, steps[0].pre, steps[0].f, steps[0].post, steps[0].g) == (
        NONE,
        160,
        360,
        1,
        4,
    )
    steps, _, copies = _sequential_walk(UCF_IN, UCF_OUT, 1, (1, 0), model)
    assert steps[0].gather is SWAPS and steps[0].f == 600 and copies > 0
    assert (
        kcp_cost(96, *blocked, (4, 4), 1, "sequential", cost_model=model).cost
        < kcp_cost(96, UCF_IN, UCF_OUT, (4, 4), 1, "sequential", cost_model=model).cost
    )


def test_final_reordering_gathers_only_scattered_orders():
    def _final_gathers(sizes, perm):
        return final_gathers(sizes, perm, DEFAULT.final_gather_run)

    # the paper's interleaved UCF11 output (4x2x2x2 | 4x2x2x2 -> j0 j1 j2 j3): run of 2, 8 axes
    assert _final_gathers([4, 2, 2, 2, 4, 2, 2, 2], [0, 4, 1, 5, 2, 6, 3, 7])
    assert _final_gathers([8, 64, 2], [1, 0, 2])  # 3 axes, run of 2
    assert _final_gathers([8, 1, 64, 2], [2, 1, 0, 3])  # the same with a size-1 axis
    assert _final_gathers([4, 4, 4, 4, 4], [1, 0, 3, 2, 4])  # 5 axes, run of 4
    assert not _final_gathers([2, 4, 8, 4, 4], [2, 0, 1, 3, 4])  # blocked UCF11: run of 16
    assert not _final_gathers([32, 32], [1, 0])  # a plain transpose
    assert not _final_gathers([16, 4, 16], [1, 0, 2])  # run of 16
    assert not _final_gathers([2, 3, 4], [0, 1, 2])


@pytest.mark.parametrize("case", [2, 4, 7])
def test_gathered_final_reordering_matches_the_permute(case):
    """The index_select form of the output reordering gives the permuted copy's numbers, in the
    forward and in the hand-written backward, and the dense product."""
    import dataclasses

    from kcprnn.formats.kcp import kcp_sequential_prepare
    from kcprnn.formats.kcp.backward import walk_backward as _walk_backward
    from kcprnn.formats.kcp.sequential import run_walk as _run_walk
    from kcprnn.formats.kcp.sequential import walk_matrices as _walk_matrices
    from kcprnn.formats.kcp.walk import sequential_setup

    torch.manual_seed(case)
    w = make_case(CASES[case])
    f = factors_of(w)
    order = tuple(range(w.num_factors))
    walk = sequential_setup(w.in_splits, w.out_splits, w.terms, order, None, (), DEFAULT)
    assert walk.gathers
    plain = dataclasses.replace(walk, gathers=False)
    mats = _walk_matrices(kcp_sequential_prepare(f, order), walk.steps)
    x = torch.randn(5, w.in_features, dtype=F64, requires_grad=True)
    bias = torch.randn(w.out_features, dtype=F64)
    fused = all(step.gather is not PBATCHED for step in walk.steps)  # else autograd's backward
    outs, grads = [], []
    for wk in (walk, plain):
        saved: list | None = [] if fused else None
        outs.append(_run_walk(x, mats, wk, bias, saved))
        seed = torch.ones_like(outs[-1]).cumsum(1)
        grads.append(
            _walk_backward(seed, mats, wk, saved, True, [True] * len(mats))
            if fused
            else torch.autograd.grad(outs[-1], x, seed)
        )
    assert rel_err(outs[0], x @ w.to_dense().T + bias) < 1e-10
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_chunked_gather_is_exact(monkeypatch):
    from kcprnn.formats.kcp.walk import chunk_rows

    w = make_case(CASES[4], algorithm="sequential")
    x = torch.randn(7, w.in_features, dtype=F64)
    ref = w(x)
    w.cost_model = DEFAULT.replace(gather_chunk=2 * w.in_features)  # chunks of 2 rows
    model = w.planning_model()
    steps, _, _ = _sequential_walk(w.in_splits, w.out_splits, w.terms, w.plan(7).order, model)
    assert steps[0].gather in (SWAPS, PERMUTE, NATIVE)
    assert chunk_rows(7, w.in_features, steps, model) == 2
    torch.testing.assert_close(w(x), ref, rtol=1e-12, atol=1e-12)
    calls = []
    real = seq_module.run_walk
    monkeypatch.setattr(seq_module, "run_walk", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():  # (the fused training node calls run_walk from its own module)
        torch.testing.assert_close(w(x), ref, rtol=1e-12, atol=1e-12)
    assert calls == [2, 2, 2, 1]


@pytest.mark.parametrize("gathers", ["swaps", "permute", "native"])
def test_inference_gathers_reuse_buffers_without_aliasing(gathers, request, monkeypatch):
    """Under no_grad the gathering copies go to per-thread scratch buffers: results stay exact
    against the dense reconstruction in chunks of rows, and an output is not overwritten by the
    next call (the compiled gather in float32, torch's copies in float64)."""
    model = request.getfixturevalue(
        {"swaps": "torch_gathers", "permute": "permute_gathers", "native": "native_gathers"}[
            gathers
        ]
    )
    w = make_case(CASES[4][:2] + (1,) + CASES[4][3:], algorithm="sequential")
    dtype, tol = (torch.float32, 1e-5) if gathers == "native" else (F64, 1e-10)
    w = w.to(dtype)
    w.cost_model = model.replace(gather_chunk=2 * w.in_features)  # chunks of 2 rows
    used = []
    real = ops.scratch
    monkeypatch.setattr(seq_module, "scratch", lambda *a: used.append(a[0]) or real(*a))
    x1, x2 = torch.randn(2, 5, w.in_features, dtype=dtype)
    with torch.no_grad():
        steps, _, _ = _sequential_walk(
            w.in_splits, w.out_splits, w.terms, w.plan(5).order, w.planning_model()
        )
        assert GatherMode(gathers) in {step.gather for step in steps}
        y1 = w(x1)
        kept = y1.clone()
        y2 = w(x2)
    assert used  # the scratch buffers were used
    torch.testing.assert_close(y1, kept, rtol=0, atol=0)
    dense = w.to_dense()
    assert rel_err(y1, x1 @ dense.T) < tol
    assert rel_err(y2, x2 @ dense.T) < tol


@pytest.mark.parametrize(
    "case",
    [
        CASES[3][:2] + (1,) + CASES[3][3:],
        CASES[4],
        ([[2, 2], [2, 3], [3, 2]], [[2, 1], [1, 2], [2, 2]], 1, 2),
    ],
)
def test_native_gathers_forward_and_backward(case, native_gathers, monkeypatch):
    """Walks that gather with the compiled kernel, in float32: inference, the one-node training
    product and autograd's graph (P > 1) against the dense product in float64, gradients of the
    input and of every factor included."""
    torch.manual_seed(0)
    w = make_case(case).float()
    f = factors_of(w)
    x = torch.randn(6, w.in_features, requires_grad=True)
    g = torch.randn(6, w.out_features)
    params = [x, *[p for fac in f for p in fac]]
    dense = w.to_dense().double()
    ref_y = x.double() @ dense.T
    ref = torch.autograd.grad((ref_y * g.double()).sum(), [x, *w.parameters()])
    from kcprnn._cpu import native as native_module

    model = native_gathers
    calls = []
    real = native_module.gather
    monkeypatch.setattr(native_module, "gather", lambda *a: calls.append(1) or real(*a))
    native = 0
    for order in itertools.permutations(range(w.num_factors)):
        steps, _, _ = _sequential_walk(w.in_splits, w.out_splits, w.terms, order, model)
        native += sum(step.gather is NATIVE for step in steps)
        with torch.no_grad():
            y0 = kcp_linear_sequential(x, f, order, cost_model=model)
            assert rel_err(y0.double(), ref_y) < 1e-5
        y = kcp_linear_sequential(x, f, order, cost_model=model)
        assert rel_err(y.double(), ref_y) < 1e-5
        for a, b in zip(torch.autograd.grad((y * g).sum(), params), ref, strict=True):
            assert rel_err(a.double(), b) < 1e-4
    assert native > 0 and calls  # planned, and run on the kernel


def test_native_gathers_in_the_plan():
    """Where the model plans for the compiled kernels, the paper's interleaved UCF11 walk
    gathers in one pass, priced below torch's three block swaps, so the sequential plan wins;
    planning for them needs no compiler (the model says whether they are planned for)."""
    from kcprnn.formats.kcp.layout import input_axes
    from kcprnn.formats.kcp.walk import swap_cost

    steps, _, copies = _sequential_walk(UCF_IN, UCF_OUT, 1, (1, 0))
    assert steps[0].gather is NATIVE and steps[0].f == 600
    axes = input_axes(UCF_IN)
    swaps = swaps_to_end([a.size for a in axes], [a.factor == 1 for a in axes])
    assert copies < swap_cost(swaps, DEFAULT)
    assert kcp_plan(96, UCF_IN, UCF_OUT, (4, 4), 1, prepared=True).algorithm == "sequential"
    no_kernels = DEFAULT.replace(kernels=False)
    steps, _, _ = _sequential_walk(UCF_IN, UCF_OUT, 1, (1, 0), no_kernels)
    assert steps[0].gather is not NATIVE


def test_training_gathers_keep_what_the_backward_needs(monkeypatch):
    """With gradients, only copies nothing keeps go to the scratch buffers: the fused walk
    reuses its intermediate swaps (not the copy its GEMM saves), and a walk autograd records
    (here a batched middle step, N = 3 with P = 3) reuses none. Two forwards in chunks of rows
    before one backward give the gradients of separate passes (this failed with a version
    error while the recorded walk reused buffers)."""
    torch.manual_seed(0)
    model = DEFAULT.replace(gather_chunk=4)  # chunks of one row
    used = []
    real = ops.scratch
    monkeypatch.setattr(seq_module, "scratch", lambda *a: used.append(a[0]) or real(*a))
    two_swaps = ([[2, 2], [2, 3], [3, 2]], [[2, 1], [1, 2], [2, 2]], 1, [2, 2])
    for case, fused in ((CASES[7], False), (two_swaps, True)):
        w = make_case(case)
        order = next(
            o
            for o in itertools.permutations(range(w.num_factors))
            if (steps := _sequential_walk(w.in_splits, w.out_splits, w.terms, o, model)[0])
            and steps[0].gather is SWAPS
            and (PBATCHED in {s.gather for s in steps}) != fused
            and len(steps[0].swaps) == (2 if fused else 1)
        )
        f = factors_of(w)
        x1, x2 = torch.randn(2, 3, w.in_features, dtype=F64)
        dense = w.to_dense()
        ref = torch.autograd.grad(
            (x1 @ dense.T).sum() + ((x2 @ dense.T) ** 2).sum(), list(w.parameters())
        )
        used.clear()
        y1, y2 = (kcp_linear_sequential(x, f, order, cost_model=model) for x in (x1, x2))
        got = torch.autograd.grad(y1.sum() + (y2**2).sum(), list(w.parameters()))
        assert bool(used) == fused
        for a, b in zip(got, ref, strict=True):
            assert rel_err(a, b) < 1e-10


def test_scratch_buffers_work_in_and_out_of_inference_mode(monkeypatch):
    monkeypatch.setattr(ops, "_SCRATCH", threading.local())  # no buffers yet on this thread
    w = make_case(CASES[4][:2] + (1,) + CASES[4][3:], algorithm="sequential")
    x = torch.randn(3, w.in_features, dtype=F64)
    ref = x @ w.to_dense().T
    with torch.inference_mode():  # the buffers are first made here
        first = w(x)
    with torch.no_grad():
        second = w(x)
    with torch.inference_mode():
        third = w(x)
    for y in (first, second, third):
        assert rel_err(y, ref) < 1e-10


def test_scratch_reuses_one_buffer_per_slot():
    like = torch.zeros(1)
    a = ops.scratch(0, (3, 4), like)
    b = ops.scratch(0, (2, 2), like)
    c = ops.scratch(1, (3, 4), like)
    assert a.shape == (3, 4) and b.shape == (2, 2)
    assert a.data_ptr() == b.data_ptr() != c.data_ptr()
    assert ops.scratch(0, (DEFAULT.scratch_max + 1,), like) is None
    assert ops.scratch(0, (3, 4), like, DEFAULT.replace(scratch_max=11)) is None
    assert ops.scratch(0, (3,), like.double()).dtype == torch.float64


def test_pure_to_dense_matches_module():
    w = make_case(CASES[3])
    torch.testing.assert_close(kcp_to_dense(factors_of(w)), w.to_dense())


# --- counts, shapes, state_dict ---


def test_ucf11_example_count():
    w = KCPMatrix(
        57600,
        1024,
        in_modes=[[2, 4], [4, 5], [4, 5], [3, 6]],
        out_modes=[[4, 4], [2, 2], [2, 2], [2, 2]],
        terms=1,
        rank=[1, 1],
    )
    assert w.num_params == 78
    assert kcp_num_params(w.in_splits, w.out_splits, w.ranks, w.terms) == 78
    assert int(w.compression_ratio) == 756_184
    assert w.compression_ratio >= 278_219
    assert w.in_modes == (8, 20, 20, 18) and w.out_modes == (16, 4, 4, 4)


def test_num_params_formula_by_hand():
    # ranks (2, 3), P = 2, splits in [[2,3],[4,1]], out [[1,2],[3,2]]:
    # factor 1: 2*2*(2*1 + 4*3) = 56, factor 2: 2*3*(3*2 + 1*2) = 48
    w = KCPMatrix(
        24, 12, in_modes=[[2, 3], [4, 1]], out_modes=[[1, 2], [3, 2]], terms=2, rank=[2, 3]
    )
    assert w.num_params == 104 == kcp_num_params(w.in_splits, w.out_splits, (2, 3), 2)


def test_state_dict_keys_and_shapes():
    w = KCPMatrix(
        24, 12, in_modes=[[2, 3], [4, 1]], out_modes=[[1, 2], [3, 2]], terms=2, rank=[2, 3]
    )
    shapes = {k: tuple(v.shape) for k, v in w.state_dict().items()}
    assert shapes == {
        "factors.0.0": (2, 2, 1, 2),
        "factors.0.1": (2, 2, 3, 4),
        "factors.1.0": (2, 3, 2, 3),
        "factors.1.1": (2, 3, 2, 1),
    }


def test_flat_modes_are_split_in_balanced_factors():
    w = KCPMatrix(64, 36, in_modes=[16, 4], out_modes=[6, 6], num_factors=2)
    assert w.in_splits == ((4, 4), (2, 2)) and w.out_splits == ((3, 2), (3, 2))
    w = KCPMatrix(64, 36, in_modes=[[2, 8], [4, 1]], out_modes=[6, 6])
    assert w.out_splits == ((3, 2), (3, 2)) and w.num_factors == 2
    w = KCPMatrix(64, 8, num_modes=2, num_factors=3)
    assert w.in_splits == ((2, 2, 2), (2, 2, 2)) and w.out_splits == ((2, 2, 1), (2, 1, 1))


def test_repr_lists_splits_and_ranks():
    r = repr(
        KCPMatrix(
            24, 12, in_modes=[[2, 3], [4, 1]], out_modes=[[1, 2], [3, 2]], terms=2, rank=[2, 3]
        )
    )
    assert "in_splits=[[2, 3], [4, 1]]" in r and "ranks=[2, 3]" in r and "terms=2" in r
    assert "num_factors=2" in r


def test_init_std_exact_for_a_single_term():
    # P * prod(R) = 1: every entry of W has magnitude sigma^(D N) = std exactly.
    w = KCPMatrix(
        60, 12, in_modes=[[3, 4], [5, 1]], out_modes=[[2, 2], [3, 1]], init="variance", dtype=F64
    )
    w.reset_parameters(0.1)
    torch.testing.assert_close(w.to_dense().abs(), torch.full((12, 60), 0.1, dtype=F64))


# --- validation ---


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"in_modes": [[2, 3], [4, 2]]},
            ValueError,
            r"in_features=24: in_modes=\[\[2, 3\], \[4, 2\]\] multiply to 48",
        ),
        (
            {"out_modes": [[1, 2], [3, 3]]},
            ValueError,
            r"out_features=12: out_modes=\[\[1, 2\], \[3, 3\]\] multiply to 18",
        ),
        (
            {"in_modes": [[2, 3], [4]]},
            ValueError,
            r"same number of Kronecker factors.*lengths \[2, 1\]",
        ),
        (
            {"in_modes": [[2, 3, 1], [4, 1, 1]], "out_modes": [[1, 2], [3, 2]]},
            ValueError,
            "in_modes and out_modes need the same number of Kronecker factors",
        ),
        ({"in_modes": [[2, 3], [4, 1]], "num_factors": 3}, ValueError, "num_factors=3 disagrees"),
        ({"rank": 0}, ValueError, "rank must be positive"),
        ({"rank": [2, 0]}, ValueError, r"rank\[1\] must be positive"),
        ({"rank": [1, 2, 3]}, ValueError, r"rank needs 2 entries, got rank=\[1, 2, 3\]"),
        ({"rank": 1.5}, TypeError, "rank must be a positive int"),
        ({"terms": 0}, ValueError, "terms must be positive"),
        ({"terms": "2"}, TypeError, "terms must be a positive int"),
        ({"in_modes": [6, 4], "num_factors": 0}, ValueError, "num_factors must be positive"),
        ({"in_modes": [[2, 3], [4, 0]]}, ValueError, r"in_modes\[1\]\[1\] must be positive"),
        ({"in_modes": [[2, 3.0], [4, 1]]}, TypeError, r"in_modes\[0\]\[1\] must be a positive int"),
        ({"algorithm": "einsum"}, ValueError, "algorithm must be one of"),
    ],
)
def test_validation(kwargs, error, match):
    opts = {"in_modes": [[2, 3], [4, 1]], "out_modes": [[1, 2], [3, 2]], **kwargs}
    with pytest.raises(error, match=match):
        KCPMatrix(24, 12, **opts)


def test_flat_mode_mismatch_names_modes():
    with pytest.raises(ValueError, match=r"in_modes=\[6, 5\] multiply to 30"):
        KCPMatrix(24, 12, in_modes=[6, 5])


def test_reset_parameters_rejects_non_positive_std():
    with pytest.raises(ValueError, match="std=0"):
        KCPMatrix(24, 12).reset_parameters(0.0)


# --- the auto choice follows the cost model ---

UCF_IN, UCF_OUT = ((2, 4), (4, 5), (4, 5), (3, 6)), ((4, 4), (2, 2), (2, 2), (2, 2))
BIG_IN = ((4, 4), (4, 5), (4, 5), (6, 6))  # 230,400 inputs


def test_auto_is_the_cheaper_plan():
    for rows, ranks, terms in itertools.product((1, 96, 1024), ((1, 1), (4, 4), (16, 16)), (1, 2)):
        plans = [
            kcp_cost(rows, UCF_IN, UCF_OUT, ranks, terms, a) for a in ("parallel", "sequential")
        ]
        chosen = kcp_plan(rows, UCF_IN, UCF_OUT, ranks, terms)
        assert chosen.cost == min(p.cost for p in plans)


def test_each_algorithm_wins_somewhere():
    # rank 1: the merged CP has a single term and never copies the input -> parallel
    assert kcp_plan(96, UCF_IN, UCF_OUT, (1, 1), 1).algorithm == "parallel"
    # rank 16 x 16 x 2 terms = 512 merged terms: factor by factor is far cheaper -> sequential
    assert kcp_plan(96, UCF_IN, UCF_OUT, (16, 16), 2).algorithm == "sequential"
    w = KCPMatrix(57600, 1024, in_modes=UCF_IN, out_modes=UCF_OUT, rank=16, terms=2)
    assert w.plan(96).algorithm == "sequential"
    assert w.matmul_flops(96) == w.plan(96).macs


def test_parallel_flops_by_hand():
    # D = 2, N = 1, P = 1, R = 1 on 3 rows, in (4, 5), out (2, 3). Split at mode 1: step 1 is
    # (3*4, 5) -> (3*4, 3), step 2 (3, 2, 4) x (4, 3), and one-mode chunks need no products;
    # split at 0: building the (6, 20) chunk, (3, 20) -> (3, 6), the (trivial) rank sum.
    plan = parallel_plan(3, ((4,), (5,)), ((2,), (3,)), (1,), 1, 1, DEFAULT)
    assert plan.macs == 2 * 4 + 3 * 4 * 5 * 3 + 3 * 2 * 4 * 3  # + laying out the (2, 4) prefix
    plan = parallel_plan(3, ((4,), (5,)), ((2,), (3,)), (1,), 1, 0, DEFAULT)
    assert plan.macs == 6 * 20 + 3 * 20 * 6 + 3 * 6


def test_sequential_flops_by_hand():
    # D = 1, N = 2, P = 2, R = (1, 1), in [[2, 3]], out [[4, 1]], 5 rows, order (1, 0).
    # build: 2*1*3*1 + 2*1*2*4 = 22; step 1: factor 2 on (5*2, 3) -> 2 terms x 1 = 5*6*1*2 = 60;
    # step 2: factor 1 on (5, p*2) -> 4: 5*1*2*2*4 = 80.
    plan = sequential_plan(5, ((2, 3),), ((4, 1),), (1, 1), 2, (1, 0), DEFAULT)
    assert plan.macs == 22 + 60 + 80


def test_training_auto_prices_the_backward(torch_gathers):
    # R = 2 at 230,400 -> 1,024, 96 rows: parallel's forward is cheaper, but its backward repeats
    # the GEMM over the input (1.5x its forward) while sequential's is about half its forward.
    # (Measured, fwd+bwd: parallel 30.5 ms, sequential 31.4 ms.) The backward is priced without
    # the forward's oneDNN saving.
    model = torch_gathers
    ranks = (2, 2)
    par = kcp_cost(96, BIG_IN, UCF_OUT, ranks, 1, "parallel", cost_model=model)
    seq = kcp_cost(96, BIG_IN, UCF_OUT, ranks, 1, "sequential", cost_model=model)
    assert par.cost < seq.cost

    def train(plan):
        ratio = {"parallel": model.backward_parallel, "sequential": model.backward_sequential}
        return plan.cost + ratio[plan.algorithm] * (plan.cost + plan.kernel_saving)

    assert train(seq) < train(par)
    assert train(seq) == training_cost(seq, model) and train(par) == training_cost(par, model)
    assert kcp_plan(96, BIG_IN, UCF_OUT, ranks, 1, cost_model=model).algorithm == "parallel"
    plan = kcp_plan(96, BIG_IN, UCF_OUT, ranks, 1, training=True, cost_model=model)
    assert plan.algorithm == "sequential"
    # rank 1: parallel stays the cheaper one with its backward included
    plan = kcp_plan(96, UCF_IN, UCF_OUT, (1, 1), 1, training=True, cost_model=model)
    assert plan.algorithm == "parallel"


def test_plan_follows_grad_mode(torch_gathers):
    w = KCPMatrix(
        230400, 1024, in_modes=BIG_IN, out_modes=UCF_OUT, rank=2, cost_model=torch_gathers
    )
    assert w.plan(96).algorithm == "sequential"  # factors require grad, grad enabled
    with torch.no_grad():
        assert w.plan(96).algorithm == "parallel"
        assert w.matmul_flops(96) == w.plan(96, training=False).macs
    w.requires_grad_(False)
    assert w.plan(96).algorithm == "parallel"


# --- the last factor as its own CP product ---


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 1 and len(c[0][0]) > 1])
def test_inner_cp_product_of_the_last_factor_is_exact(case):
    w = make_case(case)
    f = factors_of(w)
    x = torch.randn(5, w.in_features, dtype=F64)
    ref = x @ w.to_dense().T
    for order in itertools.permutations(range(w.num_factors)):
        steps, _, _ = _sequential_walk(w.in_splits, w.out_splits, 1, order)
        if steps[-1].post != 1:
            continue
        for inner in range(len(w.in_splits)):
            assert rel_err(kcp_linear_sequential(x, f, order, inner), ref) < 1e-10


def test_inner_gradcheck():
    w = make_case(([[2, 1], [1, 3]], [[1, 2], [2, 1]], 1, [2, 2]))
    f = factors_of(w)
    flat = [p.detach().clone().requires_grad_(True) for fac in f for p in fac]
    x = torch.randn(3, w.in_features, dtype=F64, requires_grad=True)

    order = next(
        o
        for o in itertools.permutations(range(2))
        if _sequential_walk(w.in_splits, w.out_splits, 1, o)[0][-1].post == 1
    )

    def fn(x, *ps):
        return kcp_linear_sequential(x, [list(ps[:2]), list(ps[2:])], order=order, inner=1)

    assert torch.autograd.gradcheck(fn, (x, *flat))


def test_inner_is_planned_for_a_large_last_factor():
    # blocked UCF11 layout: factor 1 (160 inputs -> 512 outputs) acts on 2 numbers per row and
    # 160 inputs; its dense (512, 160) matrix costs 15.7M MACs at 96 rows, its CP product ~1M
    blocked = ((8, 1), (20, 1), (1, 20), (1, 18)), ((16, 1), (4, 1), (4, 1), (2, 2))
    plan = kcp_cost(96, *blocked, (2, 2), 1, "sequential")
    assert plan.inner is not None and plan.order == (1, 0)
    w = KCPMatrix(57600, 1024, in_modes=blocked[0], out_modes=blocked[1], rank=2, dtype=F64)
    x = torch.randn(4, 57600, dtype=F64)
    assert w.plan(4, training=False).inner is not None
    assert rel_err(w(x), x @ w.to_dense().T) < 1e-10


def test_inner_needs_one_term():
    w = make_case(CASES[4])  # P = 3
    with pytest.raises(ValueError, match="inner=0 needs one Kronecker term"):
        kcp_linear_sequential(torch.randn(2, w.in_features, dtype=F64), factors_of(w), inner=0)


# --- small matrices kept between inference calls ---


def test_inference_reuses_the_small_matrices_until_the_factors_change():
    w = make_case(CASES[6])
    x = torch.randn(3, w.in_features, dtype=F64)
    with torch.no_grad():
        y1 = w(x)
        built = w._cache[1]
        assert w(x).equal(y1) and w._cache[1] is built  # reused, same numbers
        w.factors[0][0].mul_(2.0)  # an in-place update (an optimizer step) bumps the version
        y2 = w(x)
        assert w._cache[1] is not built
    assert rel_err(y2, x @ w.to_dense().T) < 1e-10
    w.load_state_dict(make_case(CASES[6]).state_dict())  # copy_ into the same tensors
    with torch.no_grad():
        assert rel_err(w(x), x @ w.to_dense().T) < 1e-10


def test_training_builds_the_small_matrices_every_call():
    w = make_case(CASES[6])
    w(torch.randn(2, w.in_features, dtype=F64)).sum().backward()
    assert w._cache is None and all(p.grad is not None for p in w.parameters())


@pytest.mark.parametrize("algorithm", ["auto", "sequential", "parallel", "dense"])
@pytest.mark.parametrize("case", CASES)
def test_bias_is_added_in_the_product(case, algorithm):
    w = make_case(case, algorithm=algorithm)
    x = torch.randn(2, 3, w.in_features, dtype=F64)
    bias = torch.randn(w.out_features, dtype=F64)
    ref = x @ w.to_dense().T + bias
    assert rel_err(w(x, bias), ref) < 1e-10
    with torch.no_grad():
        assert rel_err(w(x, bias), ref) < 1e-10


# --- decomposing a dense matrix ---


@pytest.mark.parametrize(
    "case",
    [
        ([[2, 3], [3, 2]], [[2, 2], [3, 1]], 1, [1, 1]),  # a Kronecker product of 4 matrices
        ([[2, 3], [3, 2]], [[2, 2], [3, 1]], 1, [2, 1]),
        ([[2, 1, 2], [1, 3, 1]], [[2, 2, 1], [1, 1, 3]], 1, [1, 2, 1]),  # N = 3
    ],
)
def test_from_dense_recovers_a_one_term_kcp(case):
    torch.manual_seed(3)
    w = make_case(case)
    dense = w.to_dense()
    in_modes, out_modes, terms, rank = case
    got = KCPMatrix.from_dense(
        dense, in_modes=in_modes, out_modes=out_modes, terms=terms, rank=rank
    )
    assert got.factors[0][0].dtype == F64 and got.terms == 1
    assert rel_err(got.to_dense(), dense) < 1e-8


def test_from_dense_with_terms_matches_the_nearest_kronecker_sum():
    # P = 2 with rank-1 factors and D = 1: each A_p is a plain matrix, so the result is exactly
    # Van Loan's nearest sum of 2 Kronecker products: the best rank-2 fit of the rearranged W.
    torch.manual_seed(4)
    dense = torch.randn(6, 12, dtype=F64)
    got = KCPMatrix.from_dense(dense, in_modes=[[3, 4]], out_modes=[[2, 3]], terms=2, rank=[1, 1])
    rearranged = dense.reshape(2, 3, 3, 4).permute(0, 2, 1, 3).reshape(6, 12)
    sv = torch.linalg.svdvals(rearranged)
    best = sv[2:].pow(2).sum().sqrt() / dense.norm()
    assert abs(rel_err(got.to_dense(), dense) - best.item()) < 1e-8


def test_from_dense_rejects_a_vector():
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(6,\)"):
        KCPMatrix.from_dense(torch.randn(6), in_modes=[[2, 3]], out_modes=[[1, 1]])


def test_final_gather_without_gradients_writes_a_pooled_buffer_it_does_not_reuse_early(
    monkeypatch,
):
    """Without gradients the walk's final reordering (an index_select, forced here by a long
    minimum run) writes into a pooled buffer: the results equal the dense product, and a
    result the caller still holds is not overwritten by the next call's."""
    model = DEFAULT.replace(final_gather_run=1 << 30)
    pooled = []
    select = torch.index_select

    def spy(*args, **kwargs):
        pooled.append("out" in kwargs)
        return select(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", spy)
    torch.manual_seed(3)
    for case in CASES:
        w = make_case(case)
        f = factors_of(w)
        rows = -(-(1 << 16) // w.out_features)  # at least the pool's smallest buffer
        x1, x2 = torch.randn(2, rows, w.in_features, dtype=F64)
        with torch.no_grad():
            y1 = kcp_linear_sequential(x1, f, cost_model=model)
            y2 = kcp_linear_sequential(x2, f, cost_model=model)
        dense = w.to_dense().detach()
        assert rel_err(y1, x1 @ dense.T) < 1e-10
        assert rel_err(y2, x2 @ dense.T) < 1e-10
    assert sum(pooled) >= 4  # two or more cases gathered, into pooled buffers
