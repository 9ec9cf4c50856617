"""Layer plans kept per shape (``kcprnn.rnn.plan.plan_layer``) and the dense weights the torch
route keeps between calls without gradients: kept while nothing they depend on changes, planned
or rebuilt afresh when it does (dtype, cost model, algorithm, a replaced matrix; parameter values
changed in place or by ``load_state_dict``), and always what an uncached call gives."""

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn._cpu import CostModel
from kcprnn.rnn import plan

INPUT, HIDDEN, STEPS, BATCH = 6, 8, 5, 3
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _counting(monkeypatch):
    calls = []
    real = plan.choose_route

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "choose_route", counted)
    return calls


def test_plans_are_kept_per_shape_and_replanned_when_inputs_to_the_prices_change(monkeypatch):
    torch.manual_seed(0)
    model = kcprnn.LSTM(INPUT, HIDDEN, bidirectional=True, format="kcp", hidden_format="cp")
    x = torch.randn(STEPS, BATCH, INPUT)
    calls = _counting(monkeypatch)
    model(x)
    model(x)
    assert len(calls) == 1  # one layer, planned once
    model(torch.randn(STEPS + 1, BATCH, INPUT))  # another shape: its own plan
    assert len(calls) == 2
    with torch.no_grad():  # inference is priced without the backward
        model(x)
    assert len(calls) == 3
    # a cost model that makes the structured loop dear: replanned, and it changes the route
    cells = [model.cell(0, d) for d in range(2)]
    before = plan.plan_layer("auto", cells, STEPS * BATCH, STEPS, True, True, model._plans)
    assert before.route == "structured"
    dear = CostModel(rnn_native_gemm=1e9, rnn_small_gemm=1e9)
    for c in cells:
        c.weight_hh.cost_model = dear
    model(x)
    assert len(calls) == 4
    after = plan.plan_layer("auto", cells, STEPS * BATCH, STEPS, True, True, model._plans)
    assert len(calls) == 4 and after.route == "torch"
    assert after == plan._make_plan("auto", cells, STEPS * BATCH, STEPS, True, True)
    # another algorithm, another dtype, a replaced matrix: each planned afresh
    for change in ("algorithm", "dtype", "matrix", "recurrence"):
        if change == "algorithm":
            model.cell(0, 0).weight_ih.algorithm = "dense"
        elif change == "dtype":
            model.double()
            x = x.double()
        elif change == "matrix":
            model.cell(0, 1).weight_hh = kcprnn.formats.make_matrix(
                "cp", HIDDEN, 4 * HIDDEN, rank=2, dtype=torch.float64
            )
        else:
            model.recurrence = "steps"
        count = len(calls)
        model(x)
        model(x)
        assert len(calls) == count + 1, change

def test_plan_cache_is_bounded():
    torch.manual_seed(0)
    model = kcprnn.GRU(INPUT, HIDDEN, format="tt", hidden_format="tt")
    for steps in range(1, plan.PLAN_CACHE_SIZE + 5):
        model(torch.randn(steps, 1, INPUT))
    assert 0 < len(model._plans) <= plan.PLAN_CACHE_SIZE


@pytest.mark.parametrize("fmt", ["cp", "tt", "kcp"])
def test_torch_route_without_gradients_follows_parameter_changes(fmt):
    torch.manual_seed(0)
    kw = {"format": fmt, "hidden_format": fmt, "dtype": torch.float64, "bidirectional": True}
    model = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    other = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    reference = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    model.recurrence = "torch"
    reference.recurrence = "steps"  # no cached weights: one cell step at a time
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)

    def check():
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            got, want = model(x), reference(x)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)

    check()
    with torch.no_grad():
        first = model(x)[0]
        assert torch.equal(model(x)[0], first)  # kept: the same weights give the same output
    model.load_state_dict(other.state_dict())
    check()
    with torch.no_grad():
        next(model.cell(0, 1).weight_hh.parameters()).mul_(1.5)  # in place
    check()
    factor = next(model.cell(0, 0).weight_ih.parameters())
    factor.data = factor.data * 0.5  # new storage
    check()
    model.float()
    reference.float()
    x = x.float()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_torch_route_with_gradients_rebuilds_every_call():
    # under autograd nothing is kept: the gradients reach the factors at every call
    torch.manual_seed(0)
    model = kcprnn.GRU(INPUT, HIDDEN, format="cp", hidden_format="cp", dtype=torch.float64)
    model.recurrence = "torch"
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        model(x)[0].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    ref = nn.GRU(INPUT, HIDDEN, dtype=torch.float64)
    assert isinstance(ref, nn.GRU)
