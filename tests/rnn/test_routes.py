"""Every route a recurrent layer can run (torch's kernels on rebuilt weights, kcprnn's fused loops
with a dense or Kronecker-sum W_hh, autograd steps) gives the same values and gradients: against
torch.nn with dense weights, against the unfused autograd path with compressed ones, in float64,
with packed variable-length sequences, both directions, several layers and dropout."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import kcprnn
from kcprnn._cpu.cost import CostModel
from kcprnn.rnn import plan
from kcprnn.rnn.fused import fused_sequence
from kcprnn.rnn.kron import (
    kron_apply,
    kron_grads,
    kron_grads_from_dense,
    kron_layout,
    kron_matmul_macs,
    kron_terms,
    rebuild,
)

# torch.nn.LSTM (the reference) warns that its float32 projection path bypasses oneDNN.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

ROUTES = ["torch", "dense", "structured", "steps"]
KINDS = {
    "lstm": (kcprnn.LSTM, nn.LSTM, {}),
    "gru": (kcprnn.GRU, nn.GRU, {}),
    "rnn_tanh": (kcprnn.RNN, nn.RNN, {}),
    "rnn_relu": (kcprnn.RNN, nn.RNN, {"nonlinearity": "relu"}),
}
TOL = {"rtol": 1e-9, "atol": 1e-10}
INPUT, HIDDEN, STEPS, BATCH = 6, 8, 5, 3
# W_hh formats that are Kronecker sums, with options that exercise terms, ranks and factors
HIDDEN_FORMATS = {
    "kcp": {"rank": [2, 1], "terms": 2, "num_factors": 2},
    "kcp3": {"rank": 2, "terms": 1, "num_factors": 3},
    "cp": {"rank": 3},
    "tt": {"rank": 2},
}


def _states(hx):
    return hx if isinstance(hx, tuple) else (hx,)


def _random_hx(kind, layers, directions, batch):
    k = layers * directions
    h = torch.randn(k, batch, HIDDEN, dtype=torch.float64)
    return (h, torch.randn(k, batch, HIDDEN, dtype=torch.float64)) if kind == "lstm" else h


def _run(model, x, hx):
    """Output (padded), final states and the gradients of every parameter and input."""
    out, h_n = model(x, hx)
    padded = pad_packed_sequence(out)[0] if isinstance(out, nn.utils.rnn.PackedSequence) else out
    loss = (padded * torch.linspace(-1, 1, padded.shape[-1], dtype=padded.dtype)).sum()
    loss = loss + sum((s * s).sum() for s in _states(h_n))
    params = [p for p in model.parameters()]
    leaves = [x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x, *_states(hx)]
    grads = torch.autograd.grad(loss, params + leaves, allow_unused=True)
    return padded, _states(h_n), grads


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [None, [5, 2, 4], [5, 5, 5]])
def test_dense_routes_match_torch(kind, route, packed):
    ours_cls, torch_cls, extra = KINDS[kind]
    ref = torch_cls(INPUT, HIDDEN, num_layers=2, bidirectional=True, **extra, dtype=torch.float64)
    ours = ours_cls.from_torch(ref, format="dense")
    ours.recurrence = route
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64, requires_grad=True)
    if packed:  # variable lengths (unsorted: the fused loops cannot run them), or equal ones
        x_in = pack_padded_sequence(x, torch.tensor(packed), enforce_sorted=False)
    else:
        x_in = x
    hx = _random_hx(kind, 2, 2, BATCH)
    hx = tuple(t.requires_grad_() for t in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    got, want = _run(ours, x_in, hx), _run(ref, x_in, hx)
    torch.testing.assert_close(got[0], want[0], **TOL)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # same parameter order: weight_ih, weight_hh, bias_ih, bias_hh per layer and direction
    ref_names = [n for n, _ in ref.named_parameters()]
    ours_grads = dict(zip([n for n, _ in ours.named_parameters()], got[2], strict=False))
    for name, g in zip(ref_names, want[2], strict=False):
        layer, rev = int(name.split("_l")[1][0]), name.endswith("_reverse")
        key = name.split("_l")[0]
        cell = f"cells.{layer * 2 + rev}."
        ours_key = (
            cell
            + {
                "weight_ih": "weight_ih.weight",
                "weight_hh": "weight_hh.weight",
                "bias_ih": "bias_ih",
                "bias_hh": "bias_hh",
            }[key]
        )
        torch.testing.assert_close(ours_grads[ours_key], g, **TOL)
    n = len(list(ours.parameters()))
    for a, b in zip(got[2][n:], want[2][n:], strict=True):  # input and initial states
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("route", ["dense", "structured"])
def test_fused_loops_add_both_biases(kind, route, monkeypatch):
    """On the fused routes the LSTM and Elman loops add ``b_ih + b_hh`` as they read the input
    projections, which are made without a bias; the GRU loop keeps ``b_hh`` (inside its reset
    gate) and the projection ``b_ih``."""
    from kcprnn.rnn import layer, recurrent

    ours_cls, _, extra = KINDS[kind]
    model = ours_cls(
        INPUT, HIDDEN, format="dense", hidden_format="kcp", dtype=torch.float64, **extra
    )
    model.recurrence = route
    seen = {}
    projection, sequence = recurrent.input_projection, layer.fused_sequence

    def spy_projection(x, weight, bias=None):
        seen["projection"] = bias
        return projection(x, weight, bias)

    def spy_sequence(mode, gates_x, state, weights, bias=None, *args):
        seen["loop"] = bias
        return sequence(mode, gates_x, state, weights, bias, *args)

    monkeypatch.setattr(recurrent, "input_projection", spy_projection)
    monkeypatch.setattr(layer, "fused_sequence", spy_sequence)
    model(torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64))
    cell = model.cells[0]
    if kind == "gru":
        assert seen["projection"] is cell.bias_ih and seen["loop"] is cell.bias_hh
    else:
        assert seen["projection"] is None
        torch.testing.assert_close(seen["loop"], cell.bias_ih + cell.bias_hh, rtol=0, atol=0)


def _compressed(kind, hidden_format, **kw):
    ours_cls, _, extra = KINDS[kind]
    opts = dict(HIDDEN_FORMATS[hidden_format])
    fmt = "kcp" if hidden_format == "kcp3" else hidden_format
    return ours_cls(
        INPUT,
        HIDDEN,
        format="kcp",
        hidden_format=fmt,
        hidden_options=opts,
        dtype=torch.float64,
        **extra,
        **kw,
    )


@pytest.mark.parametrize("hidden_format", HIDDEN_FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zero_state", [True, False])
def test_compressed_routes_match_autograd_steps(kind, hidden_format, zero_state):
    model = _compressed(kind, hidden_format, num_layers=2, bidirectional=True, dropout=0.5)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64, requires_grad=True)
    hx = _random_hx(kind, 2, 2, BATCH)
    if zero_state:
        hx = tuple(torch.zeros_like(t) for t in hx) if isinstance(hx, tuple) else hx.zero_()
    hx = tuple(t.requires_grad_() for t in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    results = {}
    for route in ROUTES:
        model.recurrence = route
        torch.manual_seed(1)  # the same dropout masks on every route
        results[route] = _run(model, x, hx)
    want = results["steps"]
    for route in ("torch", "dense", "structured"):
        got = results[route]
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)
        for a, b in zip(got[2], want[2], strict=True):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_compressed_auto_matches_steps(kind):
    model = _compressed(kind, "kcp", num_layers=2, bidirectional=True)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    hx = _random_hx(kind, 2, 2, BATCH)
    hx = tuple(t.requires_grad_() for t in hx) if isinstance(hx, tuple) else hx.requires_grad_()
    results = {}
    for route in ("auto", "torch", "structured", "steps"):
        model.recurrence = route
        results[route] = _run(model, packed, hx)
    for route in ("auto", "torch", "structured"):
        torch.testing.assert_close(results[route][0], results["steps"][0], **TOL)
        for a, b in zip(results[route][2], results["steps"][2], strict=True):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 1},
        {"rank": [2, 3], "terms": 2},
        {"rank": 2, "terms": 2, "num_factors": 3},
        {"rank": 2, "num_factors": 1},
        {"in_modes": [[2, 4], [4, 5]], "out_modes": [[4, 4], [2, 3]], "terms": 3, "rank": 2},
    ],
)
def test_kron_apply_matches_dense_kcp(options):
    shape = (160, 96) if "in_modes" in options else (48, 96)
    w = kcprnn.formats.make_matrix("kcp", *shape, dtype=torch.float64, **options)
    mats, layout = kron_terms(w)
    dense = w.to_dense()
    for rows in (3, 500):  # few rows (broadcast products) and many (one product per term)
        x = torch.randn(rows, shape[0], dtype=torch.float64)
        torch.testing.assert_close(kron_apply(x, mats, layout), x @ dense.T, **TOL)
        y = torch.randn(rows, shape[1], dtype=torch.float64)
        mats_t = [a.transpose(1, 2) for a in mats]
        torch.testing.assert_close(kron_apply(y, mats_t, layout.transposed()), y @ dense, **TOL)
    assert kron_matmul_macs(layout, w.terms, 1) <= shape[0] * shape[1] * w.terms


@pytest.mark.parametrize(
    ("fmt", "shape", "options"),
    [
        ("kcp", (48, 96), {"rank": 2, "terms": 2, "num_factors": 3}),
        (
            "kcp",
            (160, 96),
            {"in_modes": [[2, 4], [4, 5]], "out_modes": [[4, 4], [2, 3]], "terms": 3},
        ),
        ("kcp", (512, 2048), {}),
        ("kcp", (40, 512), {"rank": 4}),
        ("kcp", (64, 256), {"num_factors": 4, "terms": 2}),
        ("kcp", (48, 96), {"rank": 2, "num_factors": 1, "terms": 2}),
        ("cp", (24, 40), {"rank": 3}),
    ],
)
@pytest.mark.parametrize("rows", [37, 1])  # one row through two factors: four matrix products
def test_kron_grads_match_autograd(fmt, shape, options, rows):
    """The factor gradients of one structured product over all rows, each factor alone and all
    together, against autograd through :func:`kron_apply`."""
    torch.manual_seed(0)
    w = kcprnn.formats.make_matrix(fmt, *shape, dtype=torch.float64, **options)
    found = kron_terms(w)
    assert found is not None
    mats = [a.detach().requires_grad_() for a in found[0]]
    x = torch.randn(rows, shape[0], dtype=torch.float64)
    grad = torch.randn(rows, shape[1], dtype=torch.float64)
    want = torch.autograd.grad(kron_apply(x, mats, found[1], gather=False), mats, grad)
    plain = [a.detach() for a in mats]
    for needs in (
        [True] * len(mats),
        *([k == n for k in range(len(mats))] for n in range(len(mats))),
    ):
        got = kron_grads(x, grad, plain, needs)
        # the same from the gradient of the whole matrix (factor-major rows and columns)
        from_dense = kron_grads_from_dense(grad.t() @ x, plain, needs)
        for g, d, w_, need in zip(got, from_dense, want, needs, strict=True):
            if need:
                torch.testing.assert_close(g, w_, **TOL)
                torch.testing.assert_close(d, w_, **TOL)
            else:
                assert g is None and d is None


@pytest.mark.parametrize(
    ("fmt", "shape", "options"),
    [
        ("tr", (512, 2048), {}),
        ("tt", (512, 2048), {}),
        ("tr", (30, 84), {"rank": 3}),
        ("tr", (60, 60), {"num_modes": 3, "rank": [2, 3, 4]}),
        ("tr", (24, 40), {"num_modes": 1}),
    ],
)
def test_ring_rebuild_matches_its_mac_count_and_the_trace(fmt, shape, options):
    """The ring/TT reconstruction that the torch route rebuilds ``W_hh`` with: its counted
    products equal ``reconstruction_macs`` (the planner's price), and it equals the trace of
    all cores merged in one chain, values and gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    w = kcprnn.formats.make_matrix(fmt, *shape, dtype=torch.float64, **options)
    with FlopCounterMode(display=False) as counter:
        dense = w.to_dense()
    assert counter.get_total_flops() == 2 * w.reconstruction_macs()
    cores = [c.detach().requires_grad_() for c in w.cores]
    chain = cores[0]
    for core in cores[1:]:
        c, o, q, _ = chain.shape
        chain = torch.einsum("coqr,rmns->comqns", chain, core)
        chain = chain.reshape(c, o * core.shape[1], q * core.shape[2], core.shape[3])
    want = chain.diagonal(dim1=0, dim2=3).sum(-1)
    torch.testing.assert_close(dense, want, **TOL)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(w.to_dense(), list(w.cores), g)
    want_grads = torch.autograd.grad(want, cores, g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_kron_terms_cp_needs_no_gathers_and_gradients_reach_factors():
    w = kcprnn.formats.make_matrix("cp", 24, 40, dtype=torch.float64, rank=3)
    mats, layout = kron_terms(w)
    assert layout.in_index is None and layout.out_index is None
    x = torch.randn(5, 24, dtype=torch.float64)
    kron_apply(x, mats, layout).square().sum().backward()
    got = [p.grad.clone() for p in w.parameters()]
    w.zero_grad()
    (x @ w.to_dense().T).square().sum().backward()
    for a, p in zip(got, w.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, **TOL)
    assert kron_terms(kcprnn.formats.make_matrix("tt", 24, 40)) is None


def test_kron_layout_orders_are_the_same_matrix():
    w = kcprnn.formats.make_matrix("kcp", 48, 96, dtype=torch.float64, rank=2, num_factors=3)
    x = torch.randn(4, 48, dtype=torch.float64)
    want = x @ w.to_dense().T
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        layout = kron_layout(w.in_splits, w.out_splits, order)
        mats, _ = kron_terms(w, layout)
        torch.testing.assert_close(kron_apply(x, mats, layout), want, **TOL)


def test_kron_layout_hash_is_kept_and_agrees_with_equality():
    """A layout hashes once (its index tuples have an entry per input or output); equal layouts
    hash alike, a transposed one differs, and the transposed layout's input gather is the
    inverse of the output gather (what a lone step's row gradients read)."""
    w = kcprnn.formats.make_matrix("kcp", 40, 2048, rank=2)
    layout = kron_layout(w.in_splits, w.out_splits, [1, 0])
    again = kron_layout(w.in_splits, w.out_splits, [1, 0])
    fields = (layout.order, layout.in_index, layout.out_index, layout.in_sizes, layout.out_sizes)
    assert hash(layout) == hash(fields) == hash(again) and layout == again
    assert layout.__dict__["_hash"] == hash(fields)  # kept after the first hash
    assert layout.transposed() != layout and {layout: 1}.get(again) == 1
    out_index = layout.indices(torch.device("cpu"))[1]
    assert out_index is not None
    inverse = layout.transposed().indices(torch.device("cpu"))[0]
    assert torch.equal(inverse, torch.argsort(out_index))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_fused_kron_sequence_gradcheck(mode):
    g = {"LSTM": 4, "GRU": 3, "RNN": 1}[mode]
    w = kcprnn.formats.make_matrix("kcp", 4, 4 * g, dtype=torch.float64, rank=2, terms=2)
    mats, layout = kron_terms(w)
    mats = [m.detach().requires_grad_() for m in mats]
    gx = torch.randn(3 * 2, 4 * g, dtype=torch.float64, requires_grad=True)
    state = tuple(
        torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        for _ in range(2 if mode == "LSTM" else 1)
    )
    bias = torch.randn(4 * g, dtype=torch.float64, requires_grad=True)

    def f(gx, bias, *rest):
        st, ms = rest[: len(state)], rest[len(state) :]
        out, final = fused_sequence(mode, gx, st, ms, bias, True, layout)
        return out, *final

    assert torch.autograd.gradcheck(f, (gx, bias, *state, *mats))


def test_rnn_sequence_relu_gradcheck():
    from kcprnn.rnn.fused import rnn_sequence

    args = (
        torch.randn(8, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(3, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda *a: rnn_sequence(*a, nonlinearity="relu"), args)
    with pytest.raises(ValueError, match="got 'gelu'"):
        rnn_sequence(*args, nonlinearity="gelu")


def test_recurrence_is_validated():
    model = kcprnn.GRU(INPUT, HIDDEN, format="dense")
    assert model.recurrence == "auto"
    with pytest.raises(ValueError, match=r"got recurrence='fast'"):
        model.recurrence = "fast"


def test_auto_routes_by_regime():
    speech = kcprnn.LSTM(40, 512, bidirectional=True, format="dense")
    cells = [speech.cell(0, d) for d in range(2)]
    # dense weights: the compiled dense loop in training, torch's kernel without gradients
    assert plan.choose_route("auto", cells, 4800, 300, True, True) == "dense"
    assert plan.choose_route("auto", cells, 4800, 300, True, False) == "torch"
    # the formats' small constructor ranks (KCP 1, TT 4), not the default budget's
    small = {"rank": 1, "hidden_options": {"rank": 1}}
    kcp = kcprnn.LSTM(40, 512, bidirectional=True, format="kcp", hidden_format="kcp", **small)
    cells = [kcp.cell(0, d) for d in range(2)]
    assert plan.choose_route("auto", cells, 4800, 300, True, True) == "structured"
    # sequences of different lengths: the fused loops cannot run them
    assert plan.choose_route("auto", cells, 4000, 300, False, True) == "torch"
    assert plan.choose_route("structured", cells, 4000, 300, False, True) == "torch"
    tt = kcprnn.LSTM(40, 512, format="tt", hidden_format="tt", rank=4, hidden_options={"rank": 4})
    assert plan.choose_route("structured", [tt.cell(0)], 4800, 300, True, True) == "dense"
    video = kcprnn.LSTM(57_600, 256, format="kcp", in_modes=[8, 20, 20, 18], rank=1)
    route = plan.choose_route("auto", [video.cell(0)], 96, 6, True, True)
    assert route in ("dense", "structured")  # never rebuilds the 57,600-wide input matrix


@pytest.mark.parametrize("cls", [kcprnn.LSTMCell, kcprnn.GRUCell, kcprnn.RNNCell])
def test_cell_dense_step_matches_structured_and_follows_updates(cls, monkeypatch):
    cell = cls(INPUT, HIDDEN, format="kcp", hidden_format="kcp", dtype=torch.float64)
    x = torch.randn(2, INPUT, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(cell, "_use_dense", lambda b: False)
        want = cell(x)
        monkeypatch.setattr(cell, "_use_dense", lambda b: True)
        got = cell(x)
        for a, b in zip(_states(got), _states(want), strict=True):
            torch.testing.assert_close(a, b, **TOL)
        for change in ("in place", "replaced"):  # the cache follows both
            if change == "in place":
                next(cell.weight_hh.parameters()).mul_(2)
            else:
                cell.weight_ih.factors[0][0] = nn.Parameter(cell.weight_ih.factors[0][0] * 3)
            monkeypatch.setattr(cell, "_use_dense", lambda b: False)
            want = cell(x)
            monkeypatch.setattr(cell, "_use_dense", lambda b: True)
            got = cell(x)
            for a, b in zip(_states(got), _states(want), strict=True):
                torch.testing.assert_close(a, b, **TOL)
    # with gradients: the dense step rebuilds, and gradients reach the factors
    monkeypatch.setattr(cell, "_use_dense", lambda b: True)
    h = _states(cell(x))[0]
    grads_dense = torch.autograd.grad(h.sum(), list(cell.parameters()))
    monkeypatch.setattr(cell, "_use_dense", lambda b: False)
    h = _states(cell(x))[0]
    grads = torch.autograd.grad(h.sum(), list(cell.parameters()))
    for a, b in zip(grads_dense, grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_cell_routes_by_size():
    dense = kcprnn.LSTMCell(40, 512, format="dense")
    # rank 1 (no default budget): the smallest KCP matrices
    speech = kcprnn.LSTMCell(
        40, 512, format="kcp", hidden_format="kcp", rank=1, hidden_options={"rank": 1}
    )
    video = kcprnn.LSTMCell(57_600, 256, format="kcp", in_modes=[8, 20, 20, 18], rank=1)
    with torch.no_grad():
        assert dense._use_dense(1)  # torch's fused cell on the parameters themselves
        assert not speech._use_dense(1)  # one row: reading a dense W costs more than the factors
        assert not video._use_dense(1)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("kcp", {"rank": [2, 3], "terms": 2}),
        ("kcp", {"rank": 2, "num_factors": 3}),
        ("kcp", {"rank": 2, "num_factors": 1}),
        ("cp", {"rank": 3}),
        ("tt", {"rank": 2}),
    ],
)
def test_rebuild_matches_to_dense_with_gradients(fmt, options):
    w = kcprnn.formats.make_matrix(fmt, 48, 96, dtype=torch.float64, **options)
    probe = torch.randn(96, 48, dtype=torch.float64)
    got = rebuild(w)
    torch.testing.assert_close(got, w.to_dense(), **TOL)
    grads = torch.autograd.grad((got * probe).sum(), list(w.parameters()))
    want = torch.autograd.grad((w.to_dense() * probe).sum(), list(w.parameters()))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(("fmt", "rank"), [("tt", 4), ("kcp", 1), ("ht", 4)])
def test_wide_inputs_keep_the_structured_input_product(fmt, rank):
    # At the video size (57,600 inputs) every format's factor GEMMs have long rows: rebuilding
    # W_ih dense (1024 x 57,600) per call would cost far more than the product itself (at the
    # formats' small constructor ranks; the default budget's are far larger).
    # Priced with MKL's products (the built-in model on Intel CPUs; where oneDNN runs them at
    # half MKL's time, TT's and HT's forward take the rebuilt product, measured 1.6x and 1.1x
    # faster on such a CPU).
    torch.manual_seed(0)
    cell = kcprnn.LSTMCell(57600, 64, format=fmt, rank=rank)
    mkl = CostModel(onednn_gemm=1.0)
    for training in (True, False):
        structured, dense = plan._input_costs(cell, 96, training, mkl)
        assert structured < dense


def test_narrow_inputs_rebuild_a_kcp_input_matrix():
    # At 40 inputs KCP's factor GEMMs have inner dimensions of a few elements; one dense
    # product over 4,800 rows is cheaper than the structured one.
    torch.manual_seed(0)
    cell = kcprnn.LSTMCell(40, 512, format="kcp", rank=1)
    assert plan.input_is_dense(cell, rows=300 * 16, training=True)
