"""kcprnn.LSTMCell/GRUCell/RNNCell against torch.nn's cells, and the step functions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import kcprnn
from kcprnn import FORMATS
from kcprnn._cpu import CostModel
from kcprnn.rnn import fold_gates, gru_sequence, gru_step, lstm_sequence, lstm_step

CELLS = {
    "lstm": (kcprnn.LSTMCell, nn.LSTMCell, {}),
    "gru": (kcprnn.GRUCell, nn.GRUCell, {}),
    "rnn_tanh": (kcprnn.RNNCell, nn.RNNCell, {}),
    "rnn_relu": (kcprnn.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_matches_torch(kind, bias, dtype):
    ours_cls, torch_cls, extra = CELLS[kind]
    ref = torch_cls(5, 3, bias=bias, dtype=dtype, **extra)
    ours = ours_cls.from_torch(ref, format="dense")
    x = torch.randn(4, 5, dtype=dtype)
    n_states = 2 if kind == "lstm" else 1
    hx = tuple(torch.randn(4, 3, dtype=dtype) for _ in range(n_states))
    hx_arg = hx if n_states == 2 else hx[0]
    for args in (
        (x,),
        (x, hx_arg),
        (x[0],),
        (x[0], tuple(h[0] for h in hx) if n_states == 2 else hx[0][0]),
    ):
        for a, b in zip(as_tuple(ours(*args)), as_tuple(ref(*args)), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_dense_cell_step_with_a_state_matches_torch(kind):
    """A dense cell given a batched state steps on its parameters directly: values and the
    gradients of the input, the state and every weight equal torch.nn's in float64; a pruned
    weight (no longer a parameter) takes the full step and is used; a state of the wrong size
    gets the full step's error."""
    ours_cls, torch_cls, extra = CELLS[kind]
    torch.manual_seed(0)
    ref = torch_cls(5, 3, dtype=torch.float64, **extra)
    ours = ours_cls.from_torch(ref, format="dense")
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    n_states = 2 if kind == "lstm" else 1
    hx = tuple(torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(n_states))
    arg = hx if n_states == 2 else hx[0]
    grads = []
    for model, weights in ((ours, ours.weight_ih.weight), (ref, ref.weight_ih)):
        out = as_tuple(model(x, arg))
        loss = sum((o * torch.linspace(-1, 1, 3, dtype=torch.float64)).sum() for o in out)
        grads.append(torch.autograd.grad(loss, [x, *hx, weights]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    with torch.no_grad():
        prune.l1_unstructured(ours.weight_ih, "weight", amount=0.5)
        ref.weight_ih.copy_(ours.weight_ih.weight)
        for a, b in zip(as_tuple(ours(x, arg)), as_tuple(ref(x, arg)), strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    bad = tuple(h[:, :2] for h in hx)
    with pytest.raises(ValueError, match="Expected hx"):
        ours(x, bad if n_states == 2 else bad[0])


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_gradients_match_torch(kind):
    ours_cls, torch_cls, extra = CELLS[kind]
    ref = torch_cls(5, 3, dtype=torch.float64, **extra)
    ours = ours_cls.from_torch(ref, format="dense")
    x = torch.randn(4, 5, dtype=torch.float64)
    for model in (ours, ref):
        torch.manual_seed(1)
        out = as_tuple(model(x))
        sum((o * torch.randn_like(o)).sum() for o in out).backward()
    torch.testing.assert_close(ours.weight_ih.weight.grad, ref.weight_ih.grad)
    torch.testing.assert_close(ours.weight_hh.weight.grad, ref.weight_hh.grad)
    torch.testing.assert_close(ours.bias_hh.grad, ref.bias_hh.grad)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_cell_every_format_equals_its_reconstruction(name):
    opts = {"in_modes": [3, 4], "hidden_modes": [2, 2]}
    cell = kcprnn.LSTMCell(12, 4, format=name, dtype=torch.float64, **opts)
    assert cell.weight_ih.out_modes == (8, 2)
    ref = nn.LSTMCell(12, 4, dtype=torch.float64)
    with torch.no_grad():
        ref.weight_ih.copy_(cell.weight_ih.to_dense())
        ref.weight_hh.copy_(cell.weight_hh.to_dense())
        ref.bias_ih.copy_(cell.bias_ih)
        ref.bias_hh.copy_(cell.bias_hh)
    x = torch.randn(3, 12, dtype=torch.float64)
    for a, b in zip(cell(x), ref(x), strict=True):
        torch.testing.assert_close(a, b)


def test_fold_gates():
    assert fold_gates([4, 4, 4, 4], 4) == [16, 4, 4, 4]
    assert fold_gates([[2, 2], [2, 2]], 3) == [[6, 2], [2, 2]]
    assert fold_gates((5,), 1) == [5]


def test_cell_errors():
    cell = kcprnn.GRUCell(5, 3, format="dense")
    with pytest.raises(ValueError, match="GRUCell: Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="input_size. Expected 5, got 4"):
        cell(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"Expected hx\[0\] of shape \(2, 3\), got \(2, 4\)"):
        cell(torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"Expected hx\[0\] to be 1D like the input, got 2D"):
        cell(torch.randn(5), torch.randn(1, 3))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        kcprnn.LSTMCell(5, 3, format="dense")(torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ValueError, match="proj_size is only supported by LSTM"):
        kcprnn.GRUCell(5, 3, format="dense", proj_size=1)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        kcprnn.RNNCell(5, 3, nonlinearity="gelu", format="dense")
    with pytest.raises(ValueError, match=r"hidden_modes=\[2, 2\] multiply to 4, but hidden_size=3"):
        kcprnn.RNNCell(5, 3, format="dense", hidden_modes=[2, 2])
    with pytest.raises(ValueError, match="unknown hidden_format 'nope'"):
        kcprnn.RNNCell(5, 3, format="dense", hidden_format="nope")
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        kcprnn.RNNCell(5, 0, format="dense")


def test_cell_extra_repr():
    assert kcprnn.RNNCell(5, 3, bias=False, nonlinearity="relu", format="dense").extra_repr() == (
        "5, 3, bias=False, nonlinearity='relu'"
    )


# --- the fused LSTM layer ---


def _lstm_by_steps(gates_x, h, c, weight, bias, reverse):
    """Reference: lstm_step over time with autograd."""
    b = h.shape[0]
    steps = gates_x.shape[0] // b
    outs = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        h, c = lstm_step(gates_x[t * b : (t + 1) * b], h, c, lambda z: F.linear(z, weight), bias)
        outs[t] = h
    return torch.cat(outs), h, c


def _state(state, *shape):
    """An initial state: random, zeros (the fused layers skip the first recurrent GEMM) or
    zeros without gradient (they also skip the last GEMM of the backward)."""
    t = (
        torch.randn(*shape, dtype=torch.float64)
        if state == "random"
        else torch.zeros(*shape, dtype=torch.float64)
    )
    return t.requires_grad_(state != "zero-no-grad")


STATES = ["random", "zero", "zero-no-grad"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_sequence_matches_steps(reverse, bias, state):
    torch.manual_seed(0)
    b, h, steps = 3, 4, 5
    f64 = torch.float64
    args = [
        torch.randn(steps * b, 4 * h, dtype=f64, requires_grad=True),
        _state(state, b, h),
        _state(state, b, h),
        torch.randn(4 * h, h, dtype=f64, requires_grad=True),
        torch.randn(4 * h, dtype=f64, requires_grad=True) if bias else None,
    ]
    assert_same_values_and_gradients(
        lstm_sequence(*args, reverse=reverse), _lstm_by_steps(*args, reverse), args
    )


def assert_same_values_and_gradients(got, ref, args):
    """Outputs equal, and so are the gradients of a random weighting of them (float64)."""
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    weights = [torch.randn_like(r) for r in ref]
    inputs = [a for a in args if a is not None and a.requires_grad]
    loss_got = sum((g * w).sum() for g, w in zip(got, weights, strict=True))
    loss_ref = sum((r * w).sum() for r, w in zip(ref, weights, strict=True))
    for g, r in zip(
        torch.autograd.grad(loss_got, inputs), torch.autograd.grad(loss_ref, inputs), strict=True
    ):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_lstm_sequence_gradcheck():
    torch.manual_seed(1)
    b, h, steps = 2, 3, 3
    args = [
        torch.randn(steps * b, 4 * h, dtype=torch.float64, requires_grad=True),
        torch.randn(b, h, dtype=torch.float64, requires_grad=True),
        torch.randn(b, h, dtype=torch.float64, requires_grad=True),
        torch.randn(4 * h, h, dtype=torch.float64, requires_grad=True),
        torch.randn(4 * h, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *a: lstm_sequence(*a, reverse=True), args)
    assert torch.autograd.gradcheck(lambda *a: lstm_sequence(*a), args)


# --- the fused GRU layer ---


def _gru_by_steps(gates_x, h, weight, bias, reverse):
    """Reference: gru_step over time with autograd."""
    b = h.shape[0]
    steps = gates_x.shape[0] // b
    outs = [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        h = gru_step(gates_x[t * b : (t + 1) * b], h, lambda z: F.linear(z, weight), bias)
        outs[t] = h
    return torch.cat(outs), h


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_sequence_matches_steps(reverse, bias, state):
    torch.manual_seed(2)
    b, h, steps = 3, 4, 5
    f64 = torch.float64
    args = [
        torch.randn(steps * b, 3 * h, dtype=f64),
        _state(state, b, h),
        torch.randn(3 * h, h, dtype=f64),
        torch.randn(3 * h, dtype=f64) if bias else None,
    ]
    args = [
        a if a is None or a.requires_grad else a.requires_grad_(i != 1) for i, a in enumerate(args)
    ]
    assert_same_values_and_gradients(
        gru_sequence(*args, reverse=reverse), _gru_by_steps(*args, reverse), args
    )


def test_gru_sequence_gradcheck():
    torch.manual_seed(3)
    b, h, steps = 2, 3, 3
    args = [
        torch.randn(steps * b, 3 * h, dtype=torch.float64, requires_grad=True),
        torch.randn(b, h, dtype=torch.float64, requires_grad=True),
        torch.randn(3 * h, h, dtype=torch.float64, requires_grad=True),
        torch.randn(3 * h, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *a: gru_sequence(*a, reverse=True), args)
    assert torch.autograd.gradcheck(lambda *a: gru_sequence(*a), args)


@pytest.mark.parametrize("mm_rows", [0, 10**9])
def test_recurrent_weight_gradient_path_follows_the_cost_model(monkeypatch, mm_rows):
    """Up to the cost model's recurrent_grad_mm_rows rows, W_hh's gradient runs on
    onednn_weight_grad (oneDNN); over more, on torch.mm (oneDNN priced as MKL here). Both give
    autograd's gradient."""
    from kcprnn.rnn import _fused_base as fused

    model = CostModel(onednn_gemm=1.0).replace(recurrent_grad_mm_rows=mm_rows)
    monkeypatch.setattr(fused, "default_cost_model", lambda: model)
    calls = []
    real = fused.onednn_weight_grad

    def counting(grad, x):
        calls.append(1)
        return real(grad, x)

    monkeypatch.setattr(fused, "onednn_weight_grad", counting)
    torch.manual_seed(4)
    b, h, steps = 2, 3, 4
    f64 = torch.float64
    args = [
        torch.randn(steps * b, 4 * h, dtype=f64, requires_grad=True),
        torch.randn(b, h, dtype=f64, requires_grad=True),
        torch.randn(b, h, dtype=f64, requires_grad=True),
        torch.randn(4 * h, h, dtype=f64, requires_grad=True),
        torch.randn(4 * h, dtype=f64, requires_grad=True),
    ]
    assert_same_values_and_gradients(lstm_sequence(*args), _lstm_by_steps(*args, False), args)
    gru_args = [torch.randn(steps * b, 3 * h, dtype=f64, requires_grad=True), args[1]]
    gru_args += [torch.randn(3 * h, h, dtype=f64, requires_grad=True), args[4][: 3 * h]]
    assert_same_values_and_gradients(
        gru_sequence(*gru_args), _gru_by_steps(*gru_args, False), gru_args
    )
    assert len(calls) == (2 if mm_rows > 0 else 0)  # one backward of each fused layer


# --- conversion from torch.nn and subclasses ---


class MyGRUCell(kcprnn.GRUCell):
    pass


@pytest.mark.parametrize("bias", [True, False])
def test_subclass_from_torch_is_the_subclass_and_equals_torch(bias):
    ref = nn.GRUCell(5, 3, bias=bias, dtype=torch.float64)
    ours = MyGRUCell.from_torch(ref, format="dense")
    assert type(ours) is MyGRUCell
    x, h = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x, h), ref(x, h), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"MyGRUCell.from_torch expects a torch.nn.GRUCell, got"):
        MyGRUCell.from_torch(nn.LSTMCell(5, 3), format="dense")


def test_from_torch_leaves_nothing_on_the_meta_device():
    ref = nn.RNNCell(5, 3, nonlinearity="relu", dtype=torch.float64)
    ours = kcprnn.RNNCell.from_torch(ref, format="tt", rank=2)
    assert ours.nonlinearity == "relu"
    tensors = [*ours.parameters(), *ours.buffers()]
    assert tensors and all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors)
    assert all(p.requires_grad for p in ours.parameters())


def test_load_dense_weights_keeps_the_constructor_options():
    """A TT cell (ranks large enough to be exact) loading torch's weights: the matrices keep the
    modes the constructor derived (gates folded into hidden_modes) and compute torch's cell."""
    ref = nn.LSTMCell(8, 4, dtype=torch.float64)
    cell = kcprnn.LSTMCell(
        8, 4, format="tt", rank=64, in_modes=[2, 4], hidden_modes=[2, 2], dtype=torch.float64
    )
    cell.load_dense_weights(ref.weight_ih, ref.weight_hh, bias_ih=ref.bias_ih, bias_hh=ref.bias_hh)
    assert cell.weight_ih.in_modes == (2, 4) and cell.weight_ih.out_modes == (8, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    for a, b in zip(cell(x), ref(x), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("fmt", "tol"), [("tt", 1e-8), ("cp", 1e-6), ("tucker", 1e-8), ("kcp", 0.1)]
)
def test_load_dense_weights_with_a_parameter_budget(fmt, tol):
    """A cell built with budgets (float ranks) loads dense weights into the configurations the
    constructor solved: the same parameter shapes, and a weight the cell itself can represent
    (its own initial one) comes back (exactly for TT, CP and Tucker; KCP's fit is iterative)."""
    torch.manual_seed(0)
    cell = kcprnn.LSTMCell(
        24,
        8,
        format=fmt,
        rank=0.2,
        hidden_format=fmt,
        hidden_options={"rank": 0.3},
        dtype=torch.float64,
    )
    w_ih, w_hh = (cell.weight_ih.to_dense().detach(), cell.weight_hh.to_dense().detach())
    shapes = [p.shape for p in cell.parameters()]
    cell.load_dense_weights(w_ih, w_hh)
    assert [p.shape for p in cell.parameters()] == shapes
    with torch.no_grad():
        for got, want in ((cell.weight_ih.to_dense(), w_ih), (cell.weight_hh.to_dense(), w_hh)):
            assert (got - want).norm() / want.norm() < tol


def test_load_dense_weights_errors_name_the_weight():
    cell = kcprnn.LSTMCell(5, 4, format="dense")
    w_ih, w_hh = torch.randn(16, 5), torch.randn(16, 4)
    with pytest.raises(
        ValueError, match=r"weight_hh should have shape \(16, 4\), got shape \(16, 3\)"
    ):
        cell.load_dense_weights(w_ih, torch.randn(16, 3))
    with pytest.raises(ValueError, match="weight_hr given, but the cell has no projection"):
        cell.load_dense_weights(w_ih, w_hh, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"bias_hh of shape \(12,\) given, .* shape \(16,\)"):
        cell.load_dense_weights(w_ih, w_hh, bias_hh=torch.randn(12))
    proj = kcprnn.LSTMCell(5, 4, proj_size=2, bias=False, format="dense")
    with pytest.raises(ValueError, match=r"weight_hr should have shape \(2, 4\), got none"):
        proj.load_dense_weights(w_ih, torch.randn(16, 2))
    with pytest.raises(ValueError, match="bias_ih of shape .* but the cell has bias=False"):
        proj.load_dense_weights(w_ih, torch.randn(16, 2), torch.randn(2, 4), torch.randn(16))


def test_names_stay_importable_from_their_modules():
    import kcprnn.rnn
    import kcprnn.rnn.cells
    import kcprnn.rnn.recurrent

    steps = ["lstm_step", "gru_step", "rnn_step", "lstm_sequence", "gru_sequence"]
    options = ["fold_gates", "input_matrix_options", "hidden_matrix_options"]
    expected = {
        kcprnn.rnn.cells: ["LSTMCell", "GRUCell", "RNNCell", *steps, *options],
        kcprnn.rnn.recurrent: ["LSTM", "GRU", "RNN", "scan", "run_layer"],
        kcprnn.rnn: ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "summary"]
        + [*steps, *options, "scan", "run_layer", "LayerSummary", "ModelSummary"],
    }
    for module, names in expected.items():
        for name in names:
            assert name in module.__all__ and hasattr(module, name), (module.__name__, name)
