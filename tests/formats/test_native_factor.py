"""KCP's factor matrix in one autograd node (``kcprnn._cpu.native_factor``), on the compiled
kernel and by GEMMs, against an einsum over the CP factors in float64: values, gradients,
gradcheck and second derivatives, several factors in one node (the kernel's and the GEMMs'
together), backward passes through one build, in-place changes, and where each must not run
(traced, transformed, other dtypes, too large for the kernel)."""

from __future__ import annotations

import math
import string

import pytest
import torch

from kcprnn._cpu import native, native_factor
from kcprnn.formats.kcp.algebra import factor_dense, factor_dense_all, factor_dense_torch

pytestmark = pytest.mark.skipif(not native.available(), reason="the kernels are not built here")

SHAPES = [  # (P, R, [(J_d, I_d), ...])
    (1, 4, [(4, 5), (4, 2), (4, 2), (2, 2)]),
    (1, 3, [(2, 1), (2, 1), (2, 1), (2, 1)]),
    (2, 3, [(3, 2), (1, 4)]),
    (1, 2, [(3, 2)]),
    (3, 5, [(2, 3), (3, 1), (1, 1)]),
    (2, 1, [(1, 7), (5, 1), (2, 2), (1, 1), (3, 2)]),
]


def _factor(p, r, modes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p, r, j, i, generator=gen, dtype=dtype).requires_grad_() for j, i in modes]


def _einsum(factor):
    """``Σ_r ⊗_d F_d[p, r]`` by one einsum: rows ``(j_1 .. j_D)``, columns ``(i_1 .. i_D)``."""
    d = len(factor)
    letters = iter(string.ascii_letters[2:])
    js = [next(letters) for _ in range(d)]
    is_ = [next(letters) for _ in range(d)]
    spec = ",".join(f"pr{j}{i}" for j, i in zip(js, is_, strict=True))
    out = torch.einsum(f"{spec}->p{''.join(js)}{''.join(is_)}", *factor)
    p = factor[0].shape[0]
    rows = math.prod(f.shape[2] for f in factor)
    return out.reshape(p, rows, -1)  # (P, J, I)


@pytest.mark.parametrize(("p", "r", "modes"), SHAPES)
def test_values_and_gradients_match_an_einsum(p, r, modes):
    factor = _factor(p, r, modes)
    assert native_factor.applies(factor)
    got, want = factor_dense(factor), _einsum(factor)
    assert got.grad_fn is not None and "FactorDense" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, factor, g), torch.autograd.grad(want, factor, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("p", "r", "modes"), SHAPES[:3])
def test_float32_within_rounding_of_float64(p, r, modes):
    factor = _factor(p, r, modes)
    single = [f.detach().float().requires_grad_() for f in factor]
    got, want = factor_dense(single), _einsum(factor)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, single, g.float()),
        torch.autograd.grad(want, factor, g),
        strict=True,
    ):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("p", "r", "modes"), [SHAPES[2], SHAPES[4]])
def test_gradcheck_and_second_derivatives(p, r, modes):
    factor = _factor(p, r, modes)

    def fn(*fs):
        return factor_dense(list(fs))

    assert torch.autograd.gradcheck(fn, factor)
    assert torch.autograd.gradgradcheck(fn, factor)


def test_several_factors_in_one_node_and_an_unused_one():
    groups = [_factor(2, 3, [(2, 3), (3, 1)], seed=1), _factor(2, 3, [(1, 2), (2, 2)], seed=2)]
    outs = factor_dense_all(groups)
    assert outs[0].grad_fn is outs[1].grad_fn  # one node
    for got, group in zip(outs, groups, strict=True):
        torch.testing.assert_close(got, _einsum(group), rtol=1e-12, atol=1e-12)
    flat = [t for g in groups for t in g]

    def fn(*fs):
        return tuple(factor_dense_all([fs[:2], fs[2:]]))

    assert torch.autograd.gradcheck(fn, flat)
    outs[1].sum().backward()  # the first matrix unused: its factors get no gradient
    assert all(f.grad is None for f in groups[0])
    want = torch.autograd.grad(_einsum(groups[1]).sum(), groups[1])
    for f, w in zip(groups[1], want, strict=True):
        torch.testing.assert_close(f.grad, w)


def test_backward_passes_through_one_build():
    factor = _factor(2, 3, [(2, 3), (3, 2)])
    built = factor_dense(factor)  # one build, two losses each back-propagated once
    weights = [torch.randn_like(built) for _ in range(2)]
    for w in weights:
        got = torch.autograd.grad((built * w).sum(), factor)
        want = torch.autograd.grad((_einsum(factor) * w).sum(), factor)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


def test_an_in_place_change_after_the_build_fails_the_backward():
    factor = _factor(1, 2, [(2, 2), (2, 2)])
    built = factor_dense(factor)
    with torch.no_grad():
        factor[1].add_(1.0)
    with pytest.raises(RuntimeError, match=r"CP factor \(1, 2, 2, 2\).*modified by an inplace"):
        built.sum().backward()


def test_where_it_does_not_run():
    factor = _factor(1, 2, [(4, 4), (4, 4)])
    assert native_factor.applies(factor)
    assert not native_factor.applies([f.detach().half() for f in factor])  # dtype
    assert not native_factor.applies([factor[0], factor[1].float()])  # mixed dtypes
    big = _factor(1, 64, [(32, 32), (2, 2)])  # 64 x 4,096 entries
    assert not native_factor.applies(big)
    # more modes, more work: three modes up to 16x the two-mode limit, four up to 32x, where
    # the torch operations' GEMM per mode costs more (the default Elman W_hh's first factor,
    # rank 65 of 4x8, 4x4, 4x1, 4x1: 532,480 multiply-adds, 1.2-1.3x faster here)
    assert native_factor.work_limit(2) == native_factor.MAX_WORK
    assert native_factor.work_limit(3) == 16 * native_factor.MAX_WORK
    assert native_factor.work_limit(4) == 32 * native_factor.MAX_WORK
    assert native_factor.applies(_factor(1, 65, [(4, 8), (4, 4), (4, 1), (4, 1)]))
    assert not native_factor.applies(_factor(1, 130, [(4, 8), (4, 4), (4, 1), (4, 1)]))
    assert not native_factor.applies(_factor(1, 2, [(8, 15), (16, 16)]))  # 61,440 in two modes
    assert native_factor.in_one_node(big)  # by GEMMs in the node
    torch.testing.assert_close(factor_dense(big), _einsum(big))

    def traced(*fs):
        assert not native_factor.applies(list(fs))
        assert not native_factor.in_one_node(list(fs))
        return factor_dense(list(fs))

    # torch.func transforms and a dispatch mode (make_fx) trace the torch operations
    grads = torch.func.grad(lambda *fs: traced(*fs).sum(), argnums=(0, 1))(*factor)
    want = torch.autograd.grad(_einsum(factor).sum(), factor)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)
    graph = torch.fx.experimental.proxy_tensor.make_fx(traced)(*[f.detach() for f in factor])
    torch.testing.assert_close(graph(*factor), _einsum(factor))


def test_without_the_kernel_nor_the_gemms_the_torch_operations_run(monkeypatch):
    factor = _factor(2, 3, [(2, 3), (3, 2)])
    monkeypatch.setattr(native_factor, "MAX_WORK", 0)
    monkeypatch.setattr(native_factor, "GEMMS", False)
    assert not native_factor.in_one_node(factor)
    got = factor_dense(factor)
    assert "FactorDense" not in type(got.grad_fn).__name__
    torch.testing.assert_close(got, factor_dense_torch(factor))
    torch.testing.assert_close(got, _einsum(factor))


# --- the GEMMs: factors the kernel does not take ------------------------------------------

GEMM_SHAPES = SHAPES + [
    (1, 9, [(4, 8), (8, 4), (8, 1), (4, 1)]),  # the default speech cell's W_hh factor, rank 9
    (2, 4, [(1, 1), (3, 2), (2, 5)]),  # a mode of one entry
]


@pytest.fixture
def gemms(monkeypatch):
    """Every factor built by GEMMs in the node: the kernel takes none."""
    monkeypatch.setattr(native_factor, "MAX_WORK", 0)


@pytest.mark.parametrize(("p", "r", "modes"), GEMM_SHAPES)
def test_the_gemms_match_an_einsum(gemms, p, r, modes):
    factor = _factor(p, r, modes, seed=3)
    assert native_factor.in_one_node(factor) and not native_factor.applies(factor)
    got, want = factor_dense(factor), _einsum(factor)
    assert "FactorDense" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, factor, g), torch.autograd.grad(want, factor, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_gemms_in_float32_within_rounding_of_float64(gemms):
    factor = _factor(1, 203, [(4, 8), (8, 4), (8, 1), (4, 1)], seed=4)
    single = [f.detach().float().requires_grad_() for f in factor]
    got, want = factor_dense(single), _einsum(factor)
    scale = want.abs().max()
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, single, g.float()),
        torch.autograd.grad(want, factor, g),
        strict=True,
    ):
        torch.testing.assert_close(a.double() / b.abs().max(), b / b.abs().max(), rtol=0, atol=1e-5)


def test_the_gemms_gradcheck_second_derivatives_and_repeated_backward(gemms):
    factor = _factor(2, 3, [(2, 3), (3, 1), (1, 2)], seed=5)

    def fn(*fs):
        return factor_dense(list(fs))

    assert torch.autograd.gradcheck(fn, factor)
    assert torch.autograd.gradgradcheck(fn, factor)
    built = factor_dense(factor)  # one build, two losses each back-propagated once
    for seed in (6, 7):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(built.shape, dtype=built.dtype, generator=gen)
        got = torch.autograd.grad((built * w).sum(), factor)
        want = torch.autograd.grad((_einsum(factor) * w).sum(), factor)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        factor[0].mul_(2.0)
    with pytest.raises(RuntimeError, match=r"CP factor \(2, 3, 2, 3\).*modified by an inplace"):
        built.sum().backward()


def test_the_kernel_and_the_gemms_in_one_node(monkeypatch):
    small = _factor(2, 3, [(2, 3), (3, 1)], seed=8)
    large = _factor(1, 40, [(8, 8), (8, 8)], seed=9)  # 163,840: beyond the kernel's limit
    assert native_factor.applies(small) and not native_factor.applies(large)
    outs = factor_dense_all([small, large])
    assert outs[0].grad_fn is outs[1].grad_fn
    flat = small + large
    weights = [torch.randn_like(o) for o in outs]

    def loss(built):
        return sum((o * w).sum() for o, w in zip(built, weights, strict=True))

    got = torch.autograd.grad(loss(outs), flat)
    want_outs = [_einsum(small), _einsum(large)]
    want = torch.autograd.grad(loss(want_outs), flat)
    for o, w in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(native_factor, "GEMMS", False)  # the large one on torch operations
    assert not native_factor.in_one_node(large)
    assert "FactorDense" not in type(factor_dense(large).grad_fn).__name__


# --- the kernel without autograd, and one row's gradients through two factors -----------------

ROW_PAIRS = [  # the two factors' modes, (J_d, I_d) each
    ([(2, 1), (2, 1), (2, 1), (2, 1)], [(4, 5), (2, 2), (2, 2), (2, 2)]),
    ([(3, 2), (2, 2)], [(1, 3), (4, 1)]),
    ([(5, 4)], [(2, 3), (3, 1), (1, 2)]),
]


@pytest.mark.parametrize(("p", "r", "modes"), SHAPES[:3])
def test_kernel_build_and_grads_without_autograd(p, r, modes):
    factor = _factor(p, r, modes)
    got, plan = native_factor.kernel_build(factor)
    assert got.grad_fn is None
    want = _einsum(factor)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    plain = [f.detach().contiguous() for f in factor]
    got_grads = native_factor.kernel_grads(plan, plain, g)
    for a, b in zip(got_grads, torch.autograd.grad(want, factor, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _row_case(first, second, r, seed, gathers):
    """Two factors' CP factors (float64), a row, its output gradient, (when ``gathers``) random
    orders of both, and the reference gradients by autograd through the row's product
    ``y = (A_0 ⊗ A_1) x`` in the factors' order."""
    f0, f1 = _factor(1, r, first, seed=seed), _factor(1, r, second, seed=seed + 1)
    a0, a1 = _einsum(f0), _einsum(f1)  # (1, J_n, I_n), with their graphs
    i_total, j_total = a0.shape[2] * a1.shape[2], a0.shape[1] * a1.shape[1]
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(1, i_total, generator=gen, dtype=torch.float64)
    g = torch.randn(1, j_total, generator=gen, dtype=torch.float64)
    in_index = torch.randperm(i_total, generator=gen) if gathers else None
    out_index = torch.randperm(j_total, generator=gen) if gathers else None
    xf = x[:, in_index] if gathers else x  # the row in the factors' order
    gf = g[:, out_index] if gathers else g
    xm = xf.reshape(a0.shape[2], a1.shape[2])  # (I_0, I_1)
    y = torch.einsum("ab,cd,bd->ac", a0[0], a1[0], xm)  # (J_0, J_1): (A_0 ⊗ A_1) x
    want = torch.autograd.grad(y, [*f0, *f1], gf.reshape(y.shape))
    return [f0, f1], (in_index, out_index), x, g, want


def _row_grads(groups, indices, dtype):
    """:class:`RowGrads` of the CP factors ``groups`` in ``dtype``, their matrices by the
    kernel."""
    groups = [[f.detach().to(dtype).contiguous() for f in grp] for grp in groups]
    built = [native_factor.kernel_build(grp) for grp in groups]
    return native_factor.RowGrads([m for m, _ in built], groups, [p for _, p in built], *indices)


@pytest.mark.parametrize("gathers", [False, True])
@pytest.mark.parametrize(("first", "second"), ROW_PAIRS)
def test_one_rows_gradients_match_autograd(first, second, gathers):
    groups, indices, x, g, want = _row_case(first, second, 3, 4, gathers)
    got = _row_grads(groups, indices, torch.float64)(x, g)
    assert [t.shape for t in got] == [t.shape for t in want]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_one_rows_gradients_in_float32_and_fresh_tensors_each_call():
    groups, indices, x, g, want = _row_case(*ROW_PAIRS[0], 4, 9, True)
    single = _row_grads(groups, indices, torch.float32)
    first = single(x.float(), g.float())
    for a, b in zip(first, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    again = single(x.float(), g.float())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, again, strict=True))
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
