"""The formats' products on one row as a chain in one autograd node (``kcprnn.formats._chain``,
``kcprnn._cpu.native_chain``), against each format's dense reconstruction in float64: values,
gradients, gradcheck and second derivatives, every chain format at several mode counts,
ranks and blocks, float32 against the format's own product; the plans' checks; and where the
chain must not run (more rows, another dtype, a non-contiguous tensor)."""

from __future__ import annotations

import itertools

import pytest
import torch

from kcprnn._cpu import native
from kcprnn._cpu.native_chain import native_chain
from kcprnn.formats import _chain, make_matrix
from kcprnn.formats._base import CHAIN_ROWS
from kcprnn.formats._chain import (
    ChainSpec,
    best_plan,
    chain_linear,
    chain_macs,
    chain_plan,
    chain_reference,
    cheapest_order,
    greedy_order,
)

pytestmark = pytest.mark.skipif(not native.available(), reason="the kernels are not built here")

CASES = [  # (format, in, out, modes, options)
    ("tt", 40, 512, 4, {"rank": 4}),
    ("tt", 24, 10, 3, {"rank": [2, 3]}),
    ("tr", 40, 512, 4, {"rank": 3}),
    ("tr", 12, 6, 2, {"rank": 2}),
    ("cp", 60, 30, 5, {"rank": 3}),
    ("cp", 12, 6, 2, {"rank": 2}),
    ("tucker", 40, 512, 4, {"rank": 2}),
    ("tucker", 24, 10, 3, {"rank": [2, 1, 3]}),
    ("bt", 40, 512, 4, {"rank": 2, "blocks": 3}),
    ("bt", 12, 6, 2, {"rank": 2, "blocks": 2}),
    ("ht", 40, 512, 4, {"rank": 3}),
    ("ht", 60, 30, 5, {"rank": 2}),
    ("ht", 12, 6, 2, {"rank": 2}),
    ("kcp", 40, 512, 4, {"rank": 3}),
    ("kcp", 24, 10, 3, {"rank": [2, 3], "terms": 2}),
    ("kcp", 60, 36, 2, {"rank": 2, "num_factors": 3}),
    ("kcp", 40, 96, 2, {"rank": 6, "in_modes": [[5, 2], [4, 1]], "out_modes": [[12, 2], [4, 1]]}),
]
IDS = [f"{c[0]}-{c[1]}x{c[2]}-D{c[3]}" for c in CASES]


def _chained(out):
    """Whether ``out`` (``forward``'s output, a view of the product) came from the chain."""
    node = out.grad_fn
    names = {type(node).__name__, *(type(n).__name__ for n, _ in node.next_functions if n)}
    return any("NativeChain" in name for name in names)


def _matrix(case, dtype=torch.float64, seed=0):
    fmt, i, o, d, options = case
    torch.manual_seed(seed)
    return make_matrix(fmt, i, o, num_modes=d, dtype=dtype, **options)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_row_matches_the_dense_matrix_with_gradients(case):
    m = _matrix(case)
    x = torch.randn(1, m.in_features, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert _chained(out)
    w = m.to_dense()
    torch.testing.assert_close(out, x @ w.T, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    expected = torch.autograd.grad(x @ w.T, [x, *m.parameters()], g)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_and_second_derivatives(case):
    m = _matrix(case)
    x = torch.randn(1, m.in_features, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *_):
        return m(x)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("case", CASES[::3], ids=IDS[::3])
def test_bias_is_added_in_the_kernel_with_its_gradient(case):
    m = _matrix(case)
    x = torch.randn(1, m.in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m.out_features, dtype=torch.float64, requires_grad=True)
    out = m(x, bias)
    assert _chained(out)
    torch.testing.assert_close(out, x @ m.to_dense().T + bias, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, b, *_: m(x, b), (x, bias, *m.parameters()))
    assert torch.autograd.gradgradcheck(lambda x, b, *_: m(x, b), (x, bias, *m.parameters()))


def test_autocast_and_batched_inputs_leave_the_chain():
    m = _matrix(CASES[0], dtype=torch.float32)
    x = torch.randn(1, m.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _chained(m(x))
    three = torch.randn(1, 1, m.in_features, requires_grad=True)  # one row with a lead axis
    out = m(three)
    assert out.shape == (1, 1, m.out_features)
    torch.testing.assert_close(out[0], m(three[0]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_chain_and_float32_match_the_formats_product(case):
    m = _matrix(case, dtype=torch.float32, seed=1)
    x = torch.randn(1, m.in_features)
    plan = m._chain_plan()
    with torch.no_grad():
        own = m.matmul(x)
        torch.testing.assert_close(m(x), own, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chain_reference(x, plan, m.chain_tensors()), own)


def test_more_rows_and_other_inputs_take_the_formats_own_product():
    m = _matrix(CASES[0], dtype=torch.float32)
    rows = torch.randn(CHAIN_ROWS + 1, m.in_features, requires_grad=True)
    assert not _chained(m(rows))
    plan = m._chain_plan()
    x = torch.randn(1, m.in_features)
    assert chain_linear(x.double(), plan, m.chain_tensors()) is None  # dtypes differ
    strided = [t.detach().mT.contiguous().mT for t in m.chain_tensors()]
    assert chain_linear(x, plan, strided) is None  # not contiguous
    assert chain_linear(x, plan, [t.detach() for t in m.chain_tensors()]) is not None
    torch.manual_seed(0)
    tucker = make_matrix("tucker", 512, 512, rank=4)  # chained in an order other than the spec's
    plan = tucker._chain_plan()
    x = torch.randn(1, 512)
    assert plan.order != tuple(range(len(plan.order)))
    listed = [t.detach() for t in tucker.chain_tensors()]
    # the kernel reads each tensor at its step's size: the spec's order is refused, not read
    assert native_chain(x, plan, listed) is None
    assert native_chain(x, plan, [listed[i] for i in plan.order]) is not None


def test_dense_has_no_chain_and_kcp_chains_only_in_training():
    assert make_matrix("dense", 40, 512).chain_spec() is None
    torch.manual_seed(0)
    m = make_matrix("kcp", 40, 512, rank=8)
    x = torch.randn(1, 40)
    assert m.chain_for(1) is not None  # its factors require gradients
    assert _chained(m(x))
    assert m.chain_for(1, training=False) is None
    with torch.no_grad():  # inference keeps the built factor matrices between calls
        assert m.chain_for(1) is None
        torch.testing.assert_close(m(x), x @ m.to_dense().T, rtol=1e-4, atol=1e-5)
    m.requires_grad_(False)
    assert m.chain_for(1) is None
    assert m.chain_for(1, training=True) is not None
    dense = make_matrix("kcp", 40, 512, rank=8, algorithm="dense")
    assert dense.chain_for(1, training=True) is None
    one_mode = make_matrix("kcp", 4, 4, num_modes=1, rank=2)  # each rank summed in one tensor
    assert one_mode.chain_spec() is None and one_mode.chain_for(1) is None


def test_kcp_chains_only_where_it_costs_fewer_macs_than_its_own_product():
    torch.manual_seed(0)
    for rank in (1, 4, 64):
        m = make_matrix("kcp", 40, 512, rank=rank)
        plan = m._chain_plan()
        cheaper = plan.macs(1) < m.matmul_macs(1, training=True)
        assert (m.chain_for(1) is not None) == cheaper


def _one_step(n, m, k, p, transposed):
    """A chain of one step ``(n, m, k, p)``: the input's labels in the step's order, or with
    the contracted and carried labels swapped (the kernel's transposed step)."""
    labels = ("N", "K", "M") if transposed else ("N", "M", "K")
    sizes = {"N": n, "M": m, "K": k}
    spec = ChainSpec(labels, tuple(sizes[a] for a in labels), (((n, k, p), ("N", "K", "P")),),
                     ("N", "M", "P"))  # fmt: skip
    plan = chain_plan(spec)
    assert (plan.steps[0].n, plan.steps[0].m, plan.steps[0].k, plan.steps[0].p) == (n, m, k, p)
    return plan


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8, 12, 16, 17])
@pytest.mark.parametrize("transposed", [False, True], ids=["nmk", "nkm"])
def test_every_product_kernel_matches_torch_with_gradients(p, transposed):
    # widths with a vector row (powers of two up to 16), narrow widths run along the longer
    # side, wide ones along P; short and long sides, batched and not, each way
    torch.manual_seed(p)
    for n, m, k in [(1, 9, 20), (3, 5, 8), (2, 13, 1), (1, 1, 3), (4, 2, 33)]:
        plan = _one_step(n, m, k, p, transposed)
        x = torch.randn(1, n * m * k, dtype=torch.float64, requires_grad=True)
        w = torch.randn(n * k * p, dtype=torch.float64, requires_grad=True)
        got = chain_linear(x, plan, [w])
        want = chain_reference(x, plan, [w])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(want)
        grads = torch.autograd.grad(got, [x, w], g)
        expected = torch.autograd.grad(want, [x, w], g)
        for a, b in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        x32, w32 = x.detach().float(), w.detach().float()
        torch.testing.assert_close(
            chain_linear(x32, plan, [w32]), chain_reference(x32, plan, [w32]), rtol=1e-5, atol=1e-5
        )


def test_a_state_laid_out_transposed_is_read_in_place():
    from kcprnn._cpu.native_chain import chain_layout

    record = 2 * (1 + 2 * 16) + 8  # kRecord: the packings, the sizes and offsets, the flag
    for transposed in (False, True):
        layout = chain_layout(_one_step(2, 5, 7, 3, transposed), 1)
        assert int(layout.records[record - 1]) == int(transposed)
        assert int(layout.records[0]) == 0  # A's packing: none (the state read in place)


def test_a_hand_computed_chain():
    # W[j, i] = a[j] b[i], 2 x 3: x . b (the one contracted label), then the outer product with a
    spec = ChainSpec(("i",), (3,), (((3,), ("i",)), ((2,), ("j",))), ("j",))
    plan = chain_plan(spec)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    a = torch.tensor([4.0, 5.0], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)  # x . b = -2
    want = torch.tensor([[-8.0, -10.0]], dtype=torch.float64)
    torch.testing.assert_close(chain_linear(x, plan, [b, a]), want)
    assert chain_macs(plan, 1) == 3 + 2


def test_plans_refuse_labels_that_do_not_describe_a_product():
    with pytest.raises(ValueError, match="rows' label"):
        chain_plan(ChainSpec(("b",), (2,), (((2, 2), ("b", "j")),), ("j",)))
    with pytest.raises(ValueError, match="sums its own label"):
        chain_plan(ChainSpec(("i",), (2,), (((2, 3), ("i", "r")),), ("j",)))
    with pytest.raises(ValueError, match="has labels"):
        chain_plan(ChainSpec(("i",), (2,), (((2, 2), ("i", "i")),), ("i",)))
    with pytest.raises(ValueError, match="has sizes"):
        chain_plan(ChainSpec(("i",), (2,), (((3, 2), ("i", "j")),), ("j",)))
    with pytest.raises(ValueError, match="not the output"):
        chain_plan(ChainSpec(("i", "k"), (2, 2), (((2, 2), ("i", "j")),), ("j",)))
    with pytest.raises(ValueError, match="not a permutation"):
        chain_plan(ChainSpec(("i",), (2,), (((2, 2), ("i", "j")),), ("j",)), order=(1,))


def test_greedy_order_is_a_valid_cheaper_order_for_a_tree():
    m = _matrix(CASES[10])  # HT, 4 modes
    spec = m.chain_spec()
    order = greedy_order(spec)
    assert sorted(order) == list(range(len(spec.operands)))
    assert chain_macs(chain_plan(spec, order), 1) < chain_macs(chain_plan(spec), 1)
    # the plan takes the searched order, which is cheaper still here
    assert m._chain_plan().order == cheapest_order(spec)
    assert chain_macs(m._chain_plan(), 1) < chain_macs(chain_plan(spec, order), 1)


def _every_order_macs(spec):
    """Multiply-accumulates on one row of every order of ``spec``'s operands that describes
    the product (the reference for the search)."""
    found = {}
    for order in itertools.permutations(range(len(spec.operands))):
        try:
            found[order] = chain_macs(chain_plan(spec, order), 1)
        except ValueError:  # an operand that would sum a label of its own
            continue
    return found


@pytest.mark.parametrize(
    ("fmt", "i", "o", "d", "options"),
    [
        ("ht", 123, 1024, 4, {"rank": 4}),
        ("ht", 60, 30, 3, {"rank": 3}),
        ("tucker", 512, 2048, 4, {"rank": 4}),
        ("bt", 40, 2048, 3, {"rank": 2, "blocks": 2}),
        ("tr", 512, 2048, 4, {"rank": 4}),
        ("cp", 40, 2048, 4, {"rank": 4}),
    ],
)
def test_the_searched_order_is_the_cheapest_of_every_order(fmt, i, o, d, options):
    torch.manual_seed(0)
    spec = make_matrix(fmt, i, o, num_modes=d, **options).chain_spec()
    every = _every_order_macs(spec)
    order = cheapest_order(spec)
    assert every[order] == min(every.values())
    assert chain_macs(best_plan(spec), 1) == min(every.values())


def test_past_the_search_the_plan_keeps_the_listed_or_greedy_order(monkeypatch):
    spec = _matrix(CASES[10]).chain_spec()  # HT, 4 modes: 7 operands
    monkeypatch.setattr(_chain, "MAX_SEARCH", 6)
    _chain.cheapest_order.cache_clear()
    try:
        assert cheapest_order(spec) is None
        assert best_plan(spec).order == greedy_order(spec)
    finally:
        _chain.cheapest_order.cache_clear()
