"""The compiled cell step (kcprnn/_cpu/native_rnn.cpp, kcprnn_step; kcprnn._cpu.native_step)
and the cells' use of it without gradients: LSTM, GRU and Elman (tanh, relu) steps with KCP and
CP weights (W_ih only, W_hh only, both; several terms; three factors), with and without bias, on
1 and 3 rows, against torch's cells in float64 on the same weights rebuilt dense; the activations
over their whole range in vector lanes and tails; the prepared step followed through in-place
updates, load_state_dict, .data swaps and replaced parameters; and the torch ops that run the
same step where the kernel is off (KCPRNN_NATIVE=0)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn._cpu import native, native_rnn, native_step
from kcprnn._cpu.native_step import CellStep
from kcprnn.rnn import _cell_route, _cell_step
from kcprnn.rnn.kron import kron_layout_of, kron_matmul_macs, rebuild

pytestmark = pytest.mark.skipif(
    not native.available(), reason="the compiled kernel cannot be built"
)

INPUT, HIDDEN = 30, 16
TOL = {"rtol": 2e-4, "atol": 2e-5}
CELLS = {
    "LSTM": (kcprnn.LSTMCell, {}),
    "GRU": (kcprnn.GRUCell, {}),
    "RNN_TANH": (kcprnn.RNNCell, {"nonlinearity": "tanh"}),
    "RNN_RELU": (kcprnn.RNNCell, {"nonlinearity": "relu"}),
}
# (format, hidden_format, options, hidden_options)
WEIGHTS = {
    "kcp-both": ("kcp", "kcp", {"rank": 2}, {"rank": 2}),
    "kcp-ih": ("kcp", "dense", {"rank": 2}, {}),
    "kcp-hh": ("dense", "kcp", {}, {"rank": 2}),
    "kcp-terms": ("kcp", "kcp", {"rank": 2, "terms": 2}, {"rank": 3, "terms": 3}),
    "kcp-3-factors": ("kcp", "kcp", {"rank": 2, "num_factors": 3}, {"rank": 2, "num_factors": 3}),
    "cp": ("cp", "cp", {"rank": 3}, {"rank": 3}),
    "tt-ih": ("tt", "cp", {"rank": 2}, {"rank": 2}),  # W_ih's own product, given to the step
}
TORCH_CELLS = {
    "LSTM": torch.lstm_cell,
    "GRU": torch.gru_cell,
    "RNN_TANH": torch.rnn_tanh_cell,
    "RNN_RELU": torch.rnn_relu_cell,
}


def _cell(mode: str, weights: str, bias: bool = True) -> kcprnn.rnn.RNNCellBase:
    cls, extra = CELLS[mode]
    fmt, hidden_fmt, options, hidden_options = WEIGHTS[weights]
    return cls(
        INPUT,
        HIDDEN,
        bias=bias,
        format=fmt,
        hidden_format=hidden_fmt,
        hidden_options=hidden_options,
        **extra,
        **options,
    )


def _reference(cell, mode: str, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
    """The step in float64 through torch's cell on the cell's weights rebuilt dense."""
    ref = copy.deepcopy(cell).double()
    with torch.no_grad():
        w_ih, w_hh = rebuild(ref.weight_ih), rebuild(ref.weight_hh)
        state64 = tuple(s.double() for s in state)
        hx = state64 if mode == "LSTM" else state64[0]
        out = TORCH_CELLS[mode](x.double(), hx, w_ih, w_hh, ref.bias_ih, ref.bias_hh)
    return tuple(out) if mode == "LSTM" else (out,)


def _state(mode: str, rows: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(rows, HIDDEN) for _ in range(2 if mode == "LSTM" else 1))


def _step(cell, mode: str, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
    with torch.no_grad():
        out = cell(x, state if mode == "LSTM" else state[0])
    return tuple(out) if mode == "LSTM" else (out,)


def _assert_close(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, **TOL)


@pytest.fixture
def forced(monkeypatch):
    """Makes every cell take its structured step (the compiled one without gradients), and
    records the modes of the compiled steps that ran."""
    ran: list[str] = []
    original = CellStep.__call__

    def spy(self, *args, **kwargs):
        ran.append(self.mode)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CellStep, "__call__", spy)
    monkeypatch.setattr(kcprnn.rnn.RNNCellBase, "_use_dense", lambda self, b: False)
    return ran


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("mode", list(CELLS))
@pytest.mark.parametrize("rows", [1, 3])
def test_step_matches_torch_cell_in_float64(mode, weights, rows, forced):
    torch.manual_seed(hash((mode, weights, rows)) % 1000)
    cell = _cell(mode, weights)
    x, state = torch.randn(rows, INPUT), _state(mode, rows)
    _assert_close(_step(cell, mode, x, state), _reference(cell, mode, x, state))
    assert forced == [mode]


@pytest.mark.parametrize("mode", list(CELLS))
def test_without_bias_and_unbatched(mode, forced):
    torch.manual_seed(1)
    cell = _cell(mode, "kcp-terms", bias=False)
    x, state = torch.randn(INPUT), tuple(s[0] for s in _state(mode, 1))
    got = _step(cell, mode, x, state)
    want = _reference(cell, mode, x[None], tuple(s[None] for s in state))
    assert all(g.shape == (HIDDEN,) for g in got)
    _assert_close(tuple(g[None] for g in got), want)
    assert forced == [mode]


def test_strided_input_and_states(forced):
    torch.manual_seed(2)
    cell = _cell("LSTM", "kcp-both")
    x = torch.randn(INPUT, 3).t()  # (3, INPUT), column-major
    state = tuple(torch.randn(HIDDEN, 3).t() for _ in range(2))
    _assert_close(_step(cell, "LSTM", x, state), _reference(cell, "LSTM", x, state))


@pytest.mark.parametrize("mode", list(CELLS))
def test_activations_over_their_range_in_vector_lanes_and_tails(mode, forced):
    """Pre-activations from -120 to 120 (the exp's and tanh's clamps), around zero (tanh's
    small-argument branch) and exactly zero, at a hidden size of 21: whole vectors of 8 and 16
    lanes and a scalar tail. The weights barely move the gates; the biases set them."""
    torch.manual_seed(3)
    hidden = 21
    cls, extra = CELLS[mode]
    cell = cls(INPUT, hidden, format="kcp", hidden_format="kcp", rank=2, **extra)
    gates = cell.bias_ih.numel()
    edges = torch.tensor([0.0, 1e-6, -1e-6, 3e-4, -3e-4, 5e-4, -5e-4, 7.9, -7.9, 8.0, -8.0])
    edges = torch.cat([edges, torch.tensor([87.9, -87.9, 88.5, -88.5, 120.0, -120.0])])
    values = torch.cat([edges, torch.linspace(-30, 30, gates - edges.numel())])
    with torch.no_grad():
        cell.bias_ih.copy_(values[torch.randperm(gates)])
        cell.bias_hh.zero_()
    x = 1e-4 * torch.randn(3, INPUT)
    state = tuple(1e-4 * torch.randn(3, hidden) for _ in range(2 if mode == "LSTM" else 1))
    got, want = _step(cell, mode, x, state), _reference(cell, mode, x, state)
    assert all(torch.isfinite(g).all() for g in got)
    _assert_close(got, want)
    assert forced == [mode]


def _changes(cell, other):
    """Ways a weight changes, each applied to ``cell`` in turn (``other``: a cell of the same
    shapes whose weights load_state_dict copies)."""
    hh = next(cell.weight_hh.parameters())
    ih_factor = next(cell.weight_ih.parameters())
    yield "in place", lambda: hh.mul_(1.5)
    yield "optimizer step", lambda: torch.optim.SGD(cell.parameters(), lr=0.5).step()
    yield "load_state_dict", lambda: cell.load_state_dict(other.state_dict())
    yield ".data swap", lambda: setattr(ih_factor, "data", ih_factor.data * -2)
    yield "bias in place", lambda: cell.bias_hh.add_(0.5)
    yield (
        "replaced",
        lambda: cell.weight_ih.factors[0].__setitem__(
            0, nn.Parameter(cell.weight_ih.factors[0][0] * 3)
        ),
    )


def test_prepared_step_follows_every_weight_change(forced):
    torch.manual_seed(3)
    cell, other = _cell("LSTM", "kcp-both"), _cell("LSTM", "kcp-both")
    for p in cell.parameters():  # gradients for the optimizer step
        p.grad = torch.randn_like(p)
    x, state = torch.randn(2, INPUT), _state("LSTM", 2)
    _assert_close(_step(cell, "LSTM", x, state), _reference(cell, "LSTM", x, state))
    prepared = cell._native_cache[1]
    _step(cell, "LSTM", x, state)
    assert cell._native_cache[1] is prepared  # kept while nothing changes
    for name, change in _changes(cell, other):
        before = _step(cell, "LSTM", x, state)
        with torch.no_grad():
            change()
        got = _step(cell, "LSTM", x, state)
        assert cell._native_cache[1] is not prepared, name
        prepared = cell._native_cache[1]
        _assert_close(got, _reference(cell, "LSTM", x, state))
        assert not torch.allclose(got[0], before[0]), name


def test_dense_weights_cache_follows_changes_too(monkeypatch):
    torch.manual_seed(4)
    cell = _cell("GRU", "kcp-both")
    monkeypatch.setattr(cell, "_use_dense", lambda b: True)
    x, state = torch.randn(2, INPUT), _state("GRU", 2)
    _assert_close(_step(cell, "GRU", x, state), _reference(cell, "GRU", x, state))
    p = next(cell.weight_hh.parameters())
    with torch.no_grad():
        p.data = p.data * 2  # a .data swap keeps the version counter
    _assert_close(_step(cell, "GRU", x, state), _reference(cell, "GRU", x, state))


def test_with_gradients_the_step_stays_differentiable(forced):
    torch.manual_seed(5)
    cell = _cell("LSTM", "kcp-both")
    x, state = torch.randn(2, INPUT), _state("LSTM", 2)
    h, c = cell(x, state)
    assert forced == [] and cell._native_cache is None  # torch ops, with autograd
    grads = torch.autograd.grad((h.sum() + c.sum()), list(cell.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    _assert_close((h.detach(), c.detach()), _reference(cell, "LSTM", x, state))
    # frozen parameters and plain inputs: nothing to differentiate, the compiled step runs
    cell.requires_grad_(False)
    _assert_close(tuple(cell(x, state)), _reference(cell, "LSTM", x, state))
    assert forced == ["LSTM"]


def test_disabled_by_environment_runs_torch_ops(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("KCPRNN_NATIVE", "0")
    torch.manual_seed(6)
    for mode in CELLS:
        cell = _cell(mode, "kcp-both")
        x, state = torch.randn(3, INPUT), _state(mode, 3)
        monkeypatch.setattr(cell, "_use_dense", lambda b: False)
        _assert_close(_step(cell, mode, x, state), _reference(cell, mode, x, state))
        assert cell._native_cache is None
        assert not _cell_step.native_applies(cell, torch.float32, True)


def test_routes_without_gradients():
    torch.manual_seed(7)
    speech = kcprnn.LSTMCell(40, 512, format="kcp", hidden_format="kcp")
    video = kcprnn.GRUCell(57_600, 256, format="kcp")
    dense = kcprnn.LSTMCell(40, 512, format="dense")
    with torch.no_grad():
        assert not speech._use_dense(1)  # a few small products instead of reading W_hh
        assert not video._use_dense(1)
        assert dense._use_dense(1)  # no Kronecker sum: torch's cell
        costs = _cell_route.step_costs(speech, 1, speech.weight_hh.planning_model())
        assert costs["native"] < costs["dense"]
        h, c = speech(torch.randn(1, 40))
        assert isinstance(speech._native_cache[1], CellStep)
    assert not _cell_step.native_applies(speech.double(), torch.float64, True)


def test_counts_the_step_macs():
    torch.manual_seed(8)
    cell = _cell("RNN_TANH", "kcp-ih")
    with torch.no_grad(), native.counting_macs() as box:
        cell._structured_step(torch.randn(3, INPUT), (torch.randn(3, HIDDEN),))
    layout, terms = kron_layout_of(cell.weight_ih)
    assert box[0] == 3 * (kron_matmul_macs(layout, terms, 1) + HIDDEN * HIDDEN)  # W_hh dense


def test_step_arguments_are_checked():
    torch.manual_seed(9)
    cell = _cell("LSTM", "tt-ih")
    with torch.no_grad():
        step = _cell_step.native_step(cell)
    assert not step.has_ih  # a TT W_ih: the caller gives its product
    h, c = torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)
    with pytest.raises(ValueError, match="gx"):
        step(torch.randn(2, INPUT), h, c)
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        step(None, h, c, gx=torch.randn(2, 63))
    with pytest.raises(ValueError, match="c for an LSTM"):
        step(None, h, gx=torch.randn(2, 64))
    with pytest.raises(ValueError, match="mode must be one of"):
        CellStep("LSTMP", HIDDEN, INPUT, None, None, torch.zeros(64, HIDDEN), None)
    with pytest.raises(ValueError, match="W_hh must be a contiguous float32"):
        CellStep("GRU", HIDDEN, INPUT, None, None, torch.zeros(48, HIDDEN + 1), None)
    assert native_step.MODES["RNN_RELU"] == 3


@pytest.mark.parametrize(("first", "last"), [((3, 8), (300, 256)), ((3, 5), (9000, 7))])
def test_dot_product_factor_matches_kron(first, last):
    """A factor with no trailing axis that is too large to expand (J x I above 2^16) runs as
    dot products, over whole vectors of its inputs or (7 inputs) none."""
    torch.manual_seed(10)
    a0, a1 = torch.randn(2, *first), torch.randn(2, *last)  # two terms
    args = native_rnn.KronArgs([a0, a1], None, None)
    x = torch.randn(3, first[1] * last[1])
    w = sum(torch.kron(a0[p].double(), a1[p].double()) for p in range(2))
    torch.testing.assert_close(native_rnn.kron_apply(x, args).double(), x.double() @ w.T, **TOL)


def test_copies_prepare_their_own_step(forced):
    torch.manual_seed(11)
    cell = _cell("GRU", "cp")
    x, state = torch.randn(2, INPUT), _state("GRU", 2)
    _step(cell, "GRU", x, state)
    twin = copy.deepcopy(cell)  # after a step: the kept step is left out of the copy
    with torch.no_grad():
        next(twin.weight_hh.parameters()).mul_(-1)
    _assert_close(_step(twin, "GRU", x, state), _reference(twin, "GRU", x, state))
    _assert_close(_step(cell, "GRU", x, state), _reference(cell, "GRU", x, state))
    assert twin._native_cache[1] is not cell._native_cache[1]


def test_compiled_graphs_run_the_step_in_one_operator(forced):
    """Under ``torch.compile`` a factorized cell is one ``kcprnn::rnn`` node whose kernel runs
    the eager step, the compiled one included; while exporting, the torch ops are traced."""
    torch.manual_seed(13)
    cell = _cell("LSTM", "kcp-both")
    x, state = torch.randn(2, INPUT), _state("LSTM", 2)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(cell, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(x, state)
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("kcprnn.rnn.default") == 1
    assert forced == ["LSTM"]  # the eager step, run by the operator
    _assert_close(tuple(got), _reference(cell, "LSTM", x, state))
    forced.clear()
    with torch.no_grad():
        exported = torch.export.export(cell, (x, state)).module()(x, state)
    assert forced == []  # no compiled step inside an exported graph
    _assert_close(tuple(exported), _reference(cell, "LSTM", x, state))
