"""Dense reconstructions (``to_dense``) of the CP, Tucker, BT, TT and TR formats against
straightforward reference reconstructions written here (per-rank Kronecker products, one
``einsum`` over all factors, the ring's trace entry by entry), in float64: the matrix, the
factors' gradients, ``gradcheck`` and second derivatives of the hand-written backwards, on
several mode counts, ranks and shapes, including the slabbed join of large matrices."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kcprnn
from kcprnn.formats import _halves
from kcprnn.formats._halves import (
    half_to_merged,
    join_halves,
    merged_to_half,
    outer_grads,
    outer_rows,
)
from kcprnn.formats._ring import ring_to_dense
from kcprnn.formats.cp import cp_split, cp_to_dense
from kcprnn.formats.tucker import tucker_to_dense

TOL = {"rtol": 1e-10, "atol": 1e-12}


def merged_to_w(t, in_modes, out_modes):
    """``(J_1 I_1, ..., J_D I_D)`` (merged, ``j_d`` major) -> ``(J, I)``, written out here."""
    d = len(in_modes)
    t = t.reshape([s for e in range(d) for s in (out_modes[e], in_modes[e])])
    t = t.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    return t.reshape(math.prod(out_modes), math.prod(in_modes))


def ref_cp(factors):
    # W = sum_r U_1[r] (x) ... (x) U_D[r]
    total = 0
    for r in range(factors[0].shape[0]):
        term = factors[0][r]
        for u in factors[1:]:
            term = torch.kron(term, u[r])
        total = total + term
    return total


def ref_tucker(factors, core, in_modes, out_modes):
    # one einsum over the core and every factor, blocks summed; factors (C, J_d I_d, R_d)
    d = len(factors)
    if core.dim() == d:
        core, factors = core.unsqueeze(0), [a.unsqueeze(0) for a in factors]
    operands = [core, [0, *range(1, d + 1)]]
    for e, a in enumerate(factors):
        operands += [a, [0, d + 1 + e, 1 + e]]
    t = torch.einsum(*operands, list(range(d + 1, 2 * d + 1)))
    return merged_to_w(t, in_modes, out_modes)


def ref_ring(cores):
    # W[(j), (i)] = Tr(G_1[:, j_1, i_1, :] ... G_D[:, j_D, i_D, :]), all entries at once
    d = len(cores)
    operands = []
    for e, g in enumerate(cores):
        operands += [g, [e, d + e, 2 * d + e, (e + 1) % d]]
    out_modes = [g.shape[1] for g in cores]
    in_modes = [g.shape[2] for g in cores]
    t = torch.einsum(*operands, [*range(d, 2 * d), *range(2 * d, 3 * d)])
    return t.reshape(math.prod(out_modes), math.prod(in_modes))


def reference(w):
    name = w.format_name
    if name == "cp":
        return ref_cp(list(w.factors))
    if name in ("tucker", "bt"):
        return ref_tucker(list(w.factors), w.core, w.in_modes, w.out_modes)
    return ref_ring(list(w.cores))


SPEECH_HH = {"in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4]}
CASES = [
    ("cp", (512, 2048), {**SPEECH_HH, "rank": 5}),
    ("cp", (24, 10), {"in_modes": [3, 4, 2], "out_modes": [2, 1, 5], "rank": 3}),
    ("cp", (40, 84), {"num_modes": 2, "rank": 4}),
    ("cp", (6, 10), {"in_modes": [3, 1, 2], "out_modes": [2, 1, 5], "rank": 3}),
    ("cp", (21, 16), {"in_modes": [7, 3, 1, 1], "out_modes": [2, 2, 2, 2], "rank": 3}),
    ("cp", (2 * 3 * 2 * 2 * 2, 3 * 2 * 2 * 2 * 2), {"num_modes": 5, "rank": 2}),
    ("cp", (6, 4), {"num_modes": 1, "rank": 3}),
    ("tucker", (512, 2048), {**SPEECH_HH, "rank": [3, 2, 2, 3]}),
    ("tucker", (24, 10), {"in_modes": [3, 4, 2], "out_modes": [2, 1, 5], "rank": [1, 2, 3]}),
    ("tucker", (60, 84), {"num_modes": 3, "rank": [2, 3, 4]}),
    ("tucker", (24, 40), {"num_modes": 1, "rank": 5}),
    ("tucker", (2 * 3 * 2 * 2 * 2, 3 * 2 * 2 * 2 * 2), {"num_modes": 5, "rank": 2}),
    ("bt", (512, 2048), {**SPEECH_HH, "rank": 2, "blocks": 2}),
    ("bt", (96, 30), {"num_modes": 2, "rank": [2, 3], "blocks": 3}),
    ("bt", (24, 40), {"num_modes": 1, "rank": 3, "blocks": 2}),
    ("bt", (24, 10), {"in_modes": [3, 4, 2], "out_modes": [2, 1, 5], "rank": 2, "blocks": 3}),
    ("tt", (512, 2048), {**SPEECH_HH, "rank": 3}),
    ("tt", (24, 10), {"in_modes": [3, 4, 2], "out_modes": [2, 1, 5], "rank": [2, 3]}),
    ("tt", (60, 84), {"num_modes": 2, "rank": 4}),
    ("tt", (16, 16), {"in_modes": [2] * 4, "out_modes": [2] * 4, "rank": [1, 4, 4]}),
    ("tt", (21, 16), {"in_modes": [7, 3, 1, 1], "out_modes": [2, 2, 2, 2], "rank": [3, 1, 2]}),
    ("tr", (512, 2048), {**SPEECH_HH, "rank": 2}),
    ("tr", (24, 10), {"in_modes": [3, 4, 2], "out_modes": [2, 1, 5], "rank": [2, 3, 1]}),
    ("tr", (24, 40), {"num_modes": 1, "rank": 3}),
    ("tr", (21, 16), {"in_modes": [7, 3, 1, 1], "out_modes": [2, 2, 2, 2], "rank": [2, 3, 1, 2]}),
    ("tr", (2 * 3 * 2 * 2 * 2, 3 * 2 * 2 * 2 * 2), {"num_modes": 5, "rank": 2}),
]


def make(fmt, shape, options, seed=0):
    torch.manual_seed(seed)
    return kcprnn.formats.make_matrix(fmt, *shape, dtype=torch.float64, **options)


@pytest.mark.parametrize(("fmt", "shape", "options"), CASES)
def test_to_dense_and_gradients_match_the_reference(fmt, shape, options):
    w = make(fmt, shape, options)
    want = reference(w)
    got = w.to_dense()
    assert got.shape == (w.out_features, w.in_features) and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():  # the path without autograd gives the same matrix
        torch.testing.assert_close(w.to_dense(), want, **TOL)
    probe = torch.randn_like(want)
    params = list(w.parameters())
    got_grads = torch.autograd.grad(got, params, probe)
    want_grads = torch.autograd.grad(want, params, probe)
    for name, a, b in zip(dict(w.named_parameters()), got_grads, want_grads, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("fmt", "shape", "options"), CASES)
def test_to_dense_with_small_slabs(fmt, shape, options, monkeypatch):
    # slabs of a few entries: every join runs its slab loops (uneven last slab included)
    monkeypatch.setattr(_halves, "JOIN_CHUNK_ELEMENTS", 7)
    w = make(fmt, shape, options, seed=1)
    want = reference(w)
    got = w.to_dense()
    torch.testing.assert_close(got, want, **TOL)
    probe = torch.randn_like(want)
    params = list(w.parameters())
    for a, b in zip(
        torch.autograd.grad(got, params, probe),
        torch.autograd.grad(want, params, probe),
        strict=True,
    ):
        torch.testing.assert_close(a, b, **TOL)


FIVE = {"in_modes": [2, 1, 2, 1, 2], "out_modes": [1, 2, 1, 2, 2]}
GRADCHECK = [c for c in CASES if c[1][0] * c[1][1] <= 250] + [
    ("cp", (12, 6), {"num_modes": 2, "rank": 3}),
    ("cp", (8, 8), {**FIVE, "rank": 2}),
    ("tucker", (6, 4), {"num_modes": 1, "rank": 3}),
    ("tucker", (8, 8), {**FIVE, "rank": [2, 1, 2, 1, 2]}),
    ("bt", (6, 4), {"num_modes": 1, "rank": 2, "blocks": 2}),
    ("bt", (12, 6), {"num_modes": 2, "rank": [2, 3], "blocks": 2}),
    ("tt", (8, 8), {**FIVE, "rank": 2}),
    ("tr", (6, 4), {"num_modes": 1, "rank": 2}),
    ("tr", (8, 8), {**FIVE, "rank": 2}),
]


def pure_to_dense(w):
    """The format's pure reconstruction as a function of its parameters (in their order)."""
    name = w.format_name
    if name == "cp":
        return lambda *factors: cp_to_dense(factors)
    if name in ("tucker", "bt"):
        # parameters() yields the module's own core before the factors' list
        return lambda core, *factors: tucker_to_dense(factors, core, w.in_modes, w.out_modes)
    return lambda *cores: ring_to_dense(cores)


@pytest.mark.parametrize("slab", [7, 1 << 18])
@pytest.mark.parametrize(("fmt", "shape", "options"), GRADCHECK)
def test_gradcheck_of_to_dense(fmt, shape, options, slab, monkeypatch):
    monkeypatch.setattr(_halves, "JOIN_CHUNK_ELEMENTS", slab)
    w = make(fmt, shape, options)
    params = [p.detach().clone().requires_grad_(True) for p in w.parameters()]
    fn = pure_to_dense(w)
    torch.testing.assert_close(fn(*params), w.to_dense(), **TOL)
    assert torch.autograd.gradcheck(fn, params)
    if slab == 7 and w.out_features * w.in_features <= 64:  # second derivatives: a few cases
        assert torch.autograd.gradgradcheck(fn, params)


def test_join_halves_by_definition_with_gradients(monkeypatch):
    monkeypatch.setattr(_halves, "JOIN_CHUNK_ELEMENTS", 5)
    torch.manual_seed(0)
    left = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    right = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    want = sum(torch.kron(left[s], right[s]) for s in range(3))
    got = join_halves(left, right)
    torch.testing.assert_close(got, want, **TOL)
    assert torch.autograd.gradcheck(join_halves, (left, right))
    assert torch.autograd.gradgradcheck(join_halves, (left, right))


def test_outer_products_and_their_gradients():
    torch.manual_seed(0)
    vectors = [torch.randn(2, m, dtype=torch.float64) for m in (3, 1, 4, 2)]
    for count in (1, 2, 3, 4):
        leaves = [v.clone().requires_grad_(True) for v in vectors[:count]]
        out = outer_rows(leaves)
        want = leaves[0]
        for v in leaves[1:]:
            want = torch.stack([torch.outer(a, b).flatten() for a, b in zip(want, v, strict=True)])
        torch.testing.assert_close(out, want, **TOL)
        probe = torch.randn_like(out)
        expected = torch.autograd.grad(out, leaves, probe)
        for a, b in zip(outer_grads(probe, vectors[:count]), expected, strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_merged_and_half_layouts_are_inverse():
    t = torch.arange(2 * 6 * 10, dtype=torch.float64).reshape(2, 60)
    half = merged_to_half(t, [2, 5], [3, 2])  # merged (j_1 i_1, j_2 i_2) = (6, 10)
    for j1, i1, j2, i2 in [(0, 0, 0, 0), (1, 2, 4, 1), (1, 0, 3, 1)]:
        assert half[1, j1 * 5 + j2, i1 * 2 + i2] == t[1, (j1 * 3 + i1) * 10 + j2 * 2 + i2]
    torch.testing.assert_close(half_to_merged(half, [2, 5], [3, 2]), t)


def test_splits_by_hand():
    # speech W_ih, input 123: merged modes (328, 24, 8, 4); 1 + 3 factors keep the Kronecker
    # products at 24 * 8 + 24 * 8 * 4 = 960 entries per rank (2 + 2: 328 * 24 = 7,872)
    assert cp_split([41, 3, 1, 1], [8, 8, 8, 4]) == 1
    assert cp_split([8, 4, 4, 4], [8, 8, 8, 4]) == 2  # speech W_hh: (64 * 32) + (32 * 16)


def no_unit_bond(options):
    rank = options.get("rank")
    return 1 not in (rank if isinstance(rank, list) else [rank])


# a bond of size 1 makes einsum multiply instead of calling a GEMM, which the counter skips
@pytest.mark.parametrize(
    ("fmt", "shape", "options"),
    [c for c in CASES if c[0] in ("tucker", "bt", "tt", "tr") and no_unit_bond(c[2])],
)
def test_reconstruction_macs_match_executed_products(fmt, shape, options):
    w = make(fmt, shape, options)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        w.to_dense()
    assert counter.get_total_flops() == 2 * w.reconstruction_macs()
