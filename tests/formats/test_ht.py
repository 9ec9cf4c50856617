"""HT format: the dimension tree, hand-written reconstructions, counts, the contraction plan,
initialization, hierarchical SVD and every validation error."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kcprnn._cpu import CostModel
from kcprnn.formats._ht_product import _equation
from kcprnn.formats.ht import (
    HTMatrix,
    ht_linear,
    ht_num_params,
    ht_plan,
    ht_to_dense,
    ht_tree,
)

UCF11_IN, UCF11_OUT = (8, 20, 20, 18), (16, 4, 4, 4)


def make(in_modes, out_modes, **kw):
    kw.setdefault("dtype", torch.float64)
    return HTMatrix(
        math.prod(in_modes), math.prod(out_modes), in_modes=in_modes, out_modes=out_modes, **kw
    )


def merged_to_matrix(t, in_modes, out_modes):
    """(J_1 I_1, ..., J_D I_D) merged tensor -> (J, I) matrix, written out independently."""
    d = len(in_modes)
    t = t.reshape([s for j, i in zip(out_modes, in_modes, strict=True) for s in (j, i)])
    t = t.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return t.reshape(math.prod(out_modes), math.prod(in_modes))


# --- tree ---


def test_tree_shapes():
    assert ht_tree(2).children == (None, None, (0, 1))
    assert ht_tree(3).children == (None, None, None, (0, 1), (3, 2))
    assert ht_tree(4).children == (None,) * 4 + ((0, 1), (2, 3), (4, 5))
    t5 = ht_tree(5)  # (((0, 1), 2), (3, 4))
    assert t5.children[5:] == ((0, 1), (5, 2), (3, 4), (6, 7))
    assert t5.spans[t5.root] == (0, 5) and t5.spans[6] == (0, 3)
    assert t5.internal == (5, 6, 7) and t5.parent[t5.root] == -1
    assert t5.split(6) == (5, 2)
    with pytest.raises(ValueError, match="node 2 is a leaf"):
        t5.split(2)


@pytest.mark.parametrize("d", [2, 3, 4, 5, 6, 7])
def test_tree_is_balanced_binary(d):
    tree = ht_tree(d)
    assert tree.num_nodes == 2 * d - 1
    for node, kids in enumerate(tree.children):
        lo, hi = tree.spans[node]
        if kids is None:
            assert (lo, hi) == (node, node + 1)
        else:
            (llo, lhi), (rlo, rhi) = tree.spans[kids[0]], tree.spans[kids[1]]
            assert (llo, lhi, rhi) == (lo, rlo, hi) and 0 <= (lhi - llo) - (rhi - rlo) <= 1
            assert kids[0] < node and kids[1] < node  # post-order


# --- hand-computed reconstructions ---


def test_two_modes_hand_computed():
    in_modes, out_modes = (3, 2), (2, 4)
    w = make(in_modes, out_modes, rank=(2, 3))
    u1, u2 = w.leaves[0].reshape(2, 3, 2), w.leaves[1].reshape(4, 2, 3)
    b = w.root
    # W[(j1, j2), (i1, i2)] = sum_ab U1[(j1 i1), a] B[a, b] U2[(j2 i2), b]
    ref = torch.einsum("kma,ab,lnb->klmn", u1, b, u2).reshape(8, 6)
    torch.testing.assert_close(w.to_dense(), ref)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ ref.T)
    # one entry by hand: row (j1, j2) = (1, 3), column (i1, i2) = (2, 0)
    entry = sum(u1[1, 2, a] * b[a, c] * u2[3, 0, c] for a in range(2) for c in range(3))
    torch.testing.assert_close(w.to_dense()[1 * 4 + 3, 2 * 2 + 0], entry)


def test_three_modes_against_einsum():
    in_modes, out_modes = (3, 4, 2), (2, 1, 5)
    w = make(in_modes, out_modes, rank=(2, 3, 2, 4))  # leaves 2, 3, 2; node (0, 1) rank 4
    (u0, u1, u2), (b01,), root = list(w.leaves), list(w.transfers), w.root
    ref = merged_to_matrix(
        torch.einsum("pa,qb,abe,rc,ec->pqr", u0, u1, b01, u2, root), in_modes, out_modes
    )
    torch.testing.assert_close(w.to_dense(), ref)
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ ref.T)


def test_four_modes_against_einsum_of_whole_tree():
    in_modes, out_modes = (2, 3, 2, 3), (3, 2, 1, 2)
    w = make(in_modes, out_modes, rank=(2, 3, 2, 1, 3, 2))
    (u0, u1, u2, u3), (b01, b23), root = list(w.leaves), list(w.transfers), w.root
    assert b01.shape == (2, 3, 3) and b23.shape == (2, 1, 2) and root.shape == (3, 2)
    t = torch.einsum("pa,qb,abe,rc,sd,cdf,ef->pqrs", u0, u1, b01, u2, u3, b23, root)
    ref = merged_to_matrix(t, in_modes, out_modes)
    torch.testing.assert_close(w.to_dense(), ref)
    x = torch.randn(6, 36, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ ref.T)
    torch.testing.assert_close(
        ht_linear(x, list(w.leaves), list(w.transfers), root, in_modes, out_modes), x @ ref.T
    )


def test_five_modes_against_einsum():
    in_modes, out_modes = (2, 1, 3, 2, 2), (1, 2, 2, 3, 1)
    w = make(in_modes, out_modes, rank=2)
    (u0, u1, u2, u3, u4), (b01, b012, b34), root = list(w.leaves), list(w.transfers), w.root
    t = torch.einsum(
        "pa,qb,abe,rc,ecg,sd,tf,dfh,gh->pqrst", u0, u1, b01, u2, b012, u3, u4, b34, root
    )
    ref = merged_to_matrix(t, in_modes, out_modes)
    torch.testing.assert_close(w.to_dense(), ref)
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ ref.T)


@pytest.mark.parametrize("d", [2, 3, 6, 7])
def test_forward_matches_reconstruction_for_every_depth(d):
    in_modes = tuple([2, 3, 1, 2, 3, 2, 1][:d])
    out_modes = tuple([3, 1, 2, 2, 1, 2, 2][:d])
    w = make(in_modes, out_modes, rank=2)
    x = torch.randn(3, w.in_features, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ w.to_dense().T)


# --- counts ---


@pytest.mark.parametrize("d", [2, 3, 4, 5, 6])
def test_parameter_count_formula(d):
    in_modes, out_modes, r = tuple(range(2, d + 2)), tuple(range(d + 1, 1, -1)), 3
    w = make(in_modes, out_modes, rank=r)
    expected = (
        sum(i * j * r for i, j in zip(in_modes, out_modes, strict=True)) + (d - 2) * r**3 + r**2
    )
    assert w.num_params == expected == sum(p.numel() for p in w.parameters())
    assert ht_num_params(in_modes, out_modes, (r,) * (2 * d - 2)) == expected


def test_parameter_count_per_node_ranks():
    w = make((2, 3, 4), (1, 2, 3), rank=(2, 3, 4, 5))
    # leaves 2*2 + 6*3 + 12*4, transfer of node (0, 1): 2*3*5, root: 5*4
    assert w.num_params == 4 + 18 + 48 + 30 + 20
    shapes = {name: tuple(p.shape) for name, p in w.named_parameters()}
    assert shapes == {
        "leaves.0": (2, 2),
        "leaves.1": (6, 3),
        "leaves.2": (12, 4),
        "transfers.0": (2, 3, 5),
        "root": (5, 4),
    }


def test_matmul_flops_ucf11_hand_count():
    w = HTMatrix(57600, 1024, in_modes=UCF11_IN, out_modes=UCF11_OUT, rank=4)
    per_row = (
        57600 * 16  # i_4 (18) -> (a_4, j_4)
        + 4 * 640 * 20 * 16  # (a_4, i_3) -> (a_34, j_3), the other axes 4 * 8 * 20
        + 4 * 128 * 20 * 16  # (a_34, i_2) -> (a_1, j_2) through the root, the others 4 * 4 * 8
        + 4 * 64 * 8 * 16  # (a_1, i_1) -> j_1
    )
    # two leaves (J I r) fused with their parent's r^3 transfer, the r^2 root into one of them
    fixed = 2 * (4 * 20 * 4**3) + 4**4
    assert w.matmul_flops(96) == 96 * per_row + fixed
    assert all(step.perm is None for step in w.plan.steps) and w.plan.final_perm is None
    assert w.plan.steps[0].nodes == (3,) and w.plan.steps[0].where == "suffix"


def addmm_inplace_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@pytest.mark.parametrize("d", [2, 3, 4, 6])
def test_flop_counts_match_executed_products(d):
    in_modes = tuple([3, 2, 4, 2, 3, 2][:d])
    out_modes = tuple([2, 3, 1, 2, 2, 3][:d])
    w = make(in_modes, out_modes, rank=(2, 3) * (d - 1))
    x = torch.randn(5, w.in_features, dtype=torch.float64)
    # the accumulating products are in-place addmm_, which the counter does not map by default
    mapping = {torch.ops.aten.addmm_: addmm_inplace_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        w(x)
    assert counter.get_total_flops() == 2 * w.matmul_flops(5)
    with FlopCounterMode(display=False) as counter:
        w.to_dense()
    assert counter.get_total_flops() == 2 * w.reconstruction_flops()


# --- initialization ---


def test_init_gives_exact_std_and_orthonormal_frames():
    w = make((4, 6, 5, 3), (4, 3, 4, 2), rank=3)
    for std in (0.02, w.default_std()):
        w.reset_parameters(std)
        torch.testing.assert_close(w.to_dense().pow(2).mean().sqrt().item(), std)
        for u in (*w.leaves, *(b.reshape(-1, b.shape[-1]) for b in w.transfers)):
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype))


def test_init_with_wide_frames_keeps_std_on_average():
    # leaf frames (J_d I_d = 2, r = 3) cannot have orthonormal columns
    w = make((2, 1, 2), (1, 2, 1), rank=3)
    second = []
    for seed in range(200):
        torch.manual_seed(seed)
        w.reset_parameters(0.1)
        second.append(w.to_dense().pow(2).mean())
    assert torch.stack(second).mean().sqrt().item() == pytest.approx(0.1, rel=0.1)


# --- hierarchical SVD ---


def test_from_dense_full_rank_reproduces_weight():
    in_modes, out_modes = (2, 3, 2), (2, 1, 3)
    weight = torch.randn(6, 12, dtype=torch.float64)
    # matricization ranks: leaves min(4, 18), min(3, 24), min(6, 12); node (0, 1) min(12, 6)
    w = HTMatrix.from_dense(weight, in_modes=in_modes, out_modes=out_modes, rank=6)
    torch.testing.assert_close(w.to_dense(), weight)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ weight.T)


def test_from_dense_recovers_an_ht_matrix_at_its_rank():
    src = make((3, 2, 2, 3), (2, 2, 3, 1), rank=2)
    w = HTMatrix.from_dense(
        src.to_dense().detach(), in_modes=src.in_modes, out_modes=src.out_modes, rank=2
    )
    assert w.root.dtype == torch.float64
    torch.testing.assert_close(w.to_dense(), src.to_dense())


def test_from_dense_needs_a_matrix():
    with pytest.raises(ValueError, match=r"2-D weight, got shape \(3, 4, 2\)"):
        HTMatrix.from_dense(torch.randn(3, 4, 2))


# --- gradients ---


@pytest.mark.parametrize(
    "in_modes, out_modes, rank",
    [
        ((3, 2, 2, 3), (2, 1, 2, 2), (2, 3, 2, 2, 3, 2)),
        ((2, 1, 2, 2, 1, 2), (1, 2, 1, 2, 2, 1), 2),
    ],
)
def test_gradcheck_ht_linear(in_modes, out_modes, rank):
    w = make(in_modes, out_modes, rank=rank)
    leaves = [p.detach().clone().requires_grad_(True) for p in w.leaves]
    transfers = [p.detach().clone().requires_grad_(True) for p in w.transfers]
    root = w.root.detach().clone().requires_grad_(True)
    x = torch.randn(2, w.in_features, dtype=torch.float64, requires_grad=True)
    n, t = len(leaves), len(transfers)

    def fn(x, *ps):
        return ht_linear(x, ps[:n], ps[n : n + t], ps[-1], in_modes, out_modes)

    assert torch.autograd.gradcheck(fn, (x, *leaves, *transfers, root))


def test_second_derivatives():
    w = make((2, 3, 2), (2, 1, 3), rank=2)
    params = [p.detach().clone().requires_grad_(True) for p in w.parameters()]
    names = [name for name, _ in w.named_parameters()]
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, *values):
        return torch.func.functional_call(w, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_to_dense_gradient_matches_forward_gradient():
    w = make((2, 3, 2), (3, 1, 2), rank=2)
    x = torch.randn(4, 12, dtype=torch.float64)
    params = list(w.parameters())
    g_fact = torch.autograd.grad(w(x).pow(2).sum(), params)
    g_dense = torch.autograd.grad(
        (x @ ht_to_dense(list(w.leaves), list(w.transfers), w.root, w.in_modes, w.out_modes).T)
        .pow(2)
        .sum(),
        params,
    )
    for a, b in zip(g_fact, g_dense, strict=True):
        torch.testing.assert_close(a, b)


# --- validation ---


def test_one_mode_is_rejected():
    with pytest.raises(ValueError, match=r"at least 2 modes.*in_modes=\[12\]"):
        HTMatrix(12, 6, in_modes=(12,), out_modes=(6,))
    with pytest.raises(ValueError, match=r"at least 2 modes.*in_modes=\[3\]"):
        HTMatrix(3, 2)  # sizes this small default to one mode
    with pytest.raises(ValueError, match="num_modes=1"):
        ht_tree(1)


def test_rank_validation():
    with pytest.raises(ValueError, match=r"rank needs 4 entries, got rank=\[2, 2\] \(2\)"):
        make((2, 3, 2), (2, 1, 3), rank=(2, 2))
    with pytest.raises(ValueError, match=r"rank must be positive, got rank=0"):
        make((2, 3, 2), (2, 1, 3), rank=0)
    with pytest.raises(ValueError, match=r"rank\[2\] must be positive, got rank\[2\]=-1"):
        make((2, 3, 2), (2, 1, 3), rank=(2, 2, -1, 2))
    with pytest.raises(TypeError, match=r"rank must be a positive int, got 2.5"):
        make((2, 3, 2), (2, 1, 3), rank=2.5)


def test_repr_shows_ranks():
    assert "rank=3" in repr(make((2, 3), (2, 2), rank=3))
    assert "rank=[2, 3]" in repr(make((2, 3), (2, 2), rank=(2, 3)))


def test_plan_starts_with_a_shrinking_mode():
    # the trailing mode would grow the input 8x (I = 3 -> J r = 24); mode 1 shrinks it (5 -> 4)
    w = make((4, 5, 3), (2, 1, 8), rank=(3, 4, 3, 2))
    assert w.plan.leaf_order[0] == 1 and w.plan.input_perm is not None
    assert w.plan.steps[0].block == 5 and w.plan.steps[0].out == 4
    x = torch.randn(3, 60, dtype=torch.float64)
    torch.testing.assert_close(w(x), x @ w.to_dense().T)
    # with a trailing mode that shrinks enough, the input is never permuted
    assert ht_plan(UCF11_IN, UCF11_OUT, (4,) * 6).input_perm is None


def test_generated_einsum_equation():
    j0, i0, a0, a1, a3 = ("j", 0), ("i", 0), ("a", 0), ("a", 1), ("a", 3)
    eq = _equation([[j0, i0, a0], [a0, a1, a3]], [a1, i0, a3, j0])
    assert eq == "abc,cde->dbea"
    u, t = torch.randn(2, 3, 4), torch.randn(4, 5, 6)
    ref = torch.stack([torch.stack([u[:, i, :] @ t[:, a, :] for i in range(3)]) for a in range(5)])
    torch.testing.assert_close(torch.einsum(eq, u, t), ref.permute(0, 1, 3, 2))


def test_plan_is_cached_per_shape():
    assert ht_plan(UCF11_IN, UCF11_OUT, (4,) * 6) is ht_plan(UCF11_IN, UCF11_OUT, (4,) * 6)


def test_plan_follows_the_cost_model():
    shape = ((4, 5, 3), (2, 1, 8), (3, 4, 3, 2))
    searched = ht_plan(*shape)
    assert searched.leaf_order[0] == 1  # as in test_plan_starts_with_a_shrinking_mode
    # copies priced out, or no search over 3 modes: the natural order, no input permutation
    for model in (CostModel().replace(ht_move=1e9), CostModel().replace(ht_max_search=2)):
        plan = ht_plan(*shape, model)
        assert plan.leaf_order == (2, 1, 0) and plan.input_perm is None
        assert plan.macs_per_row > searched.macs_per_row
    w = make(*shape[:2], rank=shape[2])
    x = torch.randn(3, 60, dtype=torch.float64)
    y = w(x)
    assert w.plan is searched
    w.cost_model = CostModel().replace(ht_max_search=2)
    assert w.plan.input_perm is None
    assert w.matmul_macs(3) == 3 * w.plan.macs_per_row + w.plan.macs_fixed
    torch.testing.assert_close(w(x), y)
    w.cost_model = None
    assert w.plan is searched
