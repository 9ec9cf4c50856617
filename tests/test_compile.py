"""``torch.compile`` with the default backend (inductor) matches eager, forward and gradients,
for every format in FactorizedLinear, LSTM (bidirectional, 2 layers), GRU and RNN.

Eager is the reference (its own tests check it against ``torch.nn`` and dense reconstruction).
Float32 tolerances: outputs and gradients within ``rtol=1e-4, atol=1e-5`` (inductor reorders
the additions around the opaque products). Each format compiles one module holding the four
kinds, in one graph (``fullgraph=True``) for padded input; a packed sequence compiles with a
graph break (its ``batch_sizes`` are read as Python ints).
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import kcprnn
from kcprnn import _compile, _compile_kcp, _compile_layer, _compile_lstm

# inductor's first use imports modules that call torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

FORMAT_OPTIONS = {
    "dense": {},
    "kcp": {"rank": [2, 3], "terms": 2, "num_factors": 2},
    "cp": {"rank": 3},
    "tucker": {"rank": 2},
    "tt": {"rank": 3},
    "tr": {"rank": 2},
    "bt": {"rank": 2, "blocks": 2},
    "ht": {"rank": 2},
}
TOL = {"rtol": 1e-4, "atol": 1e-5}
INPUT, HIDDEN, OUT = 24, 8, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Four(nn.Module):
    """FactorizedLinear, a bidirectional LSTM (2 layers for KCP), a GRU and a ReLU RNN on one
    input, in one format."""

    def __init__(self, format: str) -> None:
        super().__init__()
        opts = FORMAT_OPTIONS[format]
        self.linear = kcprnn.FactorizedLinear(INPUT, OUT, format=format, **opts)
        layers = 2 if format == "kcp" else 1
        self.lstm = kcprnn.LSTM(
            INPUT, HIDDEN, layers, batch_first=True, bidirectional=True, format=format, **opts
        )
        self.gru = kcprnn.GRU(INPUT, HIDDEN, format=format, **opts)
        self.rnn = kcprnn.RNN(INPUT, HIDDEN, nonlinearity="relu", format=format, **opts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.linear(x)]
        y, (h, c) = self.lstm(x)
        out += [y, h, c]
        y, h = self.gru(x.transpose(0, 1))  # time-major
        out += [y, h]
        y, h = self.rnn(x.transpose(0, 1))
        return [*out, y, h]


class Every(nn.Module):
    """:class:`Four` in every format (one compile for all: inductor's fixed cost per graph
    dominates at these sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({f: Four(f) for f in sorted(FORMAT_OPTIONS)})

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {f: part(x) for f, part in self.parts.items()}


def outputs_and_grads(model: nn.Module, fn, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    outs = fn(x)
    loss = sum(
        (o * torch.linspace(-1, 1, o.shape[-1])).sum() for group in outs.values() for o in group
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {f: [o.detach() for o in group] for f, group in outs.items()}, grads


def test_compiled_matches_eager_in_every_format():
    model = Every()
    x = torch.randn(3, 5, INPUT)
    ref_out, ref_grads = outputs_and_grads(model, model, x)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = outputs_and_grads(model, compiled, x)
    for f in FORMAT_OPTIONS:
        for k, (a, b) in enumerate(zip(out[f], ref_out[f], strict=True)):
            torch.testing.assert_close(a, b, **TOL, msg=f"{f} output {k}")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("format", ["kcp", "tt"])
def test_compiled_inference_matches_eager(format):
    """Under ``no_grad`` the operators run the inference plans (another graph)."""
    model = Four(format)
    x = torch.randn(3, 5, INPUT)
    _compile._KEPT.clear()
    with torch.no_grad():
        ref = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    for k, (a, b) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"{format} output {k}")
    assert not _compile._KEPT  # nothing kept without gradients


def _traced_targets(model: nn.Module, x: torch.Tensor) -> list[str]:
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm,) = graphs
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def walking_lstm(**options) -> kcprnn.LSTM:
    """A KCP LSTM whose every layer eager runs as the sequential walk into the fused dense loop
    when training (a wide input, the dense route), as the video layer is: compiled direction
    by direction (``kcprnn::layer_kcp``) rather than as one ``kcprnn::rnn``."""
    model = kcprnn.LSTM(WIDE, HIDDEN, batch_first=True, format="kcp", rank=2, **options)
    model.recurrence = "dense"
    return model


WIDE = 256


def test_products_are_opaque_nodes():
    """A recurrent module is one kcprnn::rnn node (its eager forward, routes chosen at run
    time) in every format, unless eager walks a KCP input product into the fused dense loop in
    every layer: then each direction is one kcprnn::layer_kcp; a FactorizedLinear is one
    kcprnn::product; none of the KCP planner's small operators."""
    for format in ("kcp", "tt", "dense"):
        model = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, bidirectional=True, format=format)
        targets = _traced_targets(model, torch.randn(2, 3, INPUT))
        assert targets.count("kcprnn.rnn.default") == 1, format
        assert not any(t.startswith(("kcprnn.layer", "kcprnn.product")) for t in targets)
        assert not any("mkldnn" in t for t in targets)
    targets = _traced_targets(walking_lstm(bidirectional=True), torch.randn(2, 3, WIDE))
    assert targets.count("kcprnn.layer_kcp.default") == 2  # one per direction
    assert not any(t.startswith(("kcprnn.rnn", "kcprnn.product")) for t in targets)
    gru = kcprnn.GRU(INPUT, HIDDEN, format="dense")
    assert _traced_targets(gru, torch.randn(3, 2, INPUT)).count("kcprnn.rnn.default") == 1

    linear = kcprnn.FactorizedLinear(INPUT, OUT, format="tt")
    assert _traced_targets(linear, torch.randn(4, INPUT)).count("kcprnn.product.default") == 1


@pytest.mark.parametrize("walk", [True, False])
def test_training_graphs_copy_no_input_sized_tensor(walk):
    """The compiled training step (forward and backward graphs, as inductor receives them)
    makes no tensor as large as the input: the input reaches the operator (a layer's or the
    module's) as it is or as a view, is saved for the backward so, and no gradient is formed
    for it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def compiler(name):
        def compile_graph(gm, inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    model = walking_lstm() if walk else kcprnn.LSTM(WIDE, 8, batch_first=True, format="kcp")
    x = torch.randn(4, 5, WIDE)  # 5,120 elements, more than any state or gate tensor here
    out, (h, c) = torch.compile(model, backend=backend, fullgraph=True)(x)
    (out.sum() + h.sum() + c.sum()).backward()
    assert set(graphs) == {"forward", "backward"}
    views = {"view", "reshape", "_unsafe_view", "alias", "permute", "transpose", "t", "select"}
    for name, gm in graphs.items():
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            if node.op != "call_function":
                continue
            made = val if isinstance(val, (list, tuple)) else [val]  # an operator's results
            for t in made:
                if isinstance(t, torch.Tensor) and t.numel() >= x.numel():
                    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
                    assert op in views, f"{name} graph: {node.format_node()} makes {t.shape}"
    name = "kcprnn.layer" if walk else "kcprnn.rnn"
    (node,) = [n for n in graphs["forward"].graph.nodes if name in str(n.target)]
    rows = (20, WIDE) if walk else x.shape
    assert node.args[0].meta["val"].shape == rows  # the input rows (a view), or the input


# dynamo reads .grad of the graph's intermediate tensors when it resumes after the break
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_packed_sequence_compiles_with_a_graph_break():
    model = kcprnn.LSTM(INPUT, HIDDEN, format="kcp", **FORMAT_OPTIONS["kcp"])
    x = torch.randn(4, 3, INPUT)
    lengths = torch.tensor([4, 3, 1])
    packed = pack_padded_sequence(x, lengths)

    def run(m):
        model.zero_grad(set_to_none=True)
        out, (h, c) = m(packed)
        (out.data.square().sum() + h.sum() + c.sum()).backward()
        return (
            out.data.detach(),
            h.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )

    ref = run(model)
    got = run(torch.compile(model))
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    for name, g in got[2].items():
        torch.testing.assert_close(g, ref[2][name], **TOL, msg=name)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
def test_compiled_cell_and_projection_match_eager():
    """An LSTM with a projection steps through time (no fused loop); a cell is one step."""
    model = kcprnn.LSTM(INPUT, HIDDEN, proj_size=3, format="tt", rank=2)
    cell = kcprnn.GRUCell(INPUT, HIDDEN, format="kcp")
    x = torch.randn(4, 2, INPUT)
    for module, arg in ((model, x), (cell, x[0])):
        torch._dynamo.reset()
        ref = module(arg)
        got = torch.compile(module, fullgraph=True)(arg)
        leaves = torch.utils._pytree.tree_leaves
        for a, b in zip(leaves(got), leaves(ref), strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_compiled_cell_ignores_what_eager_steps_keep():
    """Eager steps without gradients remember their last dense step; the compiled cell neither
    reads nor guards on it, so eager calls in between do not recompile it."""
    cell = kcprnn.LSTMCell(INPUT, HIDDEN, format="tt", hidden_format="tt", rank=2)
    x = torch.randn(3, INPUT)
    hx = (torch.randn(3, HIDDEN), torch.randn(3, HIDDEN))
    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        ref = cell(x, hx)
        assert cell._repeat is not None
        got = compiled(x, hx)
        cell._repeat = None
        again = compiled(x, hx)
        cell(x, hx)
        compiled(x, hx)
    for a, b, c in zip(got, again, ref, strict=True):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)


@pytest.mark.parametrize("kept", [True, False])
def test_product_operator_gradients_float64(kept):
    """The custom operator's backward (the kept autograd graph of its forward, or where none
    is kept a recomputation) against eager autograd of the same product, in float64, for the
    input, bias and factors; and on parameters that are not the module's own (swapped in)."""
    matrix = kcprnn.formats.FORMATS["kcp"](6, 4, rank=2, terms=2, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    params = list(matrix.parameters())
    grad = torch.randn(3, 4, dtype=torch.float64)
    _compile._KEPT.clear()

    def product(x, bias, params):
        out = torch.ops.kcprnn.product(x, bias, params, _compile.module_key(matrix), 4, True, True)
        if not kept:
            _compile._KEPT.clear()
        return out[0]

    out = product(x, bias, params)
    got = torch.autograd.grad(out, [x, bias, *params], grad)
    ref_out = matrix(x, bias)
    ref = torch.autograd.grad(ref_out, [x, bias, *params], grad)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)

    others = [torch.randn_like(p, requires_grad=True) for p in params]
    out = product(x, bias, others)
    got = torch.autograd.grad(out, others, grad)
    with torch.no_grad():
        for p, q in zip(params, others, strict=True):
            p.copy_(q)
    ref = torch.autograd.grad(matrix(x, bias), params, grad)
    torch.testing.assert_close(out, matrix(x, bias))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert not _compile._KEPT  # every kept graph was taken by its backward


def test_recurrence_operator_gradcheck_float64():
    t, b, h = 3, 2, 3
    gates = torch.randn(t * b, 4 * h, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4 * h, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4 * h, dtype=torch.float64, requires_grad=True)

    def fn(gates, h0, c0, weight, bias):
        out, (hn, cn) = _compile.compiled_recurrence(
            "LSTM", gates, (h0, c0), weight, bias, True, "tanh"
        )
        return out, hn, cn

    assert torch.autograd.gradcheck(fn, (gates, h0, c0, weight, bias))
    _compile._KEPT.clear()  # gradcheck's forwards without a backward
    ref = kcprnn.rnn.fused_sequence("LSTM", gates, (h0, c0), [weight], bias, True)
    torch.testing.assert_close(fn(gates, h0, c0, weight, bias)[0], ref[0])


def test_dead_module_key_is_a_clear_error():
    matrix = kcprnn.formats.FORMATS["tt"](6, 4)
    key = _compile.module_key(matrix)
    del matrix
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match=f"key={key}"):
        torch.ops.kcprnn.product(torch.randn(1, 6), None, [], key, 4, False, False)


@pytest.mark.parametrize(
    "options",
    [
        {"rank": [2, 3], "terms": 2, "num_factors": 2},
        {"rank": 2, "terms": 3, "num_factors": 3},
        {"rank": 2, "num_factors": 1},
        {"in_modes": [[2, 3], [1, 4]], "out_modes": [[3, 1], [2, 2]], "rank": 2},
    ],
)
def test_exported_kcp_product_equals_the_format(options):
    """The plain-operator KCP product that torch.export traces, in float64, against the
    format's own product (which its tests check against the dense reconstruction)."""
    matrix = kcprnn.formats.FORMATS["kcp"](24, 12, dtype=torch.float64, **options)
    x = torch.randn(5, 24, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(_compile.exported_product(matrix, x, bias), matrix(x, bias))


UCF_BLOCKED = {"in_modes": [[8, 1], [20, 1], [1, 20], [1, 18]]}
UCF_BLOCKED["out_modes"] = [[8, 2], [4, 1], [4, 1], [4, 1]]


def _kcp_cell(case: str, cell_type: str):
    """A float64 cell whose KCP W_ih runs the sequential walk of ``case``: ``small`` (two
    factors, a swap), ``blocked`` (the paper's blocked UCF11 split: its last factor as its own
    CP product, cut inside) or ``chunked`` (the rows in chunks of two)."""
    import dataclasses

    from kcprnn._cpu.cost import default_cost_model

    cls = {"LSTM": kcprnn.LSTMCell, "GRU": kcprnn.GRUCell, "RNN": kcprnn.RNNCell}[cell_type]
    if case == "blocked":
        return cls(57600, 256, format="kcp", rank=2, dtype=torch.float64, **UCF_BLOCKED)
    options: dict = {"hidden_format": "kcp"}
    if case == "chunked":
        model = dataclasses.replace(default_cost_model(), gather_chunk=50)
        options = {"algorithm": "sequential", "cost_model": model}
        gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[cell_type]
        options |= {"in_modes": [[2, 3], [2, 2]], "out_modes": [[gates, 3], [1, 1]]}
        return cls(24, 3, format="kcp", rank=2, dtype=torch.float64, **options)
    return cls(6, 3, format="kcp", rank=2, dtype=torch.float64, **options)


@pytest.mark.parametrize(
    ("cell_type", "batch_major", "reverse", "kept", "case"),
    [
        ("LSTM", True, False, True, "blocked"),
        ("LSTM", False, True, False, "small"),
        ("LSTM", True, True, True, "chunked"),
        ("LSTM", True, False, False, "unfolded"),
        ("LSTM", False, False, True, "unfolded"),
        ("GRU", True, True, True, "chunked"),
        ("GRU", False, False, False, "small"),
        ("RNN", True, False, True, "small"),
        ("RNN", False, True, False, "chunked"),
    ],
)
def test_layer_kcp_operator_gradients_float64(cell_type, batch_major, reverse, kept, case):
    """``kcprnn::layer_kcp`` (a KCP walk's matrices from the graph, the walk's and the fused
    recurrence's own forward and backward) against the same layer in eager autograd, in
    float64: outputs and the gradients of the input, the folded input bias, the factors, the
    initial state and both recurrent weights; its backward from the kept state and, where
    none is kept, from a recomputation."""
    from kcprnn.formats.kcp.walk import chunk_rows

    torch.manual_seed(0)
    cell = _kcp_cell(case, cell_type)
    i = cell.weight_ih.in_features
    b, t = 2, 3
    shape = (b, t, i) if batch_major else (t, b, i)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    spec = _compile_kcp._kcp_spec(cell.weight_ih, b * t, True, False)
    assert spec  # the fast path runs
    walk = _compile_kcp._kcp_walk(cell.weight_ih, spec)
    assert walk.inner == (case == "blocked")
    assert (chunk_rows(b * t, i, walk.steps, walk.model) < b * t) == (case == "chunked")
    sizes = cell.state_sizes() if hasattr(cell, "state_sizes") else (cell.hidden_size,)
    state = tuple(torch.randn(b, s, dtype=torch.float64, requires_grad=True) for s in sizes)
    fold = cell_type != "GRU" and case != "unfolded"  # "unfolded": b_hh by the recurrence
    bias = cell.bias_ih + cell.bias_hh if fold else cell.bias_ih
    wrt = [x, *state, *cell.parameters()]
    _compile._KEPT.clear()

    out, final = _compile_layer.compiled_layer(cell, x, bias, state, reverse, batch_major, fold)
    if not kept:
        _compile._KEPT.clear()
    grads_out = [torch.randn_like(out), *(torch.randn_like(f) for f in final)]
    got = torch.autograd.grad([out, *final], wrt, grads_out, allow_unused=True)

    gates = cell.weight_ih(x.reshape(-1, i), bias)  # (n, g)
    if batch_major:
        gates = gates.view(b, t, -1).transpose(0, 1).reshape(b * t, -1)
    ref_out, ref_final = kcprnn.rnn.fused_sequence(
        cell_type,
        gates,
        state,
        [kcprnn.rnn.kron.rebuild(cell.weight_hh)],
        None if fold else cell.bias_hh,
        reverse,
        None,
        getattr(cell, "nonlinearity", "tanh"),
    )
    ref = torch.autograd.grad([ref_out, *ref_final], wrt, grads_out, allow_unused=True)
    torch.testing.assert_close(out, ref_out)
    for a, r in zip(final, ref_final, strict=True):
        torch.testing.assert_close(a, r)
    for a, r, tensor in zip(got, ref, wrt, strict=True):
        assert r is not None, tuple(tensor.shape)
        torch.testing.assert_close(a, r)
    assert not _compile._KEPT  # the kept state was taken by its backward


@pytest.mark.parametrize(
    ("case", "reverse"), [("small", False), ("small", True), ("blocked", True)]
)
def test_layer_kcp_operator_from_a_zero_state_float64(case, reverse):
    """A zero initial state made by the module (``zero_state``: the LSTM loop takes it on trust,
    skips the first product and computes W_hh's gradient without the first step's rows) gives
    the eager layer's outputs and gradients, the initial state's included."""
    torch.manual_seed(1)
    cell = _kcp_cell(case, "LSTM")
    i = cell.weight_ih.in_features
    b, t = 2, 3
    x = torch.randn(b, t, i, dtype=torch.float64, requires_grad=True)
    h = cell.hidden_size
    state = tuple(torch.zeros(b, h, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = cell.bias_ih + cell.bias_hh
    wrt = [x, *state, *cell.parameters()]
    out, final = _compile_layer.compiled_layer(cell, x, bias, state, reverse, True, True, True)
    grads_out = [torch.randn_like(out), *(torch.randn_like(f) for f in final)]
    got = torch.autograd.grad([out, *final], wrt, grads_out)
    gates = cell.weight_ih(x.reshape(-1, i), bias).view(b, t, -1).transpose(0, 1)
    ref_out, ref_final = kcprnn.rnn.fused_sequence(
        "LSTM", gates.reshape(b * t, -1), state, [kcprnn.rnn.kron.rebuild(cell.weight_hh)],
        None, reverse, None,
    )  # fmt: skip
    ref = torch.autograd.grad([ref_out, *ref_final], wrt, grads_out)
    torch.testing.assert_close(out, ref_out)
    for a, r in zip([*final, *got], [*ref_final, *ref], strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("case", ["walk", "one direction", "two directions"])
def test_compiled_kcp_output_changed_in_place_keeps_gradients(case):
    """The state kept for the backward is the operator's own: changing the compiled layer's
    output in place before the backward leaves the gradients as they were (the walk's
    operator; the module's, whose one-direction output the kept graph saves and whose
    two-direction output it does not)."""
    torch.manual_seed(0)
    if case == "walk":
        model = walking_lstm()
    else:
        two = case == "two directions"
        model = kcprnn.LSTM(WIDE, HIDDEN, batch_first=True, bidirectional=two, format="kcp")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, WIDE)

    def grads(change: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        y, (h, c) = compiled(x)
        if change:  # the same memory, unseen by autograd
            y.detach().mul_(2)
            h.detach().add_(1)
            c.detach().add_(1)
        (y.sum() + h.sum() + c.sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not _compile._KEPT


def test_compiled_kcp_walk_matches_eager():
    """A bidirectional KCP LSTM and a GRU that eager trains by the walk (P = 1: every
    direction a kcprnn::layer_kcp, its walk's matrices built by inductor), compiled in one
    graph, against eager: outputs and every parameter's gradient; inference (one
    kcprnn::rnn per module) too."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = walking_lstm(bidirectional=True)
            self.gru = kcprnn.GRU(WIDE, HIDDEN, format="kcp", rank=2)
            self.gru.recurrence = "dense"

        def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
            y, (h, c) = self.lstm(x)
            z, g = self.gru(x.transpose(0, 1))
            return {"kcp": [y, h, c, z, g]}

    torch.manual_seed(0)
    model = Two()
    x = torch.randn(3, 5, WIDE)
    ref_out, ref_grads = outputs_and_grads(model, model, x)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = outputs_and_grads(model, compiled, x)
    for k, (a, b) in enumerate(zip(out["kcp"], ref_out["kcp"], strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"output {k}")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=name)
    assert not _compile._KEPT
    with torch.no_grad():  # the inference plan's walk, nothing kept
        ref = model(x)["kcp"]
        got = compiled(x)["kcp"]
    for k, (a, b) in enumerate(zip(got, ref, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"inference output {k}")
    assert not _compile._KEPT


def test_compiled_kcp_inference_follows_changed_factors():
    """Compiled inference keeps the walk's matrices between calls: an in-place change of the
    factors (an optimizer step) and a ``load_state_dict`` are both seen by the next call (two
    modes per Kronecker factor: the matrices are products of the factors, not views of them;
    the sequential walk, which inference would not choose at this size)."""
    torch.manual_seed(0)
    modes = {"in_modes": [[2, 3], [2, 2]], "out_modes": [[4, 2], [2, 2]], "algorithm": "sequential"}
    model = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", rank=2, **modes)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 4, INPUT)
    with torch.no_grad():
        before = compiled(x)[0]
        torch.testing.assert_close(before, model(x)[0], **TOL)
        next(model.cells[0].weight_ih.parameters()).mul_(1.5)
        changed = compiled(x)[0]
        torch.testing.assert_close(changed, model(x)[0], **TOL)
        assert not torch.allclose(changed, before)
        other = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", rank=2, **modes)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(compiled(x)[0], other(x)[0], **TOL)


def test_dynamic_batch_matches_eager():
    """``dynamic=True``: with a symbolic number of rows the KCP walk is not planned while
    tracing (the module's ``kcprnn::rnn`` runs); two batch sizes, training and inference."""
    torch.manual_seed(0)
    model = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", rank=2)
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for b in (3, 5):
        x = torch.randn(b, 4, INPUT)
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            out = fn(x)[0]
            out.sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            with torch.no_grad():
                infer = fn(x)[0]
            if fn is model:
                ref = (out.detach(), grads, infer)
        torch.testing.assert_close(out.detach(), ref[0], **TOL)
        torch.testing.assert_close(infer, ref[2], **TOL)
        for a, r in zip(grads, ref[1], strict=True):
            torch.testing.assert_close(a, r, **TOL)


@pytest.mark.parametrize("batch_major", [False, True])
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize(
    ("reverse", "zero_state", "bias"), [(False, True, False), (True, False, True)]
)
def test_layer_kcp_lstm_loops_equal_the_fused_recurrence(
    reverse, zero_state, bias, native, batch_major, monkeypatch
):
    """The LSTM recurrence inside ``kcprnn::layer_kcp`` (no ``autograd.Function``) gives
    exactly the fused recurrence's outputs and gradients in float32, both on torch ops (the
    same operations in the same order) and on the compiled steps, forward and reverse, from a
    zero and a nonzero initial state, with and without ``b_hh``, from time-major rows and from
    batch-major ones (a batch-first input's: the compiled steps read them in place)."""
    if not native:
        monkeypatch.setattr(kcprnn.rnn._fused_base, "_native_ok", lambda *tensors: False)
    elif not kcprnn._cpu.native.available():
        pytest.skip("the compiled kernel cannot be built")
    torch.manual_seed(0)
    t, b, h = 4, 3, 8
    gates = torch.randn(t * b, 4 * h)
    state = [torch.randn(b, h) * (0.0 if zero_state else 1.0) for _ in range(2)]
    weight = torch.randn(4 * h, h) * 0.3
    bias_hh = torch.randn(4 * h) if bias else None
    grads = [torch.randn(t * b, h), torch.randn(b, h), torch.randn(b, h)]

    # the fused recurrence takes time-major rows; the run gets them batch-major where asked
    rows = gates.view(t, b, -1).transpose(0, 1).reshape(t * b, -1) if batch_major else gates
    leaves = [x.clone().requires_grad_(True) for x in (gates, *state, weight)]
    wrt = leaves + ([bias_hh.clone().requires_grad_(True)] if bias else [])
    ref_out, ref_final = kcprnn.rnn.fused_sequence(
        "LSTM", leaves[0], leaves[1:3], [leaves[3]], wrt[4] if bias else None, reverse, None
    )
    ref = torch.autograd.grad([ref_out, *ref_final], wrt, grads)

    run = _compile_lstm._LSTMRun(rows.clone(), *state, bias_hh, weight, reverse, batch_major, False)
    assert run.native == native
    needs = [True, True, True, True, True, bias, True]
    dgates, dh0, dc0, dbias, dweight, summed = run.backward(*grads, needs, row_sum=True)
    if batch_major:  # in the rows' order
        dgates = dgates.view(b, t, -1).transpose(0, 1).reshape(t * b, -1)
    assert torch.equal(run.hs.view(t * b, h), ref_out)
    assert torch.equal(run.h_n, ref_final[0]) and torch.equal(run.c_n, ref_final[1])
    got = [dgates, dh0, dc0, dweight] + ([dbias] if bias else [])
    for k, (a, r) in enumerate(zip(got, ref, strict=True)):
        if k == 3 and zero_state:  # W_hh's gradient without the zero first step's rows: the
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)  # GEMM sums fewer terms
        else:
            assert torch.equal(a, r), k
    torch.testing.assert_close(summed, ref[0].sum(0), rtol=1e-5, atol=1e-6)  # the rows' sum


@pytest.mark.parametrize(
    ("mode", "batch_first", "given", "kept"),
    [
        ("LSTM", True, True, True),
        ("LSTM", False, False, False),
        ("GRU", False, True, False),
        ("RNN", True, False, True),
    ],
)
def test_module_operator_gradients_float64(mode, batch_first, given, kept):
    """``kcprnn::rnn`` (the whole module's eager forward in one operator) against the module in
    eager autograd, in float64: a two-layer bidirectional module with dropout between the
    layers (the same random state), KCP and TT weights, one parameter frozen; outputs and the
    gradients of the input, the initial state and the parameters, from the kept graph and,
    where none is kept, from a recomputation that replays the dropout masks."""
    from kcprnn import _compile_module

    torch.manual_seed(0)
    cls = getattr(kcprnn, mode)
    model = cls(
        6, 3, 2, batch_first=batch_first, dropout=0.5, bidirectional=True, format="kcp",
        rank=2, hidden_format="tt", dtype=torch.float64,
    )  # fmt: skip
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    sizes = (3, 3) if mode == "LSTM" else (3,)
    batch = 2 if batch_first else 4
    hx = tuple(
        torch.randn(4, batch, s, dtype=torch.float64, requires_grad=True) for s in sizes
    )  # (layers * directions, b, s)
    hx = hx if given else None
    wrt = [x, *(hx or ()), *(p for p in model.parameters() if p.requires_grad)]
    _compile._KEPT.clear()

    torch.manual_seed(1)
    out, state = _compile_module.compiled_module(model, x, hx)
    if not kept:
        _compile._KEPT.clear()
        torch.rand(5)  # the generator moves on; the recomputation replays the forward's state
    grads_out = [torch.randn_like(out), *(torch.randn_like(s) for s in state)]
    got = torch.autograd.grad([out, *state], wrt, grads_out)

    torch.manual_seed(1)
    ref_out, ref_state = model(x, hx if mode == "LSTM" or hx is None else hx[0])
    ref_state = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    ref = torch.autograd.grad([ref_out, *ref_state], wrt, grads_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, r in zip(state, ref_state, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r)
    assert frozen.grad is None
    assert not _compile._KEPT  # the kept graph was taken by its backward


def test_compiled_module_under_functional_call_uses_the_given_parameters():
    """``torch.func.functional_call`` on a compiled module: without gradients the operator
    takes no parameters and reads those put in the module's place; with them, the gradients
    reach the given tensors. Against the module that owns them, eager."""
    torch.manual_seed(0)
    model = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", hidden_format="tt", rank=2)
    other = kcprnn.LSTM(INPUT, HIDDEN, batch_first=True, format="kcp", hidden_format="tt", rank=2)
    params = dict(other.named_parameters())
    x = torch.randn(3, 5, INPUT)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.func.functional_call(compiled, params, (x,))[0], other(x)[0], **TOL
        )
        torch.testing.assert_close(compiled(x)[0], model(x)[0], **TOL)  # its own again
    got = torch.func.functional_call(compiled, params, (x,))[0]
    grads = torch.autograd.grad(got.sum(), list(params.values()))
    ref = torch.autograd.grad(other(x)[0].sum(), list(other.parameters()))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(("mode", "kept"), [("LSTM", True), ("GRU", False), ("RNN", True)])
def test_cell_operator_gradients_float64(mode, kept):
    """A factorized cell's step as ``kcprnn::rnn`` (its eager step in one operator) against the
    eager step in float64: the new state and the gradients of the input, the state and the
    parameters, from the kept graph and from a recomputation; unbatched too."""
    from kcprnn import _compile_module

    torch.manual_seed(0)
    cls = getattr(kcprnn, mode + "Cell")
    cell = cls(6, 3, format="kcp", rank=2, hidden_format="tt", dtype=torch.float64)
    for batch in ((2,), ()):
        x = torch.randn(*batch, 6, dtype=torch.float64, requires_grad=True)
        sizes = (3, 3) if mode == "LSTM" else (3,)
        hx = tuple(torch.randn(*batch, s, dtype=torch.float64, requires_grad=True) for s in sizes)
        wrt = [x, *hx, *cell.parameters()]
        _compile._KEPT.clear()
        empty, state = _compile_module.compiled_module(cell, x, hx)
        assert empty.numel() == 0
        if not kept:
            _compile._KEPT.clear()
        grads_out = [torch.randn_like(s) for s in state]
        got = torch.autograd.grad(state, wrt, grads_out)
        ref_state = cell(x, hx if mode == "LSTM" else hx[0])
        ref_state = ref_state if isinstance(ref_state, tuple) else (ref_state,)
        ref = torch.autograd.grad(ref_state, wrt, grads_out)
        for a, r in zip(state, ref_state, strict=True):
            torch.testing.assert_close(a, r, rtol=0, atol=0)
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r)
        assert not _compile._KEPT


@pytest.mark.parametrize("batch_first", [False, True])
def test_compiled_unbatched_input_equals_eager(batch_first):
    """An unbatched ``(t, i)`` input, with and without an initial state: the compiled
    module's outputs have eager's shapes and values."""
    torch.manual_seed(0)
    for cls in (kcprnn.LSTM, kcprnn.GRU):
        model = cls(
            INPUT, HIDDEN, 2, batch_first=batch_first, bidirectional=True, format="kcp",
            hidden_format="tt", rank=2,
        )  # fmt: skip
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn(5, INPUT)
        h = torch.randn(4, HIDDEN)
        state = (h, torch.randn(4, HIDDEN)) if cls is kcprnn.LSTM else h
        for args in ((x,), (x, state)):
            leaves = torch.utils._pytree.tree_leaves
            for a, b in zip(leaves(compiled(*args)), leaves(model(*args)), strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0)
