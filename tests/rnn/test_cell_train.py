"""A cell step under autograd as one node on the compiled kernels (``kcprnn.rnn._cell_train``)
against torch's cells on the float64 reconstruction of the same weights: values and the
gradients of the input, the state, the biases and every parameter, for LSTM, GRU and Elman
cells with KCP, dense and the other formats' chained matrices, unbatched, without biases, over a
sequence of steps with one backward, with second derivatives (recomputed on torch operations)
and with a parameter changed in place before the backward."""

from __future__ import annotations

import copy

import pytest
import torch

import kcprnn
from kcprnn._cpu import native
from kcprnn.formats._base import CHAIN_ROWS
from kcprnn.formats.kcp.module import KCPMatrix
from kcprnn.rnn import _cell_train

pytestmark = pytest.mark.skipif(not native.available(), reason="the kernels are not built here")

INPUT, HIDDEN = 12, 8
MODES = {  # kcprnn cell, torch's functional cell, keyword options
    "LSTM": ("LSTMCell", torch.lstm_cell, {}),
    "GRU": ("GRUCell", torch.gru_cell, {}),
    "RNN_TANH": ("RNNCell", torch.rnn_tanh_cell, {}),
    "RNN_RELU": ("RNNCell", torch.rnn_relu_cell, {"nonlinearity": "relu"}),
}
PAIRS = [
    ("kcp", "kcp", {"rank": 2, "terms": 2}),
    ("kcp", "dense", {"rank": 2, "num_factors": 3}),
    ("dense", "kcp", {"rank": 2}),
    # other formats as their chains (kcprnn.formats._chain) on at most CHAIN_ROWS rows
    ("tt", "tt", {"rank": 2}),
    ("ht", "cp", {"rank": 2}),
    ("tucker", "dense", {"rank": 2}),
    ("dense", "tr", {"rank": 2}),
    ("bt", "kcp", {"rank": 2}),
]
TOL = {"rtol": 2e-4, "atol": 2e-5}  # float32 against float64


def _cell(mode, fmt, hidden_fmt, options, bias=True):
    torch.manual_seed(3)
    name, _, extra = MODES[mode]
    kwargs = {"format": fmt, "hidden_format": hidden_fmt, "bias": bias, **extra}
    if fmt != "dense":
        kwargs["rank"] = options["rank"]
        kwargs.update({k: v for k, v in options.items() if k != "rank"})
    if hidden_fmt != "dense":
        kwargs["hidden_options"] = dict(options)
    cell = getattr(kcprnn, name)(INPUT, HIDDEN, **kwargs)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.4)
    cell._use_dense = lambda batch: False  # the structured route, whatever the prices say
    return cell


def _reference(cell, mode, x, state):
    """torch's cell on ``to_dense()`` of a float64 copy; returns (outputs, copy)."""
    ref = copy.deepcopy(cell).double()
    fn = MODES[mode][1]
    args = (ref.weight_ih.to_dense(), ref.weight_hh.to_dense(), ref.bias_ih, ref.bias_hh)
    out = fn(x, tuple(state) if mode == "LSTM" else state[0], *args)
    return (tuple(out) if mode == "LSTM" else (out,)), ref


def _inputs(mode, batch=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, INPUT, generator=gen, dtype=dtype).requires_grad_()
    state = [torch.randn(batch, HIDDEN, generator=gen, dtype=dtype).requires_grad_()]
    if mode == "LSTM":
        state.append(torch.randn(batch, HIDDEN, generator=gen, dtype=dtype).requires_grad_())
    return x, state


def _double(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _check(cell, mode, x, state, out, weights=None):
    """``out`` (the cell's step on ``x``, ``state``) against the float64 reference: values, and
    the gradients of a fixed weighting of the outputs."""
    xd, sd = _double([x])[0], _double(state)
    want, ref = _reference(cell, mode, xd, sd)
    assert len(out) == len(want)
    for a, b in zip(out, want, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL)
    weights = weights or [torch.linspace(-1, 1, HIDDEN) * (k + 1) for k in range(len(out))]
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
    ref_loss = sum((o * w.double()).sum() for o, w in zip(want, weights, strict=True))
    params, ref_params = list(cell.parameters()), list(ref.parameters())
    got = torch.autograd.grad(loss, [x, *state, *params], allow_unused=True)
    exp = torch.autograd.grad(ref_loss, [xd, *sd, *ref_params], allow_unused=True)
    for a, b in zip(got, exp, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b, **TOL)


@pytest.mark.parametrize(("fmt", "hidden_fmt", "options"), PAIRS)
@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_matches_torch_values_and_every_gradient(mode, fmt, hidden_fmt, options):
    cell = _cell(mode, fmt, hidden_fmt, options)
    x, state = _inputs(mode)
    out = cell(x, tuple(state) if mode == "LSTM" else state[0])
    out = out if mode == "LSTM" else (out,)
    assert type(out[0].grad_fn).__name__ == "_StepBackward"  # one compiled node
    _check(cell, mode, x, state, out)


@pytest.mark.parametrize("mode", list(MODES))
def test_unbatched_and_without_biases(mode):
    cell = _cell(mode, "kcp", "dense", {"rank": 2}, bias=False)
    x, state = _inputs(mode, batch=1)
    out = cell(x[0], tuple(s[0] for s in state) if mode == "LSTM" else state[0][0])
    out = out if mode == "LSTM" else (out,)
    assert out[0].shape == (HIDDEN,)
    assert type(out[0].grad_fn).__name__ != "_StepBackward"  # the squeeze after the step
    _check(cell, mode, x, state, tuple(o[None] for o in out))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_sequence_of_steps_with_one_backward(mode):
    cell = _cell(mode, "kcp", "kcp", {"rank": 2})
    xs = torch.randn(4, 2, INPUT, generator=torch.Generator().manual_seed(7))
    state = [torch.zeros(2, HIDDEN) for _ in range(2 if mode == "LSTM" else 1)]
    ref = copy.deepcopy(cell).double()
    fn = MODES[mode][1]
    total, ref_total = 0.0, 0.0
    s, rs = tuple(state), tuple(t.double() for t in state)
    for t, x in enumerate(xs):
        out = cell(x, s if mode == "LSTM" else s[0])
        s = out if mode == "LSTM" else (out,)
        # the first step builds the small factor matrices in its node; the steps after it,
        # before any backward, share one build of them
        assert ("_FactorDenseBackward" in _graph_names(s[0])) is (t > 0)
        args = (ref.weight_ih.to_dense(), ref.weight_hh.to_dense(), ref.bias_ih, ref.bias_hh)
        rout = fn(x.double(), rs if mode == "LSTM" else rs[0], *args)
        rs = tuple(rout) if mode == "LSTM" else (rout,)
        total = total + s[0].sum()
        ref_total = ref_total + rs[0].sum()
    torch.testing.assert_close(total.double(), ref_total, **TOL)
    got = torch.autograd.grad(total, list(cell.parameters()))
    exp = torch.autograd.grad(ref_total, list(ref.parameters()))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL)
    s = tuple(t.detach() for t in s)
    after = cell(xs[0], s if mode == "LSTM" else s[0])  # the backward ran: built in its node
    assert "_FactorDenseBackward" not in _graph_names(after[0] if mode == "LSTM" else after)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_second_derivatives_recompute_on_torch_operations(mode):
    cell = _cell(mode, "kcp", "kcp", {"rank": 2})
    x, state = _inputs(mode)
    x = x.detach().t().contiguous().t().requires_grad_()  # strided: the node copies it
    assert not x.is_contiguous()
    params = list(cell.parameters())
    out = cell(x, tuple(state) if mode == "LSTM" else state[0])
    out = out if mode == "LSTM" else (out,)
    assert type(out[0].grad_fn).__name__ == "_StepBackward"
    grads = torch.autograd.grad(sum(o.sum() for o in out), [x, *params], create_graph=True)
    got = torch.autograd.grad(sum((g**2).sum() for g in grads), [x, *params])

    xd, sd = _double([x])[0], _double(state)
    want, ref = _reference(cell, mode, xd, sd)
    ref_params = [xd, *ref.parameters()]
    ref_grads = torch.autograd.grad(sum(o.sum() for o in want), ref_params, create_graph=True)
    exp = torch.autograd.grad(sum((g**2).sum() for g in ref_grads), ref_params)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_a_parameter_changed_in_place_before_the_backward_is_reported():
    cell = _cell("LSTM", "kcp", "dense", {"rank": 2})  # dense W_hh: its parameter is an operand
    x, state = _inputs("LSTM")
    h, c = cell(x, tuple(state))
    with torch.no_grad():
        cell.weight_hh.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (h + c).sum().backward()


def test_chains_past_their_rows_and_wide_inputs_take_the_torch_operations():
    cp = _cell("LSTM", "cp", "cp", {"rank": 2})
    x, state = _inputs("LSTM", batch=CHAIN_ROWS + 1)
    assert type(cp(x, tuple(state))[0].grad_fn).__name__ != "_StepBackward"
    x, state = _inputs("LSTM", batch=CHAIN_ROWS)
    assert type(cp(x, tuple(state))[0].grad_fn).__name__ == "_StepBackward"
    tt = _cell("GRU", "tt", "tt", {"rank": 2})
    tt.weight_hh.algorithm = "dense"  # rebuilt dense on torch operations: no chain
    x, state = _inputs("GRU", batch=1)
    assert type(tt(x, state[0]).grad_fn).__name__ != "_StepBackward"
    torch.manual_seed(0)
    wide = kcprnn.RNNCell(_cell_train.MAX_INPUT + 4, HIDDEN, format="kcp", hidden_format="kcp")
    wide._use_dense = lambda batch: False
    out = wide(torch.randn(2, _cell_train.MAX_INPUT + 4), torch.randn(2, HIDDEN))
    assert type(out.grad_fn).__name__ != "_StepBackward"


def test_float64_takes_the_torch_operations():
    cell = _cell("GRU", "kcp", "kcp", {"rank": 2}).double()
    x, state = _inputs("GRU", dtype=torch.float64)
    out = cell(x, state[0])
    assert type(out.grad_fn).__name__ != "_StepBackward"
    w_ih, w_hh = cell.weight_ih.to_dense(), cell.weight_hh.to_dense()
    want = torch.gru_cell(x, state[0], w_ih, w_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    params = list(cell.parameters())
    for a, b in zip(
        torch.autograd.grad(out.sum(), params), torch.autograd.grad(want.sum(), params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _graph_names(out):
    """The names of every node reachable from ``out``'s ``grad_fn``."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("route", ["built", "chain", "shared"])
@pytest.mark.parametrize("batch", [1, 3, CHAIN_ROWS + 1])
@pytest.mark.parametrize("mode", list(MODES))
def test_factor_matrices_built_in_the_step_chained_or_shared(monkeypatch, mode, batch, route):
    """Small KCP matrices are built inside the step's node (its inputs are the CP factors, one
    row's gradients in one kernel call); larger ones enter a lone step on a few rows as their
    chain of contractions, and otherwise are built in a node the steps share; each matches
    torch's cell, with the interleaved layout's gathers."""
    if route != "built":
        monkeypatch.setattr(_cell_train, "BUILD_IN_STEP", 0)
    if route == "shared":
        monkeypatch.setattr(KCPMatrix, "chain_for", lambda self, rows, training=None: None)
    if route == "chain":  # wherever there is one (its pricing: the test below)
        monkeypatch.setattr(_cell_train, "step_chain", lambda m, groups, rows: m.chain_for(rows))
    cell = _cell(mode, "kcp", "kcp", {"rank": 2})
    x, state = _inputs(mode, batch=batch)
    out = cell(x, tuple(state) if mode == "LSTM" else state[0])
    out = out if mode == "LSTM" else (out,)
    assert type(out[0].grad_fn).__name__ == "_StepBackward"
    # a chain where it costs fewer multiply-adds than the product (both at one row here)
    matrices = (cell.weight_ih, cell.weight_hh)
    chained = [route == "chain" and m.chain_for(batch) is not None for m in matrices]
    assert all(chained) if route == "chain" and batch == 1 else True
    assert not any(chained) if batch > CHAIN_ROWS else True
    operands = cell._kept["compiled step"][1][(False, batch)]  # no backward pending
    for op, chain in zip(operands, chained, strict=True):
        assert isinstance(op, _cell_train.ChainOperand) is chain
        assert (op.groups is not None) is (route == "built")
    shared = route != "built" and not all(chained)
    assert ("_FactorDenseBackward" in _graph_names(out[0])) is shared
    _check(cell, mode, x, state, out)


@pytest.mark.parametrize("mode", list(MODES))
def test_default_budget_kcp_cells_step_through_their_chains(mode):
    """At the speech size with both matrices at the default budget (CP ranks in the hundreds:
    factor matrices too large to build at every step) a lone step at one row runs both
    matrices' chains inside the step's node, as torch's cell computes it."""
    torch.manual_seed(4)
    name, _, extra = MODES[mode]
    cell = getattr(kcprnn, name)(40, 512, format="kcp", hidden_format="kcp", **extra)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 40, generator=gen).requires_grad_()
    state = [torch.randn(1, 512, generator=gen).requires_grad_() for _ in range(2)]
    state = state if mode == "LSTM" else state[:1]
    out = cell(x, tuple(state) if mode == "LSTM" else state[0])
    out = out if mode == "LSTM" else (out,)
    assert _graph_names(out[0]) == {"_StepBackward", "AccumulateGrad"}
    operands = cell._kept["compiled step"][1][(False, 1)]
    assert all(isinstance(op, _cell_train.ChainOperand) for op in operands)
    weights = [torch.linspace(-1, 1, 512) * (k + 1) for k in range(len(out))]
    _check(cell, mode, x, state, out, weights)


def test_a_lone_step_chains_a_kcp_matrix_only_where_the_chain_costs_less_than_its_builds():
    from kcprnn._cpu import native_factor
    from kcprnn.rnn.plan import kron_layout_cached

    torch.manual_seed(0)
    for rank, chains in ((None, True), (64, False)):  # hundreds vs 64 on a 2048 x 512 W_hh
        options = {} if rank is None else {"rank": rank}
        cell = kcprnn.LSTMCell(40, 512, format="kcp", hidden_format="kcp", hidden_options=options)
        m = cell.weight_hh
        groups = [list(m.factors[n]) for n in kron_layout_cached(m)[0].order]
        work = sum(native_factor.work(g) for g in groups)
        cost = _cell_train.CHAIN_OVER_BUILD * m.chain_for(1).macs(1)  # the chain: fewer MACs
        assert (cost < work) is chains  # than KCP's own product, and here than the build?
        assert (_cell_train.step_chain(m, groups, 1) is not None) is chains
        assert _cell_train.step_chain(m, groups, CHAIN_ROWS + 1) is None


def test_a_cp_factor_changed_in_place_before_the_backward_is_reported():
    cell = _cell("GRU", "kcp", "kcp", {"rank": 2})
    x, state = _inputs("GRU", batch=1)
    out = cell(x, state[0])
    assert "_FactorDenseBackward" not in _graph_names(out)
    with torch.no_grad():
        next(cell.weight_hh.parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("mode", ["LSTM", "RNN_TANH"])
def test_a_kcp_input_matrix_takes_the_step_alone_and_the_dense_rebuild_in_a_sequence(mode):
    """At the speech size (40 -> 512) with a rank-4 KCP ``W_ih`` and a dense ``W_hh`` at batch
    1, a step back-propagated on its own runs the compiled step (its factor matrices built in
    its node); the steps of a sequence with one backward after the first rebuild ``W_ih``
    dense once and share it (torch's fused cell): both as torch's cells compute them."""
    torch.manual_seed(3)
    name, fn, extra = MODES[mode]
    cell = getattr(kcprnn, name)(40, 512, format="kcp", rank=4, **extra)
    ref = copy.deepcopy(cell).double()
    args = (ref.weight_ih.to_dense(), ref.weight_hh.to_dense(), ref.bias_ih, ref.bias_hh)
    xs = torch.randn(3, 1, 40, generator=torch.Generator().manual_seed(8))
    zero = [torch.zeros(1, 512) for _ in range(2 if mode == "LSTM" else 1)]

    def run(cell, xs, state, args=None):
        total, names = 0.0, []
        for x in xs:
            if args is None:
                out = cell(x, tuple(state) if mode == "LSTM" else state[0])
            else:
                out = fn(x.double(), tuple(state) if mode == "LSTM" else state[0], *args)
            state = list(out) if mode == "LSTM" else [out]
            names.append(type(state[0].grad_fn).__name__)
            total = total + state[0].sum()
        return total, names

    for _ in range(2):  # lone steps, each back-propagated
        total, names = run(cell, xs[:1], zero)
        assert names == ["_StepBackward"]
        total.backward()
    total, names = run(cell, xs, zero)
    assert names[0] == "_StepBackward" and "_StepBackward" not in names[1:]
    want, _ = run(ref, xs, [z.double() for z in zero], args)
    torch.testing.assert_close(total.double(), want, **TOL)
    got = torch.autograd.grad(total, list(cell.parameters()))
    exp = torch.autograd.grad(want, list(ref.parameters()))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL)
    total, names = run(cell, xs[:1], zero)  # after the sequence's backward: alone again
    assert names == ["_StepBackward"]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("rank", [16, 64])
def test_a_lone_step_builds_large_factor_matrices_apart_and_keeps_the_compiled_step(mode, rank):
    """A KCP ``W_ih`` whose factor matrices are too large to build in the step's node (and
    whose chain saves too little) next to a dense ``W_hh``, at the speech size and batch 1: a
    lone step is priced with the factor matrices built in a node of their own
    (:func:`kcprnn.rnn._cell_route._apart_price`) and runs the compiled step on them, not
    ``W_ih`` rebuilt dense and torch's fused cell (1.3x slower in
    ``benchmarks/ab_cell_train_route.py``); its output and every parameter's gradient match
    torch's cell in float64."""
    from kcprnn.rnn import _cell_route

    torch.manual_seed(4)
    name, fn, extra = MODES[mode]
    cell = getattr(kcprnn, name)(40, 512, format="kcp", rank=rank, **extra)
    kinds = _cell_route._compiled_operands(cell)
    assert kinds == {cell.weight_ih: False}  # built apart: too large for the step's node
    with torch.enable_grad():
        assert not _cell_route.cell_uses_dense(cell, 1, True)
    ref = copy.deepcopy(cell).double()
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(9))
    state = [torch.randn(1, 512, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    state = state if mode == "LSTM" else state[:1]
    for _ in range(2):  # lone steps, each back-propagated
        args = (ref.weight_ih.to_dense(), ref.weight_hh.to_dense(), ref.bias_ih, ref.bias_hh)
        out = cell(x, tuple(state) if mode == "LSTM" else state[0])
        h = out[0] if mode == "LSTM" else out
        assert type(h.grad_fn).__name__ == "_StepBackward"
        assert "_FactorDenseBackward" in _graph_names(h)
        rs = [s.double() for s in state]
        want = fn(x.double(), tuple(rs) if mode == "LSTM" else rs[0], *args)
        want = want[0] if mode == "LSTM" else want
        torch.testing.assert_close(h.double(), want, **TOL)
        got = torch.autograd.grad(h.sum(), list(cell.parameters()))
        exp = torch.autograd.grad(want.sum(), list(ref.parameters()))
        for a, b in zip(got, exp, strict=True):
            torch.testing.assert_close(a.double(), b, **TOL)


def test_the_compiled_operands_of_lone_steps():
    """Which KCP matrices a lone compiled step builds in its node (rank 4 at the speech size),
    which apart (rank 16), and the cells it does not run (a TT matrix, a projection)."""
    from kcprnn.rnn import _cell_route

    small = kcprnn.LSTMCell(
        40, 512, format="kcp", rank=4, hidden_format="kcp", hidden_options={"rank": 16}
    )
    assert _cell_route._compiled_operands(small) == {small.weight_ih: True, small.weight_hh: False}
    rank4 = kcprnn.LSTMCell(40, 512, format="kcp", rank=4)
    assert _cell_route._compiled_operands(rank4) == {rank4.weight_ih: True}
    assert _cell_route._compiled_operands(kcprnn.LSTMCell(40, 512, format="tt")) is None
    assert _cell_route._compiled_operands(kcprnn.LSTMCell(40, 512, format="dense")) is None


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_chained_matrices_over_a_sequence_with_one_backward(mode):
    """The other formats' chains in the step's node at every step of a sequence (no build to
    share): the summed outputs and every parameter's gradient match torch's cell."""
    cell = _cell(mode, "tt", "ht", {"rank": 2})
    xs = torch.randn(4, 2, INPUT, generator=torch.Generator().manual_seed(7))
    ref = copy.deepcopy(cell).double()
    args = (ref.weight_ih.to_dense(), ref.weight_hh.to_dense(), ref.bias_ih, ref.bias_hh)
    s = tuple(torch.zeros(2, HIDDEN) for _ in range(2 if mode == "LSTM" else 1))
    rs = tuple(t.double() for t in s)
    total, ref_total = 0.0, 0.0
    for x in xs:
        out = cell(x, s if mode == "LSTM" else s[0])
        s = out if mode == "LSTM" else (out,)
        assert type(s[0].grad_fn).__name__ == "_StepBackward"
        rout = MODES[mode][1](x.double(), rs if mode == "LSTM" else rs[0], *args)
        rs = tuple(rout) if mode == "LSTM" else (rout,)
        total, ref_total = total + s[0].sum(), ref_total + rs[0].sum()
    torch.testing.assert_close(total.double(), ref_total, **TOL)
    got = torch.autograd.grad(total, list(cell.parameters()))
    exp = torch.autograd.grad(ref_total, list(ref.parameters()))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_chained_matrices_second_derivatives_and_in_place_changes():
    cell = _cell("GRU", "tucker", "tt", {"rank": 2})
    x, state = _inputs("GRU", batch=2)
    params = list(cell.parameters())
    out = cell(x, state[0])
    assert type(out.grad_fn).__name__ == "_StepBackward"
    grads = torch.autograd.grad(out.sum(), [x, *params], create_graph=True)
    got = torch.autograd.grad(sum((g**2).sum() for g in grads), [x, *params])
    xd, sd = _double([x])[0], _double(state)
    want, ref = _reference(cell, "GRU", xd, sd)
    ref_params = [xd, *ref.parameters()]
    ref_grads = torch.autograd.grad(want[0].sum(), ref_params, create_graph=True)
    exp = torch.autograd.grad(sum((g**2).sum() for g in ref_grads), ref_params)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)
    out = cell(x, state[0])
    with torch.no_grad():
        next(cell.weight_hh.parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_a_repeated_step_reuses_its_route_until_something_changes(mode):
    """A lone training step like the last one (same shapes, flags, weights) runs its compiled
    step again without the full step's checks and planning; an in-place update of a
    parameter, an input that needs a gradient or a step of a sequence takes the full step.
    Every step's values and gradients match torch's cell on the weights of that moment."""
    cell = _cell(mode, "tt", "kcp", {"rank": 2})
    full = cell._structured_step
    calls = []

    def counted(x, state):
        calls.append(1)
        return full(x, state)

    cell._structured_step = counted

    def step(x, state):
        out = cell(x, tuple(state) if mode == "LSTM" else state[0])
        out = out if mode == "LSTM" else (out,)
        assert type(out[0].grad_fn).__name__ == "_StepBackward"
        if x.requires_grad:
            _check(cell, mode, x, state, out)  # its backward runs: the next step is lone again
        else:
            sum(o.sum() for o in out).backward()

    x, state = _inputs(mode)
    step(x, state)
    step(x, state)
    assert len(calls) == 1  # the second repeated the first
    with torch.no_grad():
        next(cell.weight_ih.parameters()).mul_(1.5)  # an optimizer's step
    step(x, state)
    step(x, state)
    assert len(calls) == 2
    step(x.detach(), state)  # another signature
    assert len(calls) == 3
    cell(x, tuple(state) if mode == "LSTM" else state[0])  # no backward: the next is pending
    step(x, state)
    assert len(calls) == 5
