"""kcprnn.save / kcprnn.load: round trips of every format and model class give identical outputs;
the files are standard safetensors; pickles, truncated files, lying headers and configurations
that do not match the tensors are refused without running anything from the file."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn.experiments.ctc import CTCModel
from kcprnn.experiments.model import SequenceClassifier
from kcprnn.io import LoadError, module_config, read_safetensors, write_safetensors

FORMAT_OPTIONS = {
    "dense": {},
    "kcp": {"rank": 2, "terms": 2},
    "cp": {"rank": 3},
    "tucker": {"rank": 2},
    "tt": {"rank": 3},
    "tr": {"rank": 2},
    "bt": {"rank": 2, "blocks": 2},
    "ht": {"rank": 2},
}


def _header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path, header, body):
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + body)


def _edit_config(path, edit):
    """Rewrite the kcprnn configuration in a saved file through ``edit(config_dict)``."""
    header, body = _header(path)
    doc = json.loads(header["__metadata__"]["kcprnn"])
    edit(doc)
    header["__metadata__"]["kcprnn"] = json.dumps(doc)
    _write_header(path, header, body)


def _same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", sorted(FORMAT_OPTIONS))
def test_factorized_linear_round_trip(tmp_path, fmt):
    layer = kcprnn.FactorizedLinear(24, 18, format=fmt, **FORMAT_OPTIONS[fmt])
    path = tmp_path / "layer.safetensors"
    kcprnn.save(layer, path)
    loaded = kcprnn.load(path)
    assert type(loaded) is kcprnn.FactorizedLinear and loaded.format == fmt
    _same_parameters(layer, loaded)
    x = torch.randn(5, 24)
    assert torch.equal(loaded(x), layer(x))
    assert loaded.weight.in_modes == layer.weight.in_modes
    assert loaded.num_params == layer.num_params


@pytest.mark.parametrize("fmt", sorted(FORMAT_OPTIONS))
@pytest.mark.parametrize("cls", [kcprnn.LSTM, kcprnn.GRU, kcprnn.RNN])
def test_recurrent_round_trip_two_layers_bidirectional(tmp_path, fmt, cls):
    opts = FORMAT_OPTIONS[fmt]
    rnn = cls(
        12,
        8,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        format=fmt,
        hidden_format=fmt,
        hidden_options=opts,
        **opts,
    )
    path = tmp_path / "rnn.safetensors"
    kcprnn.save(rnn, path)
    loaded = kcprnn.load(path)
    assert type(loaded) is cls and loaded.batch_first and loaded.num_layers == 2
    _same_parameters(rnn, loaded)
    x = torch.randn(3, 7, 12)
    out, h = rnn(x)
    out2, h2 = loaded(x)
    assert torch.equal(out2, out)
    states = (h, h2) if isinstance(h, tuple) else ((h,), (h2,))
    for a, b in zip(*states, strict=True):
        assert torch.equal(a, b)


def test_settings_survive_the_round_trip(tmp_path):
    """float64, a projection, no bias, relu, a non-default algorithm and recurrence, eval
    mode, the fixed-format layer classes and cells."""
    path = tmp_path / "m.safetensors"
    lstm = kcprnn.LSTM(
        10, 8, proj_size=3, bias=False, dtype=torch.float64, format="tt", rank=2, dropout=0.0
    )
    lstm.cell(0).weight_ih.algorithm = "dense"
    lstm.recurrence = "steps"
    lstm.eval()
    kcprnn.save(lstm, path)
    loaded = kcprnn.load(path)
    assert loaded.proj_size == 3 and loaded.bias is False and not loaded.training
    assert loaded.recurrence == "steps" and loaded.cell(0).weight_ih.algorithm == "dense"
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(4, 2, 10, dtype=torch.float64)
    assert torch.equal(loaded(x)[0], lstm(x)[0])

    rnn = kcprnn.RNN(6, 4, nonlinearity="relu", format="cp", rank=2)
    kcprnn.save(rnn, path)
    assert kcprnn.load(path).nonlinearity == "relu"

    for layer in (kcprnn.KCPLinear(16, 8, rank=2), kcprnn.TTLinear(16, 8, bias=False)):
        kcprnn.save(layer, path)
        loaded = kcprnn.load(path)
        assert type(loaded) is type(layer)
        assert torch.equal(loaded(torch.ones(2, 16)), layer(torch.ones(2, 16)))

    for cell in (
        kcprnn.LSTMCell(10, 6, format="kcp", rank=2),
        kcprnn.GRUCell(10, 6, format="ht", hidden_format="tr", hidden_options={"rank": 2}),
        kcprnn.RNNCell(10, 6, nonlinearity="relu", format="tucker"),
    ):
        kcprnn.save(cell, path)
        loaded = kcprnn.load(path)
        x = torch.randn(3, 10)
        a, b = cell(x), loaded(x)
        assert torch.equal(a[0], b[0]) if isinstance(a, tuple) else torch.equal(a, b)


def test_converted_torch_module_with_capped_ranks_round_trips(tmp_path):
    """from_torch caps TT ranks per matrix (the first layer's differ from the second's): the
    saved configuration is each matrix's own, not the constructor's."""
    ref = nn.GRU(6, 8, num_layers=2, bidirectional=True)
    gru = kcprnn.GRU.from_torch(ref, "tt", rank=50, hidden_format="tt", hidden_options={"rank": 50})
    ranks = {gru.cell(k).weight_ih.ranks for k in range(2)}
    assert len(ranks) == 2  # capped differently
    path = tmp_path / "gru.safetensors"
    kcprnn.save(gru, path)
    loaded = kcprnn.load(path)
    x = torch.randn(5, 2, 6)
    assert torch.equal(loaded(x)[0], gru(x)[0])
    assert torch.allclose(loaded(x)[0], ref(x)[0], atol=1e-5)  # rank 50: exact (capped)


@pytest.mark.parametrize("model_class", ["SequenceClassifier", "CTCModel"])
def test_experiment_models_round_trip(tmp_path, model_class):
    if model_class == "SequenceClassifier":
        model = SequenceClassifier(
            20, 8, 5, cell="gru", format="kcp", format_options={"rank": 2}, readout="mean"
        )
    else:
        model = CTCModel(20, 8, 6, num_layers=2, format="tt", format_options={"rank": 2})
    path = tmp_path / "model.safetensors"
    kcprnn.save(model, path)
    loaded = kcprnn.load(path)
    assert type(loaded) is type(model)
    x = torch.randn(2, 9, 20)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))


def test_map_location_and_atomic_write(tmp_path):
    layer = kcprnn.FactorizedLinear(8, 4, format="cp", rank=2)
    path = tmp_path / "layer.safetensors"
    kcprnn.save(layer, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.safetensors"]  # no temp left
    loaded = kcprnn.load(path, map_location="meta")
    assert all(p.device.type == "meta" for p in loaded.parameters())


def test_unsaveable_module_is_refused(tmp_path):
    class MyLSTM(kcprnn.LSTM):
        pass

    for module in (nn.Linear(3, 2), MyLSTM(4, 2, format="dense")):
        with pytest.raises(TypeError, match="cannot save a .*(Linear|MyLSTM)"):
            kcprnn.save(module, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# --- the file format ---------------------------------------------------------------------------


def test_our_files_are_standard_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    lstm = kcprnn.LSTM(10, 4, format="kcp", rank=2)
    path = tmp_path / "lstm.safetensors"
    kcprnn.save(lstm, path)
    theirs = load_file(path)
    assert theirs.keys() == lstm.state_dict().keys()
    for k, v in lstm.state_dict().items():
        assert torch.equal(theirs[k], v)
    with safe_open(path, framework="pt") as f:
        doc = json.loads(f.metadata()["kcprnn"])
    assert doc["format_version"] == 1 and doc["kcprnn_version"] == kcprnn.__version__
    assert doc["module"]["class"] == "LSTM"
    assert doc["module"]["cells"][0]["matrices"]["ih"]["format"] == "kcp"


def test_reads_files_of_the_safetensors_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(7, dtype=torch.int32),
        "d": torch.tensor([True, False, True]),
        "e": torch.zeros(0, 3),
        "f": torch.tensor(2.5, dtype=torch.float16),
        "g": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
    }
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    got, meta = read_safetensors(path)
    assert meta == {"k": "v"} and got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)
    # and ours the other way, with the same tensors
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, tensors, {"k": "v"})
    from safetensors.torch import load_file

    back = load_file(ours)
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_module_config_is_plain_json():
    cfg = module_config(kcprnn.LSTM(8, 4, num_layers=2, format="ht", rank=2))
    assert json.loads(json.dumps(cfg)) == cfg


# --- refused files -------------------------------------------------------------------------------


class _Boom:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=2))
    zipped = tmp_path / "zipped.pt"
    torch.save({"x": torch.ones(2)}, zipped)
    with pytest.raises(LoadError, match="pickle file"):
        kcprnn.load(legacy)
    with pytest.raises(LoadError, match="zip archive .*torch.save"):
        kcprnn.load(zipped)
    assert not marker.exists()


def test_truncated_and_lying_files_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    kcprnn.save(kcprnn.FactorizedLinear(16, 8, format="tt", rank=2), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(LoadError, match="truncated: the header describes"):
        kcprnn.load(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(LoadError, match="header length field says"):
        kcprnn.load(cut)
    header, body = _header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    _write_header(path, header, body)
    with pytest.raises(LoadError, match=f"{name}.*needs .* bytes but data_offsets"):
        kcprnn.load(path)


def test_configuration_mismatches_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    lstm = kcprnn.LSTM(12, 4, format="tt", rank=2)

    def edit_rank(doc):
        doc["module"]["cells"][0]["matrices"]["ih"]["options"]["rank"] = 3

    kcprnn.save(lstm, path)
    _edit_config(path, edit_rank)
    with pytest.raises(LoadError, match=r"tensor 'cells\.0\.weight_ih\.cores\.\d' has shape"):
        kcprnn.load(path)

    def edit_dtype(doc):
        for m in doc["module"]["cells"][0]["matrices"].values():
            m["dtype"] = "float64"

    kcprnn.save(lstm, path)
    _edit_config(path, edit_dtype)
    with pytest.raises(LoadError, match="dtype torch.float32 in the file, the configuration needs"):
        kcprnn.load(path)

    def edit_class(doc):
        doc["module"]["class"] = "os.system"

    kcprnn.save(lstm, path)
    _edit_config(path, edit_class)
    with pytest.raises(LoadError, match="class 'os.system' is not one kcprnn loads"):
        kcprnn.load(path)


def test_plain_safetensors_file_has_no_configuration(tmp_path):
    path = tmp_path / "plain.safetensors"
    write_safetensors(path, {"w": torch.ones(2)})
    with pytest.raises(LoadError, match="without a kcprnn configuration"):
        kcprnn.load(path)
    assert os.path.getsize(path) % 8 == 0  # header padded to 8 bytes, 8 bytes of data
