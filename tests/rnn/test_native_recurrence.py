"""The compiled recurrences (kcprnn/_cpu/native_rnn.cpp) against the torch loops of
kcprnn.rnn.fused: LSTM, GRU and Elman (tanh, relu) layers with a Kronecker-sum W_hh, both
directions, batch 1 and 16, odd sizes, several terms, KCP with and without index permutations
and CP. The kernel runs float32 only; its values and gradients (of the input projections, the
initial states, the bias and every factor matrix) are compared with the torch loop in float64 on
the same numbers, within float32 rounding accumulated over the steps. Without the kernel
(``KCPRNN_NATIVE=0``, no compiler) the torch loop runs."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import kcprnn
from kcprnn._cpu import native, native_dense, native_rnn
from kcprnn.rnn.fused import fused_sequence
from kcprnn.rnn.kron import kron_apply, kron_terms

pytestmark = pytest.mark.skipif(
    not native.available(), reason="the compiled kernel cannot be built"
)

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# (hidden, W_hh format, options per mode: (in_modes, out_modes) or None for the defaults)
LAYOUTS = {
    # two factors of one mode each, two terms: no permutations
    "kcp-odd": (15, "kcp", {"rank": 2, "terms": 2}, {"in": [[3, 5]], "out": [[3, 5]]}),
    # two modes of two factors: permutations on both sides, whole-vector rows per factor
    "kcp-perm": (24, "kcp", {"rank": 2, "terms": 2}, {"in": [[2, 3], [2, 2]], "out": None}),
    # three factors, two of them 1 x 1 or one column
    "kcp3": (24, "kcp", {"rank": 2, "terms": 2, "num_factors": 3}, None),
    # the default layout: a factor multiplied along long trailing axes
    "kcp-default": (64, "kcp", {}, None),
    "cp": (15, "cp", {"rank": 3}, None),
}
TOL = {"rtol": 2e-4, "atol": 2e-5}


def _out_modes(mode: str, in_modes: list[list[int]]) -> list[list[int]]:
    """Output modes for ``G * hidden`` outputs: the first mode's first factor times ``G``."""
    out = [list(m) for m in in_modes]
    out[0][0] *= GATES[mode]
    return out


def _matrix(mode: str, layout: str) -> tuple[int, list[torch.Tensor], object]:
    """``(hidden, factor matrices (float64 leaves), layout)`` of a ``W_hh`` for ``mode``."""
    hidden, fmt, options, modes = LAYOUTS[layout]
    options = dict(options)
    if modes is not None:
        options["in_modes"] = modes["in"]
        options["out_modes"] = _out_modes(mode, modes["out"] or modes["in"])
    w = kcprnn.formats.make_matrix(
        fmt, hidden, GATES[mode] * hidden, dtype=torch.float64, **options
    )
    found = kron_terms(w)
    assert found is not None
    mats, spec = found
    return hidden, [m.detach().requires_grad_() for m in mats], spec


def _inputs(mode: str, hidden: int, steps: int, batch: int, zero_state: bool):
    g = GATES[mode] * hidden
    gx = torch.randn(steps * batch, g, dtype=torch.float64)
    bias = torch.randn(g, dtype=torch.float64)
    state = [torch.randn(batch, hidden, dtype=torch.float64)]
    if mode == "LSTM":
        state.append(torch.randn(batch, hidden, dtype=torch.float64))
    if zero_state:
        state[0].zero_()
    return gx, bias, state


def _run(mode, nonlinearity, gx, bias, state, mats, spec, reverse):
    """Outputs, final states and the gradients of every input of one fused sequence."""
    leaves = [gx, bias, *state, *mats]
    leaves = [t.detach().requires_grad_() for t in leaves]
    gx, bias, state, mats = leaves[0], leaves[1], leaves[2 : 2 + len(state)], leaves[-len(mats) :]
    out, final = fused_sequence(mode, gx, tuple(state), mats, bias, reverse, spec, nonlinearity)
    weight = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    loss = (out * weight).sum() + sum((s * s).sum() for s in final)
    grads = torch.autograd.grad(loss, leaves)
    return [out, *final, *grads]


@pytest.fixture
def calls(monkeypatch):
    """The names of the compiled recurrence functions called (spied on in :mod:`native_rnn`)."""
    seen: list[str] = []
    for name in (
        "lstm_forward",
        "lstm_backward",
        "gru_forward",
        "gru_backward",
        "rnn_forward",
        "rnn_backward",
    ):
        original = getattr(native_rnn, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(native_rnn, name, spy)
    return seen


KINDS = [("LSTM", "tanh"), ("GRU", "tanh"), ("RNN", "tanh"), ("RNN", "relu")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("mode", "nonlinearity"), KINDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch", "zero_state"), [(1, False), (16, True), (5, False)])
def test_kernel_matches_the_torch_loop(
    layout, mode, nonlinearity, reverse, batch, zero_state, calls
):
    torch.manual_seed(0)
    hidden, mats, spec = _matrix(mode, layout)
    gx, bias, state = _inputs(mode, hidden, 7, batch, zero_state)
    want = _run(mode, nonlinearity, gx, bias, state, mats, spec, reverse)  # float64: torch
    assert calls == []
    got = _run(
        mode,
        nonlinearity,
        gx.float(),
        bias.float(),
        [s.float() for s in state],
        [m.float() for m in mats],
        spec,
        reverse,
    )
    assert calls == [f"{mode.lower()}_forward", f"{mode.lower()}_backward"]
    _assert_close(got, want)


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """float32 results against float64 ones: within the tolerance, relative to each tensor's
    largest entry."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        scale = 1.0 + float(b.detach().abs().max())
        torch.testing.assert_close(
            a.detach().double(), b.detach(), rtol=TOL["rtol"], atol=TOL["atol"] * scale
        )


@pytest.mark.parametrize(("mode", "nonlinearity"), KINDS)
def test_without_bias_and_without_gradients_for_the_initial_state(mode, nonlinearity, calls):
    torch.manual_seed(1)
    hidden, mats, spec = _matrix(mode, "kcp-perm")
    gx, _, state = _inputs(mode, hidden, 6, 4, False)
    results = []
    for dtype in (torch.float64, torch.float32):
        x = gx.to(dtype).requires_grad_()
        ms = [m.detach().to(dtype).requires_grad_() for m in mats]
        st = tuple(s.to(dtype) for s in state)  # no gradients wanted
        out, final = fused_sequence(mode, x, st, ms, None, False, spec, nonlinearity)
        loss = (out * out).sum() + final[-1].sum()
        results.append([out, *final, *torch.autograd.grad(loss, [x, *ms])])
    assert calls == [f"{mode.lower()}_forward", f"{mode.lower()}_backward"]
    _assert_close(results[1], results[0])


def test_strided_input_projections(calls):
    """Input projections that are a column slice of a wider product (both directions' gates in
    one GEMM) are read in place."""
    torch.manual_seed(2)
    hidden, mats, spec = _matrix("LSTM", "kcp-perm")
    wide = torch.randn(5 * 3, 2 * 4 * hidden)
    gx = wide[:, 4 * hidden :]
    assert not gx.is_contiguous()
    state = (torch.randn(3, hidden), torch.randn(3, hidden))
    ms = [m.detach().float() for m in mats]
    got = fused_sequence("LSTM", gx, state, ms, None, True, spec)
    state64 = tuple(s.double() for s in state)
    want = fused_sequence(
        "LSTM", gx.contiguous().double(), state64, [m.double() for m in ms], None, True, spec
    )
    assert calls == ["lstm_forward"]
    torch.testing.assert_close(got[0].double(), want[0], **TOL)
    torch.testing.assert_close(got[1][1].double(), want[1][1], **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_product_matches_kron_apply(layout):
    torch.manual_seed(3)
    _, mats, spec = _matrix("LSTM", layout)
    mats = [m.detach().float() for m in mats]
    idx = spec.indices(torch.device("cpu"))
    args = native_rnn.KronArgs(mats, *idx)
    tspec = spec.transposed()
    args_t = native_rnn.KronArgs(
        [m.transpose(1, 2) for m in mats], *tspec.indices(torch.device("cpu"))
    )
    for rows in (1, 7, 16):
        x = torch.randn(rows, spec.in_features)
        want = kron_apply(x.double(), [m.double() for m in mats], spec)
        torch.testing.assert_close(native_rnn.kron_apply(x, args).double(), want, **TOL)
        y = torch.randn(rows, spec.out_features)
        want_t = kron_apply(y.double(), [m.transpose(1, 2).double() for m in mats], tspec)
        torch.testing.assert_close(native_rnn.kron_apply(y, args_t).double(), want_t, **TOL)


def test_module_structured_route_runs_the_kernel(calls):
    """A two-layer bidirectional KCP LSTM on the structured route in float32 against the same
    model in float64 stepping through autograd, with dropout between the layers."""
    torch.manual_seed(4)
    model = kcprnn.LSTM(
        6, 16, num_layers=2, bidirectional=True, dropout=0.3, format="kcp", hidden_format="kcp"
    )
    model.recurrence = "structured"
    ref = copy.deepcopy(model).double()
    ref.recurrence = "steps"
    x = torch.randn(9, 4, 6)
    results = []
    for m, inp in ((model, x), (ref, x.double())):
        torch.manual_seed(5)  # the same dropout masks
        out, (h, c) = m(inp)
        loss = (out * out).sum() + h.sum() + c.sum()
        results.append([out, h, c, *torch.autograd.grad(loss, list(m.parameters()))])
    assert calls.count("lstm_forward") == 4 and calls.count("lstm_backward") == 4
    _assert_close(results[0], results[1])


def _fresh_state(monkeypatch):
    monkeypatch.setattr(native, "_state", {})


def test_disabled_by_environment_runs_the_torch_loop(monkeypatch, calls):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("KCPRNN_NATIVE", "0")
    torch.manual_seed(6)
    hidden, mats, spec = _matrix("LSTM", "kcp-perm")
    gx, bias, state = _inputs("LSTM", hidden, 5, 3, False)
    got = _run(
        "LSTM",
        "tanh",
        gx.float(),
        bias.float(),
        [s.float() for s in state],
        [m.float() for m in mats],
        spec,
        False,
    )
    want = _run("LSTM", "tanh", gx, bias, state, mats, spec, False)
    assert calls == []
    _assert_close(got, want)


def test_without_a_compiler_runs_the_torch_loop(monkeypatch, tmp_path, calls, caplog):
    _fresh_state(monkeypatch)
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    torch.manual_seed(7)
    hidden, mats, spec = _matrix("GRU", "cp")
    gx, bias, state = _inputs("GRU", hidden, 5, 2, False)
    got = _run(
        "GRU",
        "tanh",
        gx.float(),
        bias.float(),
        [s.float() for s in state],
        [m.float() for m in mats],
        spec,
        True,
    )
    assert calls == [] and not native.available()
    assert "no C++ compiler" in str(native.info()["error"])
    want = _run("GRU", "tanh", gx, bias, state, mats, spec, True)
    _assert_close(got, want)


def test_float64_runs_the_torch_loop(calls):
    hidden, mats, spec = _matrix("RNN", "cp")
    gx, bias, state = _inputs("RNN", hidden, 4, 2, False)
    _run("RNN", "tanh", gx, bias, state, mats, spec, False)
    assert calls == []


def test_kernel_arguments_are_checked():
    mats = [torch.randn(1, 4, 2), torch.randn(1, 3, 3)]
    with pytest.raises(ValueError, match="float32"):
        native_rnn.KronArgs([m.double() for m in mats], None, None)
    with pytest.raises(ValueError, match="in_index must have 6 entries"):
        native_rnn.KronArgs(mats, torch.arange(5), None)
    args = native_rnn.KronArgs(mats, None, None)  # 6 -> 12
    with pytest.raises(ValueError, match="maps 6 -> 12 features"):
        native_rnn.rnn_forward(
            torch.randn(4, 6),
            None,
            torch.empty(2, 2, 6),
            torch.zeros(2, 6),
            False,
            False,
            True,
            args,
        )
    with pytest.raises(ValueError, match="gx must be float32 on the CPU"):
        native_rnn.lstm_forward(
            torch.randn(4, 12).t(),
            None,
            torch.empty(2, 2, 12),
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            *[torch.empty(2, 2, 3)] * 3,
            False,
            True,
            args,
        )


def _forward_outputs(mode: str, gx, bias, h0, kron, reverse: bool) -> list[torch.Tensor]:
    """Every buffer one compiled forward direction fills, from zero-filled buffers."""
    batch, hidden = h0.shape
    steps = gx.shape[0] if gx.dim() == 3 else gx.shape[0] // batch
    h0 = h0.float()
    if mode == "LSTM":
        outs = [torch.zeros(steps, batch, 4 * hidden)]
        outs += [torch.zeros(steps, batch, hidden) for _ in range(3)]
        native_rnn.lstm_forward(gx, bias, outs[0], h0, h0.flip(0), *outs[1:], reverse, False, kron)
    elif mode == "GRU":
        outs = [torch.zeros(steps, batch, 3 * hidden), torch.zeros(steps, batch, 2 * hidden)]
        outs += [torch.zeros(steps, batch, hidden) for _ in range(2)]
        native_rnn.gru_forward(gx, bias, h0, *outs, reverse, False, kron)
    else:
        outs = [torch.zeros(steps, batch, hidden)]
        native_rnn.rnn_forward(gx, bias, outs[0], h0, reverse, False, False, kron)
    return outs


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("weight", ["dense", "kron"])
@pytest.mark.parametrize("reverse", [False, True])
def test_batch_major_projections_are_read_in_place(mode, weight, reverse):
    """Input projections stored batch-major (a batch-first input's rows) and passed as a
    transposed ``(t, b, g)`` view give bit for bit what their time-major copy gives: the dense
    steps read them through the strides, the whole loops copy them first."""
    torch.manual_seed(11)
    steps, batch = 5, 3
    if weight == "dense":
        hidden = 7
        kron = native_dense.DenseArgs(_dense_weight(mode, hidden).float())
    else:
        hidden, mats, spec = _matrix(mode, "kcp-perm")
        kron = native_rnn.KronArgs(
            [m.detach().float() for m in mats], *spec.indices(torch.device("cpu"))
        )
    g = GATES[mode] * hidden
    stored = torch.randn(batch, steps, g)  # (b, t, g): batch-major rows
    bias = torch.randn(g)
    h0 = torch.randn(batch, hidden)
    view = stored.transpose(0, 1)  # (t, b, g), strides (g, t g, 1)
    want = _forward_outputs(mode, view.contiguous().view(steps * batch, g), bias, h0, kron, reverse)
    got = _forward_outputs(mode, view, bias, h0, kron, reverse)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert want[-1].abs().sum() > 0  # the states were written
    with pytest.raises(ValueError, match=r"\(5, 3, " + str(g)):  # the batch does not match
        _forward_outputs(mode, view[:, :2], bias, h0, kron, reverse)


def test_the_layouts_cover_both_product_modes():
    """The cases above exercise permutations on and off, one and several terms, and factors
    multiplied along trailing axes shorter and longer than a vector."""
    perms, terms, long_post = set(), set(), False
    for name in LAYOUTS:
        _, mats, spec = _matrix("LSTM", name)
        perms.add(spec.in_index is not None or spec.out_index is not None)
        terms.add(mats[0].shape[0] > 1)
        post = 1
        for m in reversed(mats[1:]):
            post *= m.shape[1]
        long_post |= post >= 16
    assert perms == {True, False} and terms == {True, False} and long_post


def test_gradients_without_factor_gradients(calls):
    """Factors that need no gradient: the forward keeps no factor-major rows, and the input's
    and initial state's gradients are unchanged."""
    torch.manual_seed(8)
    hidden, mats, spec = _matrix("LSTM", "kcp-perm")
    gx, bias, state = _inputs("LSTM", hidden, 6, 3, False)
    results = []
    for dtype in (torch.float64, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (gx, bias, *state)]
        ms = [m.detach().to(dtype) for m in mats]
        out, final = fused_sequence("LSTM", leaves[0], tuple(leaves[2:]), ms, leaves[1], True, spec)
        loss = (out * out).sum() + final[1].sum()
        results.append([out, *torch.autograd.grad(loss, leaves)])
    assert calls == ["lstm_forward", "lstm_backward"]
    _assert_close(results[1], results[0])


def test_planning_prices_the_kernel_without_building_it(monkeypatch):
    """auto takes the structured route for a KCP W_hh at the speech size in float32 (the cost
    model plans for the kernel) without building or loading it; without the kernels in the
    model the structured loop is priced higher."""
    from kcprnn._cpu import CostModel
    from kcprnn.rnn import plan

    monkeypatch.setattr(native, "build", lambda *a, **k: pytest.fail("planning built the kernel"))
    monkeypatch.setattr(native, "_library", lambda: pytest.fail("planning loaded the kernel"))
    model = kcprnn.LSTM(40, 512, bidirectional=True, format="kcp", hidden_format="kcp")
    cells = [model.cell(0, d) for d in range(2)]
    assert plan.choose_route("auto", cells, 300 * 16, 300, True, True) == "structured"
    with_kernels = plan.layer_costs(cells, 4800, 300, True, True, CostModel())
    without = plan.layer_costs(cells, 4800, 300, True, True, CostModel(kernels=False))
    assert with_kernels["structured"] < without["structured"]
    assert with_kernels["torch"] == without["torch"]
    # float64 plans without the kernels
    double = copy.deepcopy(model).double()
    cells64 = [double.cell(0, d) for d in range(2)]
    assert cells64[0].weight_hh.planning_model().kernels is False


@pytest.mark.parametrize(
    "shapes",
    [
        [(16, 16), (128, 32)],  # the speech W_hh: the expanding factor goes last
        [(128, 32), (16, 16)],
        [(2, 8), (32, 4), (4, 4)],
        [(3, 5), (32, 4), (2, 8)],
        [(1, 6), (5, 1), (7, 3)],
    ],
)
def test_kernel_product_in_any_factor_order(shapes):
    """The kernel applies the factors in the order with the fewest multiply-accumulates, which
    depends on their shapes: every order gives the dense Kronecker sum's product."""
    torch.manual_seed(7)
    mats = [torch.randn(2, j, i) for j, i in shapes]  # two terms
    args = native_rnn.KronArgs(mats, None, None)
    dense = sum(
        functools.reduce(torch.kron, [m[p].double() for m in mats]) for p in range(2)
    )  # (out, in)
    for rows in (1, 5, 16):
        x = torch.randn(rows, dense.shape[1])
        torch.testing.assert_close(
            native_rnn.kron_apply(x, args).double(), x.double() @ dense.T, **TOL
        )


# --- a dense W_hh: each step's product on oneDNN (packed W_hh), the rest compiled ---


def _dense_weight(mode: str, hidden: int) -> torch.Tensor:
    return torch.randn(GATES[mode] * hidden, hidden, dtype=torch.float64) * 0.3


@pytest.mark.parametrize(("mode", "nonlinearity"), KINDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch", "zero_state"), [(1, False), (16, True), (5, False)])
def test_dense_steps_match_the_torch_loop(mode, nonlinearity, reverse, batch, zero_state, calls):
    torch.manual_seed(0)
    hidden = 13
    w = _dense_weight(mode, hidden)
    # more steps than PACK_AFTER: the products run on the weight as it is, then packed
    gx, bias, state = _inputs(mode, hidden, native_dense.PACK_AFTER + 4, batch, zero_state)
    want = _run(mode, nonlinearity, gx, bias, state, [w], None, reverse)  # float64: torch
    assert calls == []
    f32 = [s.float() for s in state]
    got = _run(mode, nonlinearity, gx.float(), bias.float(), f32, [w.float()], None, reverse)
    assert calls == [f"{mode.lower()}_forward", f"{mode.lower()}_backward"]
    _assert_close(got, want)


@pytest.mark.parametrize(("mode", "nonlinearity"), KINDS)
def test_dense_steps_unpacked_and_without_gradients_for_the_initial_state(
    mode, nonlinearity, calls, monkeypatch
):
    """Where torch cannot pack the weight for oneDNN the steps' products run on
    ``linear_nt`` (the same numbers up to rounding); without a gradient for the initial state
    none reaches it."""
    torch.manual_seed(2)
    hidden = 9
    w = _dense_weight(mode, hidden)
    gx, _, state = _inputs(mode, hidden, 6, 4, False)
    results = []
    for dtype, pack in ((torch.float64, True), (torch.float32, True), (torch.float32, False)):
        if not pack:
            monkeypatch.setattr(native_dense, "_PACK", None)
        x = gx.to(dtype).requires_grad_()
        weight = w.to(dtype).requires_grad_()
        st = tuple(s.to(dtype) for s in state)
        out, final = fused_sequence(mode, x, st, [weight], None, False, None, nonlinearity)
        loss = (out * out).sum() + final[-1].sum()
        results.append([out, *final, *torch.autograd.grad(loss, [x, weight])])
    assert calls == [f"{mode.lower()}_forward", f"{mode.lower()}_backward"] * 2
    _assert_close(results[1], results[0])
    _assert_close(results[2], results[0])


def test_dense_args_pack_after_a_few_products(monkeypatch):
    """The first PACK_AFTER products run on the weight as it is, the later ones on the weight
    packed once for oneDNN (where torch has it); every one equals x @ W.T."""
    torch.manual_seed(3)
    w = torch.randn(12, native_dense.SMALL_MM_IN + 1)  # wider than the small products
    args = native_dense.DenseArgs(w.t().contiguous().t())  # any strides
    x = torch.randn(4, w.shape[1])
    for _ in range(native_dense.PACK_AFTER):
        torch.testing.assert_close(args.mul(x), x @ w.T)
    assert args._packed is None
    torch.testing.assert_close(args.mul(x), x @ w.T)
    packed = args._packed
    assert (packed is not None) == (native_dense._PACK is not None)
    torch.testing.assert_close(args.mul(x[:1]), x[:1] @ w.T)  # any rows after packing
    assert args._packed is packed  # packed once
    monkeypatch.setattr(native_dense, "_PACK", None)
    plain = native_dense.DenseArgs(w)
    for _ in range(native_dense.PACK_AFTER + 2):
        torch.testing.assert_close(plain.mul(x), x @ w.T)
    assert plain._packed is None


def test_dense_args_multiply_a_small_weight_by_mm_unpacked():
    """A W within SMALL_MM_ELEMENTS and SMALL_MM_IN is never packed; its products equal
    x @ W.T from the first call on; one element more, or one column more, and it packs."""
    torch.manual_seed(4)
    limit, columns = native_dense.SMALL_MM_ELEMENTS, native_dense.SMALL_MM_IN
    for shape, small in [
        ((limit // 128, 128), True),
        ((limit // 128 + 1, 128), False),
        ((limit // columns, columns), True),
        ((1, columns + 1), False),
    ]:
        w = torch.randn(*shape)
        args = native_dense.DenseArgs(w)
        x = torch.randn(3, shape[1])
        for _ in range(native_dense.PACK_AFTER + 2):
            torch.testing.assert_close(args.mul(x), x @ w.T)
        assert (args._packed is None) == (small or native_dense._PACK is None), shape


def _torch_name(name: str) -> str:
    """kcprnn's ``cells.K.weight_ih.weight`` as torch.nn's ``weight_ih_lL[_reverse]`` (two
    directions)."""
    parts = name.split(".")
    k = int(parts[1])
    suffix = f"_l{k // 2}" + ("_reverse" if k % 2 else "")
    return parts[2] + suffix


def _torch_reference(model: torch.nn.Module, mode: str, sizes: tuple[int, int]) -> torch.nn.Module:
    """torch.nn's two-layer bidirectional ``mode`` module of ``sizes`` (input, hidden) in
    float64 with the dense ``model``'s weights."""
    ref = getattr(torch.nn, mode)(*sizes, num_layers=2, bidirectional=True).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            getattr(ref, _torch_name(name)).copy_(p)
    return ref


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_module_dense_route_matches_torch_nn(mode, calls):
    """A bidirectional two-layer module with dense weights on the compiled dense loop (float32)
    against torch.nn's module in float64 with the same weights: outputs, final states and the
    gradients of the input, the initial state and every parameter."""
    torch.manual_seed(4)
    ref = getattr(torch.nn, mode)(6, 10, num_layers=2, bidirectional=True)
    model = getattr(kcprnn, mode).from_torch(ref, format="dense")
    ref.double()
    model.recurrence = "dense"
    x = torch.randn(9, 3, 6, dtype=torch.float64)
    states = [torch.randn(4, 3, 10, dtype=torch.float64) for _ in range(2 if mode == "LSTM" else 1)]
    results = []
    for net, dtype in ((ref, torch.float64), (model, torch.float32)):
        xs = x.to(dtype).requires_grad_()
        st = [s.to(dtype).requires_grad_() for s in states]
        out, final = net(xs, tuple(st) if mode == "LSTM" else st[0])
        finals = list(final) if mode == "LSTM" else [final]
        loss = (out * torch.linspace(-1, 1, 20, dtype=dtype)).sum()
        loss = loss + sum((f * f).sum() for f in finals)
        named = dict(net.named_parameters())
        if net is model:
            named = {_torch_name(k): v for k, v in named.items()}
        names = sorted(named)
        grads = torch.autograd.grad(loss, [xs, *st, *(named[k] for k in names)])
        results.append([out, *finals, *grads])
    assert names == sorted(n for n, _ in ref.named_parameters())
    assert calls.count(f"{mode.lower()}_forward") == 4  # two layers, two directions
    assert calls.count(f"{mode.lower()}_backward") == 4
    _assert_close(results[1], results[0])


def _record_rows(monkeypatch, name: str, positions: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Spies on ``native_rnn.<name>``: each call appends the leading size of its positional
    arguments at ``positions`` (the buffers a backward would read) to the returned list."""
    seen: list[tuple[int, ...]] = []
    original = getattr(native_rnn, name)

    def spy(*args, **kwargs):
        seen.append(tuple(args[k].shape[0] for k in positions))
        return original(*args, **kwargs)

    monkeypatch.setattr(native_rnn, name, spy)
    return seen


@pytest.mark.parametrize(("fmt", "route"), [("dense", "dense"), ("cp", "structured")])
def test_gru_inference_keeps_one_step_of_the_backward_buffers(fmt, route, calls, monkeypatch):
    """Without gradients the compiled GRU loops rewrite one step's gh, rz and ns instead of
    keeping every step's for a backward: the outputs equal torch.nn's module in float64 with the
    same weights (dense) and the same module's outputs with gradients (both)."""
    kept = _record_rows(monkeypatch, "gru_forward", (3,))  # gh
    torch.manual_seed(5)
    hidden = 15
    model = kcprnn.GRU(6, hidden, num_layers=2, bidirectional=True, format=fmt, hidden_format=fmt)
    model.recurrence = route
    x = torch.randn(7, 3, 6)
    h0 = torch.randn(4, 3, hidden)
    with torch.no_grad():
        out, h_n = model(x, h0)
    assert calls.count("gru_forward") == 4  # two layers, two directions
    graded, h_graded = model(x.requires_grad_(), h0)
    assert kept == [(1,)] * 4 + [(7,)] * 4  # one step's rows without gradients, all 7 with
    torch.testing.assert_close(out, graded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h_n, h_graded.detach(), rtol=0, atol=0)
    if fmt == "dense":
        ref = _torch_reference(model, "GRU", (6, hidden))
        with torch.no_grad():
            want, want_h = ref(x.detach().double(), h0.double())
        torch.testing.assert_close(out, want.float(), **TOL)
        torch.testing.assert_close(h_n, want_h.float(), **TOL)


@pytest.mark.parametrize("steps", [7, 2, 1])
@pytest.mark.parametrize(("fmt", "route"), [("dense", "dense"), ("cp", "structured")])
def test_lstm_inference_keeps_a_step_of_gates_and_two_of_states(fmt, route, steps, monkeypatch):
    """Without gradients the compiled LSTM loops write one step's gates and alternate two
    steps' cell states (the final c read from the last one's row, in both directions): outputs
    and final states equal the same module's with gradients, bit for bit, and torch.nn's
    module in float64 with the same weights (dense)."""
    kept = _record_rows(monkeypatch, "lstm_forward", (2, 6))  # gates, cs
    torch.manual_seed(6)
    hidden = 12
    model = kcprnn.LSTM(5, hidden, num_layers=2, bidirectional=True, format=fmt, hidden_format=fmt)
    model.recurrence = route
    x = torch.randn(steps, 3, 5)
    state = (torch.randn(4, 3, hidden), torch.randn(4, 3, hidden))
    with torch.no_grad():
        out, (h_n, c_n) = model(x, state)
    graded, (h_g, c_g) = model(x.requires_grad_(), state)
    assert kept == [(min(steps, 1), min(steps, 2))] * 4 + [(steps, steps)] * 4
    for got, want in ((out, graded), (h_n, h_g), (c_n, c_g)):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    if fmt == "dense":
        ref = _torch_reference(model, "LSTM", (5, hidden))
        with torch.no_grad():
            want, (want_h, want_c) = ref(x.detach().double(), tuple(s.double() for s in state))
        for got, ref_value in ((out, want), (h_n, want_h), (c_n, want_c)):
            torch.testing.assert_close(got, ref_value.float(), **TOL)
