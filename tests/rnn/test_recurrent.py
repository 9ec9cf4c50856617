"""kcprnn.LSTM/GRU/RNN against torch.nn: outputs, final states and gradients with dense weights
copied from torch; every registered format against torch.nn running its reconstructed weights."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import kcprnn
from kcprnn import FORMATS

# torch.nn.LSTM (the reference) warns that its float32 projection path bypasses oneDNN.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

# (our class, torch class, extra constructor kwargs)
KINDS = {
    "lstm": (kcprnn.LSTM, nn.LSTM, {}),
    "lstm_proj": (kcprnn.LSTM, nn.LSTM, {"proj_size": 3}),
    "gru": (kcprnn.GRU, nn.GRU, {}),
    "rnn_tanh": (kcprnn.RNN, nn.RNN, {}),
    "rnn_relu": (kcprnn.RNN, nn.RNN, {"nonlinearity": "relu"}),
}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}
# Options that exercise each format beyond its simplest case (as in tests/formats).
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
INPUT, HIDDEN = 6, 4


def pair(kind, dtype=torch.float64, **kw):
    ours_cls, torch_cls, extra = KINDS[kind]
    ref = torch_cls(INPUT, HIDDEN, **extra, **kw, dtype=dtype)
    return ours_cls.from_torch(ref, format="dense"), ref


def states(hx):
    return hx if isinstance(hx, tuple) else (hx,)


def random_hx(ref, batch, dtype):
    k = ref.num_layers * (2 if ref.bidirectional else 1)
    out = getattr(ref, "proj_size", 0) or ref.hidden_size
    shape = (k, batch, out) if batch else (k, out)
    h = torch.randn(*shape, dtype=dtype)
    if isinstance(ref, nn.LSTM):
        cshape = shape[:-1] + (ref.hidden_size,)
        return h, torch.randn(*cshape, dtype=dtype)
    return h


def assert_same(a, b, dtype):
    ya, ha = a
    yb, hb = b
    if isinstance(ya, nn.utils.rnn.PackedSequence):
        torch.testing.assert_close(ya.batch_sizes, yb.batch_sizes)
        ya, yb = ya.data, yb.data
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    for sa, sb in zip(states(ha), states(hb), strict=True):
        torch.testing.assert_close(sa, sb, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(KINDS))
class TestEquivalence:
    def test_two_layers_bidirectional_batch_first(self, kind, dtype):
        ours, ref = pair(kind, dtype, num_layers=2, bidirectional=True, batch_first=True)
        x = torch.randn(3, 5, INPUT, dtype=dtype)
        hx = random_hx(ref, 3, dtype)
        assert_same(ours(x, hx), ref(x, hx), dtype)
        assert_same(ours(x), ref(x), dtype)

    def test_time_major_no_bias(self, kind, dtype):
        ours, ref = pair(kind, dtype, num_layers=2, bias=False)
        x = torch.randn(5, 2, INPUT, dtype=dtype)
        assert_same(ours(x), ref(x), dtype)

    @pytest.mark.parametrize("batch_first", [False, True])
    def test_unbatched(self, kind, dtype, batch_first):
        ours, ref = pair(kind, dtype, num_layers=2, bidirectional=True, batch_first=batch_first)
        x = torch.randn(4, INPUT, dtype=dtype)
        hx = random_hx(ref, 0, dtype)
        assert_same(ours(x, hx), ref(x, hx), dtype)
        assert_same(ours(x), ref(x), dtype)

    @pytest.mark.parametrize("enforce_sorted", [False, True])
    def test_packed_variable_lengths(self, kind, dtype, enforce_sorted):
        ours, ref = pair(kind, dtype, num_layers=2, bidirectional=True, batch_first=True)
        x = torch.randn(4, 6, INPUT, dtype=dtype)
        lengths = torch.tensor([6, 5, 3, 1] if enforce_sorted else [3, 6, 1, 5])
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        hx = random_hx(ref, 4, dtype)
        a, b = ours(packed, hx), ref(packed, hx)
        assert_same(a, b, dtype)
        torch.testing.assert_close(a[0].unsorted_indices, b[0].unsorted_indices)
        padded, lens = pad_packed_sequence(a[0], batch_first=True)
        torch.testing.assert_close(lens, lengths)
        assert padded.shape[:2] == (4, 6)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradients_match_torch(kind):
    ours, ref = pair(kind, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, INPUT, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    hx = random_hx(ref, 3, torch.float64)
    grads = []
    for model in (ours, ref):
        xi = x.clone().requires_grad_(True)
        hxi = tuple(t.clone().requires_grad_(True) for t in states(hx))
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, hn = model(packed, hxi if len(hxi) == 2 else hxi[0])
        torch.manual_seed(1)
        loss = (out.data * torch.randn_like(out.data)).sum()
        for s in states(hn):
            loss = loss + (s * torch.randn_like(s)).sum()
        loss.backward()
        grads.append([xi.grad, *(t.grad for t in hxi)])
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)
    for layer in range(2):
        for direction in range(2):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            cell = ours.cell(layer, direction)
            mats = {
                "weight_ih": cell.weight_ih.weight,
                "weight_hh": cell.weight_hh.weight,
                "bias_ih": cell.bias_ih,
                "bias_hh": cell.bias_hh,
            }
            if cell.proj_size:
                mats["weight_hr"] = cell.weight_hr.weight
            for name, p in mats.items():
                torch.testing.assert_close(
                    p.grad, getattr(ref, name + sfx).grad, rtol=1e-10, atol=1e-10
                )


def test_dropout_between_layers_matches_torch_at_p1():
    ours, ref = pair("lstm", torch.float64, num_layers=2, dropout=1.0)
    x = torch.randn(4, 2, INPUT, dtype=torch.float64)
    assert_same(ours(x), ref(x), torch.float64)  # training: layer 2 sees zeros in both
    ours.eval()
    ref.eval()
    assert_same(ours(x), ref(x), torch.float64)


def test_from_torch_keeps_the_gru_biases_apart():
    ref = nn.GRU(INPUT, HIDDEN, dtype=torch.float64)
    with torch.no_grad():  # b_hn enters as r * (W_hn h + b_hn): moving it into b_ih would differ
        ref.bias_hh_l0[2 * HIDDEN :].fill_(3.0)
    ours = kcprnn.GRU.from_torch(ref, format="dense")
    torch.testing.assert_close(ours.cell(0).bias_hh, ref.bias_hh_l0)
    x = torch.randn(3, 2, INPUT, dtype=torch.float64)
    assert_same(ours(x), ref(x), torch.float64)


def test_from_torch_rejects_other_kinds():
    with pytest.raises(TypeError, match=r"LSTM.from_torch expects a torch.nn.LSTM, got GRU"):
        kcprnn.LSTM.from_torch(nn.GRU(3, 2), format="dense")


def test_from_torch_without_decomposition_names_the_format(monkeypatch):
    cls = type(
        "NoFromDense",
        (kcprnn.DenseMatrix,),
        {"from_dense": classmethod(kcprnn.FactorizedMatrix.from_dense.__func__)},
    )
    monkeypatch.setitem(FORMATS, "nofromdense", cls)
    cls.format_name = "nofromdense"
    with pytest.raises(NotImplementedError, match=r"ih weight to format 'nofromdense'"):
        kcprnn.LSTM.from_torch(nn.LSTM(INPUT, HIDDEN), format="nofromdense")
    # the hidden weights go through hidden_format's from_dense the same way
    with pytest.raises(NotImplementedError, match=r"hh weight to format 'nofromdense'"):
        kcprnn.LSTM.from_torch(nn.LSTM(INPUT, HIDDEN), format="dense", hidden_format="nofromdense")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_from_torch_every_format(name):
    """Formats with a decomposition reproduce the weight they are given (to their accuracy: the
    layer's weight must equal its own reconstruction), the rest raise NotImplementedError."""
    ref = nn.LSTM(8, 4, dtype=torch.float64)
    opts = {"in_modes": [2, 4], "out_modes": [4, 4], **FORMAT_OPTIONS.get(name, {})}
    if not FORMATS[name].has_from_dense():
        with pytest.raises(NotImplementedError, match=repr(name)):
            kcprnn.LSTM.from_torch(ref, format=name, **opts)
        return
    ours = kcprnn.LSTM.from_torch(ref, format=name, **opts)
    assert ours.format == name
    torch.testing.assert_close(ours.cell(0).weight_hh.to_dense(), ref.weight_hh_l0)
    torch.testing.assert_close(ours.cell(0).bias_ih, ref.bias_ih_l0)
    assert_against_reconstruction(ours, torch.randn(3, 2, 8, dtype=torch.float64))


def torch_twin(model):
    """A torch.nn module running ``model``'s reconstructed weights: the reference for any format."""
    torch_cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[model.mode]
    kw = {"proj_size": model.proj_size} if model.proj_size else {}
    if model.mode == "RNN":
        kw["nonlinearity"] = model.nonlinearity
    ref = torch_cls(
        model.input_size,
        model.hidden_size,
        model.num_layers,
        bias=model.bias,
        batch_first=model.batch_first,
        bidirectional=model.bidirectional,
        dtype=model.cells[0].weight_hh.to_dense().dtype,
        **kw,
    )
    with torch.no_grad():
        for layer in range(model.num_layers):
            for direction in range(model.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                cell = model.cell(layer, direction)
                for role, m in cell.matrices().items():
                    getattr(ref, f"weight_{role}{sfx}").copy_(m.to_dense())
                if model.bias:
                    getattr(ref, "bias_ih" + sfx).copy_(cell.bias_ih)
                    getattr(ref, "bias_hh" + sfx).copy_(cell.bias_hh)
    return ref


def assert_against_reconstruction(model, x):
    assert_same(model(x), torch_twin(model)(x), x.dtype)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_every_format_matches_torch_with_reconstructed_weights(name, kind):
    cls, _, extra = KINDS[kind]
    opts = FORMAT_OPTIONS.get(name, {})
    # with a projection, W_hh (3 -> 16) and W_hr (4 -> 3) get no modes from hidden_modes
    hidden_opts = {**opts, "num_modes": 2} if "proj_size" in extra else opts
    model = cls(
        12,
        4,
        num_layers=2,
        bidirectional=True,
        format=name,
        hidden_format=name,
        in_modes=[3, 2, 2],
        hidden_modes=[2, 1, 2],
        hidden_options=hidden_opts,
        dtype=torch.float64,
        **extra,
        **opts,
    )
    g = model.cells[0].num_gates
    assert model.cell(0).weight_ih.in_modes == (3, 2, 2)
    assert model.cell(0).weight_ih.out_modes == (2 * g, 1, 2)
    if model.proj_size:  # layers > 0 read 2 * proj_size features: the format's own modes
        assert model.cell(1).weight_ih.in_features == 2 * model.proj_size
        assert model.cell(1, 1).weight_hr.format_name == name
    else:
        assert model.cell(1).weight_ih.in_modes == (4, 1, 2)  # two directions folded in
        assert model.cell(1, 1).weight_hh.in_modes == (2, 1, 2)
        assert model.cell(1, 1).weight_hh.out_modes == (2 * g, 1, 2)
    assert all(c.format == name and c.hidden_format == name for c in model.cells)
    assert_against_reconstruction(model, torch.randn(5, 3, 12, dtype=torch.float64))


def test_options_per_layer():
    model = kcprnn.LSTM(
        12,
        4,
        num_layers=3,
        format="dense",
        in_modes=[3, 4],
        out_modes=[8, 2],
        layer_options=[{}, {"in_modes": [1, 4]}, {}],
    )
    assert [c.weight_ih.in_modes for c in model.cells] == [(3, 4), (1, 4), (2, 2)]
    assert [c.weight_ih.out_modes for c in model.cells] == [(8, 2)] * 3
    # without hidden_modes the hidden matrices take the format's balanced default
    assert model.cell(0).weight_hh.in_features == 4


@pytest.mark.parametrize("input_size", [5, 40])
def test_batch_first_reorders_the_narrower_of_input_and_gates(input_size, monkeypatch):
    """A batch-first input narrower than the gates (5 against 3 x 8) is put in time order
    before the input product, a wider one (40) after it as gates: both give the time-major
    module's outputs and gradients (the same weights, float64)."""
    torch.manual_seed(0)
    kwargs = {"num_layers": 2, "bidirectional": True, "format": "tt", "dtype": torch.float64}
    first = kcprnn.GRU(input_size, 8, batch_first=True, **kwargs)
    second = kcprnn.GRU(input_size, 8, batch_first=False, **kwargs)
    second.load_state_dict(first.state_dict())
    first.recurrence = second.recurrence = "dense"  # kcprnn's loops, not torch's kernel
    calls = []  # the input product's rows, as a module call or a dense projection
    first.cell(0).weight_ih.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    real = kcprnn.rnn.recurrent.input_projection
    monkeypatch.setattr(
        kcprnn.rnn.recurrent,
        "input_projection",
        lambda x, w, b: calls.append(x.shape) or real(x, w, b),
    )
    x = torch.randn(3, 7, input_size, dtype=torch.float64, requires_grad=True)
    out, h = first(x)
    ref_out, ref_h = second(x.transpose(0, 1))
    torch.testing.assert_close(out, ref_out.transpose(0, 1))
    torch.testing.assert_close(h, ref_h)
    grad = torch.autograd.grad((out * out).sum() + h.sum(), x)[0]
    ref_grad = torch.autograd.grad((ref_out * ref_out).sum() + ref_h.sum(), x)[0]
    torch.testing.assert_close(grad, ref_grad)
    assert calls[0] == ((7, 3, input_size) if input_size < 24 else (3, 7, input_size))


def test_input_product_is_one_call_over_all_steps(monkeypatch):
    model = kcprnn.GRU(
        INPUT, HIDDEN, num_layers=2, bidirectional=True, format="dense", batch_first=True
    )
    model.recurrence = "dense"  # kcprnn's own loops (torch's kernel multiplies W_ih itself)
    calls = {"ih": [], "hh": []}
    for cell in model.cells:
        cell.weight_ih.register_forward_hook(lambda m, a, o: calls["ih"].append(a[0].shape))
        cell.weight_hh.register_forward_hook(lambda m, a, o: calls["hh"].append(a[0].shape))
    # the fused loops multiply a dense W_ih into a reused buffer (fused.input_projection)
    real = kcprnn.rnn.recurrent.input_projection
    monkeypatch.setattr(
        kcprnn.rnn.recurrent,
        "input_projection",
        lambda x, w, b: calls["ih"].append(x.shape) or real(x, w, b),
    )
    model(torch.randn(3, 7, INPUT))
    # the batch-first input, narrower than the gates, goes in time order (once for both
    # directions) rather than the gates after the product
    assert INPUT < 3 * HIDDEN
    assert calls["ih"] == [(7, 3, INPUT)] * 2 + [(21, 2 * HIDDEN)] * 2
    assert calls["hh"] == []  # equal lengths, dense W_hh: the fused layer multiplies it itself
    calls["ih"].clear()
    packed = pack_padded_sequence(
        torch.randn(3, 7, INPUT), torch.tensor([7, 2, 4]), batch_first=True, enforce_sorted=False
    )
    model.recurrence = "steps"
    model(packed)
    assert calls["ih"] == [(13, INPUT)] * 2 + [(13, 2 * HIDDEN)] * 2
    # unequal lengths step through time: one hidden product per step (3, 3, 2, 2, 1, 1, 1 rows)
    forward, backward = [3, 3, 2, 2, 1, 1, 1], [1, 1, 1, 2, 2, 3, 3]
    assert [s[0] for s in calls["hh"]] == (forward + backward) * 2


def test_reset_parameters_targets_torch_variance(monkeypatch):
    seen = []
    for cls in FORMATS.values():
        orig = cls.reset_parameters

        def spy(self, std=None, _orig=orig):
            seen.append(std)
            return _orig(self, std)

        monkeypatch.setattr(cls, "reset_parameters", spy)
    model = kcprnn.LSTM(INPUT, 9, proj_size=2, format="dense")
    assert seen[-3:] == [pytest.approx(1 / math.sqrt(27))] * 3  # ih, hh, hr
    seen.clear()
    model.reset_parameters()
    assert seen == [pytest.approx(1 / math.sqrt(27))] * 3
    cell = model.cell(0)
    for t in (cell.weight_ih.weight, cell.weight_hh.weight, cell.bias_ih, cell.bias_hh):
        assert t.abs().max() <= 1 / 3 and t.abs().max() > 0.9 / 3


def test_default_format_is_kcp():
    if "kcp" not in FORMATS:
        with pytest.raises(ValueError, match="unknown format 'kcp'"):
            kcprnn.LSTM(INPUT, HIDDEN)
    else:
        assert kcprnn.LSTM(INPUT, HIDDEN).format == "kcp"


def test_state_dict_round_trip_and_to():
    a = kcprnn.LSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=2, format="dense")
    b = kcprnn.LSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=2, format="dense")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, INPUT)
    assert_same(a(x), b(x), torch.float32)
    assert "cells.0.weight_ih.weight" in a.state_dict()
    c = b.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in c.parameters())
    y, (h, cc) = c(x.double())
    assert y.dtype == h.dtype == cc.dtype == torch.float64
    torch.testing.assert_close(y, a(x)[0].double(), rtol=1e-5, atol=1e-6)


def test_safetensors_round_trip_and_meta_device(tmp_path):
    from safetensors.torch import load_file, save_file

    a = kcprnn.GRU(INPUT, HIDDEN, 2, bidirectional=True, format="dense")
    save_file(a.state_dict(), tmp_path / "gru.safetensors")
    b = kcprnn.GRU(INPUT, HIDDEN, 2, bidirectional=True, format="dense")
    b.load_state_dict(load_file(tmp_path / "gru.safetensors"))
    x = torch.randn(3, 2, INPUT)
    assert_same(a(x), b(x), torch.float32)
    moved = b.to("meta")
    assert all(p.device.type == "meta" for p in moved.parameters())


@pytest.mark.skipif("kcp" not in FORMATS, reason="the kcp format has not landed")
def test_nested_hidden_modes_fold_into_the_first_kronecker_factor():
    model = kcprnn.LSTM(
        24,
        4,
        num_layers=2,
        format="kcp",
        in_modes=[[2, 3], [2, 2]],
        hidden_modes=[[1, 2], [2, 1]],
        dtype=torch.float64,
    )
    ih0, ih1 = model.cell(0).weight_ih, model.cell(1).weight_ih
    assert [list(m) for m in ih0.out_splits] == [[4, 2], [2, 1]]  # 4 gates into J_1^(1)
    assert [list(m) for m in ih1.in_splits] == [[1, 2], [2, 1]]  # layer 2 reads h: hidden_modes
    assert [list(m) for m in ih1.out_splits] == [[4, 2], [2, 1]]
    # nested modes describe W_ih only: the dense W_hh is tensorized by its own default
    assert model.cell(0).weight_hh.in_features == 4
    assert_against_reconstruction(model, torch.randn(3, 2, 24, dtype=torch.float64))


def test_extra_repr_lists_non_defaults():
    m = kcprnn.RNN(INPUT, HIDDEN, 2, nonlinearity="relu", batch_first=True, format="dense")
    r = repr(m)
    assert r.startswith(
        "RNN(\n  6, 4, num_layers=2, nonlinearity='relu', batch_first=True, format='dense'\n"
    )
    assert "dropout" not in r and "bidirectional" not in r


def test_torch_compile_small_lstm():
    """One graph without breaks (fullgraph), forward and backward equal to torch.nn. The
    aot_eager backend traces what inductor would compile, without minutes of C++ codegen."""
    model = kcprnn.LSTM(INPUT, HIDDEN, format="dense", batch_first=True)
    ref = torch_twin(model)
    x = torch.randn(2, 3, INPUT)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, ref_out = compiled(x), ref(x)
    assert_same(out, ref_out, torch.float32)
    out[0].sum().backward()
    ref_out[0].sum().backward()
    torch.testing.assert_close(
        model.cell(0).weight_ih.weight.grad, ref.weight_ih_l0.grad, rtol=1e-5, atol=1e-5
    )


class MyLSTM(kcprnn.LSTM):
    pass


class MyRNN(kcprnn.RNN):
    pass


@pytest.mark.parametrize("proj_size", [0, 3])
def test_subclass_from_torch_is_the_subclass_and_equals_torch(proj_size):
    ref = nn.LSTM(8, 4, 2, bidirectional=True, proj_size=proj_size, dtype=torch.float64)
    ours = MyLSTM.from_torch(ref, format="dense")
    assert type(ours) is MyLSTM and ours.proj_size == proj_size
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    hx = random_hx(ref, 3, torch.float64)
    assert_same(ours(x, hx), ref(x, hx), torch.float64)
    with pytest.raises(TypeError, match=r"MyLSTM.from_torch expects a torch.nn.LSTM, got GRU"):
        MyLSTM.from_torch(nn.GRU(8, 4), format="dense")


def test_subclass_from_torch_keeps_settings_and_training_mode():
    ref = nn.RNN(
        INPUT, HIDDEN, 2, nonlinearity="relu", bias=False, batch_first=True, dtype=torch.float64
    ).eval()
    ours = MyRNN.from_torch(ref, format="tt", rank=2)
    assert type(ours) is MyRNN and not ours.training
    assert (ours.nonlinearity, ours.bias, ours.batch_first) == ("relu", False, True)
    assert all(c.nonlinearity == "relu" for c in ours.cells)
    tensors = [*ours.parameters(), *ours.buffers()]
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in tensors)
    assert_against_reconstruction(ours, torch.randn(3, 5, INPUT, dtype=torch.float64))
