"""A KCP or CP matrix rebuilt dense (:func:`kcprnn.rnn.kron.rebuild`) against the format's own
reconstruction, and the cells' steps under autograd, which share one build of each matrix (its
dense rebuild, or the factor matrices of a Kronecker sum) with its graph until a parameter
changes: checked in float64 against steps on ``to_dense()`` rebuilt at every step, over
sequences, repeated and separate backward passes, parameter changes, frozen parameters and
second derivatives; each with KCP's factor matrices built on the compiled kernel, by GEMMs
(both one node the steps share) and on torch operations (shared through ``_Shared``)."""

from __future__ import annotations

import pytest
import torch

import kcprnn
from kcprnn._cpu import native, native_factor
from kcprnn.formats.kcp import kcp_to_dense
from kcprnn.rnn import _cell_repeat, _cell_step, kron
from kcprnn.rnn.kron import rebuild

TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True, params=["native", "gemms", "torch"])
def factor_builds(request, monkeypatch):
    """Every test with KCP's factor matrices built by the compiled kernel or by GEMMs (one
    autograd node the steps share directly) and on torch operations (shared through
    ``_Shared``)."""
    if request.param != "native":
        monkeypatch.setattr(native_factor, "MAX_WORK", 0)
        monkeypatch.setattr(native_factor, "GEMMS", request.param == "gemms")
    elif not native.available():
        pytest.skip("the compiled kernels are not built here")
    return request.param


MATRICES = [
    ("kcp", 40, 96, {"rank": 3}),
    ("kcp", 48, 96, {"rank": [2, 3], "terms": 2}),
    ("kcp", 48, 96, {"rank": 2, "terms": 2, "num_factors": 3}),
    ("kcp", 64, 256, {"rank": 2, "num_factors": 4}),
    ("kcp", 48, 96, {"rank": 2, "num_factors": 1, "terms": 2}),
    ("kcp", 160, 96, {"in_modes": [[2, 4], [4, 5]], "out_modes": [[4, 4], [2, 3]], "terms": 3}),
    ("kcp", 160, 96, {"in_modes": [[8, 1], [1, 20]], "out_modes": [[4, 2], [1, 12]]}),
    ("cp", 24, 40, {"rank": 3}),
]


def _matrix(fmt, n_in, n_out, options):
    torch.manual_seed(0)
    w = kcprnn.formats.make_matrix(fmt, n_in, n_out, dtype=torch.float64, **options)
    with torch.no_grad():
        for p in w.parameters():
            p.normal_()  # no zero factors or terms: every entry and gradient is checked
    return w


def _reference(w):
    if w.format_name == "kcp":
        return kcp_to_dense(w._factor_list())
    return w.to_dense()


@pytest.mark.parametrize("limit", [kron.REBUILD_GATHER_LIMIT, 0], ids=["gather", "permute"])
@pytest.mark.parametrize(("fmt", "n_in", "n_out", "options"), MATRICES)
def test_rebuild_matches_the_formats_reconstruction(fmt, n_in, n_out, options, limit, monkeypatch):
    monkeypatch.setattr(kron, "REBUILD_GATHER_LIMIT", limit)
    w = _matrix(fmt, n_in, n_out, options)
    got, want = rebuild(w), _reference(w)
    assert got.shape == (n_out, n_in)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn(n_out, n_in, dtype=torch.float64)
    params = list(w.parameters())
    for a, b in zip(
        torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, **TOL)


class _Rebuild(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self):
        return rebuild(self.w)


@pytest.mark.parametrize("limit", [kron.REBUILD_GATHER_LIMIT, 0], ids=["gather", "permute"])
def test_rebuild_gradcheck(limit, monkeypatch):
    monkeypatch.setattr(kron, "REBUILD_GATHER_LIMIT", limit)
    module = _Rebuild(_matrix("kcp", 12, 16, {"rank": 2, "terms": 2}))
    names = [n for n, _ in module.named_parameters()]

    def pure(*values):
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), ())

    inputs = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(pure, inputs)


# --- cells: one shared rebuild per parameter version -------------------------------------------

INPUT, HIDDEN = 6, 4


ROUTES = ["dense", "structured"]


def _cell(mode="LSTM", fmt="kcp", hidden_fmt="tt", route="dense"):
    torch.manual_seed(1)
    cls = getattr(kcprnn, f"{mode}Cell")
    cell = cls(INPUT, HIDDEN, format=fmt, hidden_format=hidden_fmt, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.5)
    cell._use_dense = lambda batch: route == "dense"  # whatever the prices say
    return cell


_KERNELS = {"LSTM": torch.lstm_cell, "GRU": torch.gru_cell, "RNN": torch.rnn_tanh_cell}


def _steps(cell, xs, state, reference):
    """The cell over ``xs``; ``reference``: ``torch``'s cell on ``to_dense()`` rebuilt every
    step instead of the cell itself. Returns the sum of the outputs."""
    total = 0
    for x in xs:
        if reference:
            w_ih, w_hh = cell.weight_ih.to_dense(), cell.weight_hh.to_dense()
            args = (w_ih, w_hh, cell.bias_ih, cell.bias_hh)
            state = _KERNELS[cell.mode](x, state, *args)
        else:
            state = cell(x, state)
        h = state[0] if cell.mode == "LSTM" else state
        total = total + (h * torch.linspace(-1, 1, HIDDEN, dtype=h.dtype)).sum()
    return total


def _state(mode, batch=2):
    h = torch.randn(batch, HIDDEN, dtype=torch.float64)
    return (h, torch.randn_like(h)) if mode == "LSTM" else h


def _grads(cell, loss):
    return torch.autograd.grad(loss, list(cell.parameters()), allow_unused=True)


def _assert_grads(got, want):
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("mode", "fmt", "hidden_fmt"),
    [("LSTM", "kcp", "tt"), ("GRU", "kcp", "kcp"), ("RNN", "cp", "dense"), ("LSTM", "tt", "cp")],
)
def test_a_sequence_of_steps_builds_each_matrix_once(mode, fmt, hidden_fmt, route, monkeypatch):
    cell = _cell(mode, fmt, hidden_fmt, route)
    built = []
    if route == "dense":
        plain = _cell_step.dense_weight
        monkeypatch.setattr(_cell_step, "dense_weight", lambda m: built.append(m) or plain(m))
        expected = [cell.weight_ih, cell.weight_hh]  # a dense one is its parameter
    else:
        plain = _cell_step.kron_terms
        monkeypatch.setattr(_cell_step, "kron_terms", lambda m, *a: built.append(m) or plain(m, *a))
        expected = [m for m in (cell.weight_ih, cell.weight_hh) if m.format_name == "kcp"]
    xs = torch.randn(5, 2, INPUT, dtype=torch.float64)
    state = _state(mode)
    got = _steps(cell, xs, state, reference=False)
    assert built == expected
    want = _steps(cell, xs, state, reference=True)
    torch.testing.assert_close(got, want, **TOL)
    _assert_grads(_grads(cell, got), _grads(cell, want))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_the_structured_step_unbatched_and_without_biases(mode):
    torch.manual_seed(2)
    cls = getattr(kcprnn, f"{mode}Cell")
    cell = cls(INPUT, HIDDEN, bias=False, format="kcp", hidden_format="kcp", dtype=torch.float64)
    cell._use_dense = lambda batch: False
    x = torch.randn(INPUT, dtype=torch.float64)
    h = torch.randn(HIDDEN, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if mode == "LSTM" else h
    got = cell(x, state)
    w_ih, w_hh = cell.weight_ih.to_dense(), cell.weight_hh.to_dense()
    batched = tuple(t[None] for t in state) if mode == "LSTM" else state[None]
    want = _KERNELS[mode](x[None], batched, w_ih, w_hh)
    pairs = zip(got, want, strict=True) if mode == "LSTM" else [(got, want)]
    for a, b in pairs:
        torch.testing.assert_close(a, b[0], **TOL)


@pytest.mark.parametrize("route", ROUTES)
def test_separate_and_repeated_backward_passes_share_the_build(route):
    cell = _cell("LSTM", "kcp", "cp", route)
    xs = torch.randn(3, 2, INPUT, dtype=torch.float64)
    state = _state("LSTM")
    first = _steps(cell, xs[:2], state, reference=False)
    second = _steps(cell, xs[1:], state, reference=False)
    want_first = _grads(cell, _steps(cell, xs[:2], state, reference=True))
    want_second = _grads(cell, _steps(cell, xs[1:], state, reference=True))
    # the second loss reaches the rebuild after the first one's backward went through it
    first.backward(retain_graph=True)
    _assert_grads([p.grad for p in cell.parameters()], want_first)
    cell.zero_grad()
    second.backward()
    _assert_grads([p.grad for p in cell.parameters()], want_second)
    cell.zero_grad()
    first.backward()  # and again
    _assert_grads([p.grad for p in cell.parameters()], want_first)


@pytest.mark.parametrize("route", ROUTES)
def test_a_changed_parameter_gets_a_new_build_and_a_frozen_one_no_gradient(route):
    cell = _cell("LSTM", "kcp", "kcp", route)
    xs = torch.randn(2, 2, INPUT, dtype=torch.float64)
    state = _state("LSTM")
    before = _steps(cell, xs, state, reference=False)
    with torch.no_grad():  # an optimizer step
        for p in cell.weight_ih.parameters():
            p.mul_(0.7)
    got = _steps(cell, xs, state, reference=False)
    assert not torch.allclose(got, before)
    want = _steps(cell, xs, state, reference=True)
    torch.testing.assert_close(got, want, **TOL)
    _assert_grads(_grads(cell, got), _grads(cell, want))

    frozen = next(cell.weight_hh.parameters())
    frozen.requires_grad_(False)
    got = _steps(cell, xs, state, reference=False)
    got.backward()
    assert frozen.grad is None
    want = _steps(cell, xs, state, reference=True)
    params = [p for p in cell.parameters() if p.requires_grad]
    _assert_grads([p.grad for p in params], torch.autograd.grad(want, params, allow_unused=True))


@pytest.mark.parametrize("route", ROUTES)
def test_an_in_place_change_before_the_backward_is_reported(route):
    cell = _cell("LSTM", "kcp", "kcp", route)
    loss = _steps(cell, torch.randn(2, 2, INPUT, dtype=torch.float64), _state("LSTM"), False)
    with torch.no_grad():
        next(cell.weight_ih.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("route", ROUTES)
def test_second_derivatives_through_the_shared_build(route):
    cell = _cell("RNN", "kcp", "kcp", route)
    xs = torch.randn(3, 2, INPUT, dtype=torch.float64)
    state = _state("RNN")
    params = list(cell.parameters())
    results = []
    for reference in (False, True):
        loss = _steps(cell, xs, state, reference)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        norm = sum((g**2).sum() for g in grads)
        results.append(torch.autograd.grad(norm, params))
    _assert_grads(*results)


def test_repeated_steps_under_autograd_follow_shape_mode_and_parameter_changes(monkeypatch):
    cell = _cell("GRU", "kcp", "tt", "dense")
    checks = []
    plain = _cell_repeat._signature
    monkeypatch.setattr(_cell_repeat, "_signature", lambda *a: checks.append(1) or plain(*a))
    state = _state("GRU")
    xs = torch.randn(3, 2, INPUT, dtype=torch.float64)
    got = _steps(cell, xs, state, reference=False)
    assert cell._repeat is not None and cell._repeat[1][0] is True  # remembered under autograd
    torch.testing.assert_close(got, _steps(cell, xs, state, reference=True), **TOL)
    # another batch size: the full step, then remembered for it
    wide = torch.randn(2, 5, INPUT, dtype=torch.float64)
    state5 = _state("GRU", 5)
    got = _steps(cell, wide, state5, reference=False)
    torch.testing.assert_close(got, _steps(cell, wide, state5, reference=True), **TOL)
    # without gradients: no graph, the same values
    with torch.no_grad():
        out = cell(xs[0], state)
    assert out.grad_fn is None
    torch.testing.assert_close(
        out,
        torch.gru_cell(
            xs[0],
            state,
            cell.weight_ih.to_dense(),
            cell.weight_hh.to_dense(),
            cell.bias_ih,
            cell.bias_hh,
        ),
        **TOL,
    )
    assert checks  # the repeats compared signatures
