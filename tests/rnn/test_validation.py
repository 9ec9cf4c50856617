"""The one validator of the recurrent cells' and modules' arguments: each bad value gives the
same clear error from a cell and from a module, and the message names the value."""

import pytest
import torch
from torch import nn

import kcprnn

# (name, cell factory or None, module factory or None, exception, pattern naming the bad value)
CELL_AND_MODULE = [
    (
        "input_size",
        lambda: kcprnn.LSTMCell(0, 4, format="dense"),
        lambda: kcprnn.LSTM(0, 4, format="dense"),
        ValueError,
        r"input_size must be greater than zero, got input_size=0",
    ),
    (
        "hidden_size type",
        lambda: kcprnn.GRUCell(5, 2.5, format="dense"),
        lambda: kcprnn.GRU(5, 2.5, format="dense"),
        TypeError,
        r"hidden_size should be of type int, got: float \(hidden_size=2.5\)",
    ),
    (
        "bias",
        lambda: kcprnn.RNNCell(5, 4, bias="yes", format="dense"),
        lambda: kcprnn.RNN(5, 4, bias="yes", format="dense"),
        TypeError,
        r"bias must be a bool, got bias='yes'",
    ),
    (
        "format",
        lambda: kcprnn.LSTMCell(5, 4, format="nope"),
        lambda: kcprnn.LSTM(5, 4, format="nope"),
        ValueError,
        r"unknown format 'nope'; choose one of \[.*'dense'",
    ),
    (
        "hidden_format",
        lambda: kcprnn.GRUCell(5, 4, format="dense", hidden_format=3),
        lambda: kcprnn.GRU(5, 4, format="dense", hidden_format=3),
        ValueError,
        r"unknown hidden_format 3; choose one of",
    ),
    (
        "hidden_modes product",
        lambda: kcprnn.LSTMCell(5, 4, format="dense", hidden_modes=[2, 3]),
        lambda: kcprnn.LSTM(5, 4, format="dense", hidden_modes=[2, 3]),
        ValueError,
        r"hidden_modes=\[2, 3\] multiply to 6, but hidden_size=4",
    ),
    (
        "hidden_modes type",
        lambda: kcprnn.LSTMCell(5, 4, format="dense", hidden_modes="22"),
        lambda: kcprnn.LSTM(5, 4, format="dense", hidden_modes="22"),
        TypeError,
        r"hidden_modes must be a non-empty sequence .* got '22'",
    ),
    (
        "proj_size negative",
        lambda: kcprnn.LSTMCell(5, 4, format="dense", proj_size=-1),
        lambda: kcprnn.LSTM(5, 4, format="dense", proj_size=-1),
        ValueError,
        r"proj_size should be a non-negative int, got proj_size=-1",
    ),
    (
        "proj_size too large",
        lambda: kcprnn.LSTMCell(5, 4, format="dense", proj_size=4),
        lambda: kcprnn.LSTM(5, 4, format="dense", proj_size=4),
        ValueError,
        r"proj_size has to be smaller than hidden_size, got proj_size=4, hidden_size=4",
    ),
    (
        "unknown nonlinearity",
        lambda: kcprnn.RNNCell(5, 4, nonlinearity="gelu", format="dense"),
        lambda: kcprnn.RNN(5, 4, nonlinearity="gelu", format="dense"),
        ValueError,
        r"Unknown nonlinearity 'gelu'. Select from 'tanh' or 'relu'.",
    ),
    (
        "nonlinearity of an LSTM",
        lambda: kcprnn.LSTMCell(5, 4, nonlinearity="relu", format="dense"),
        lambda: kcprnn.LSTM(5, 4, nonlinearity="relu", format="dense"),
        ValueError,
        r"nonlinearity is only supported by RNN and RNNCell, got nonlinearity='relu'",
    ),
    (
        "nonlinearity of a GRU",
        lambda: kcprnn.GRUCell(5, 4, nonlinearity="relu", format="dense"),
        lambda: kcprnn.GRU(5, 4, nonlinearity="relu", format="dense"),
        ValueError,
        r"nonlinearity is only supported by RNN and RNNCell, got nonlinearity='relu'",
    ),
]


@pytest.mark.parametrize("kind", ["cell", "module"])
@pytest.mark.parametrize("case", CELL_AND_MODULE, ids=[c[0] for c in CELL_AND_MODULE])
def test_shared_arguments_same_error_for_cells_and_modules(case, kind):
    _, cell, module, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        (cell if kind == "cell" else module)()


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: kcprnn.GRUCell(5, 4, format="dense", proj_size=2),
            r"proj_size is only supported by LSTM cells, got proj_size=2",
        ),
        (
            lambda: kcprnn.RNNCell(5, 4, format="dense", proj_size=2),
            r"proj_size is only supported by LSTM cells, got proj_size=2",
        ),
        (
            lambda: kcprnn.GRU(5, 4, format="dense", proj_size=2),
            r"proj_size argument is only supported for LSTM, not RNN or GRU \(got proj_size=2\)",
        ),
        (
            lambda: kcprnn.RNN(5, 4, format="dense", proj_size=2),
            r"proj_size argument is only supported for LSTM, not RNN or GRU \(got proj_size=2\)",
        ),
    ],
)
def test_projection_only_for_lstm(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"num_layers": 0}, ValueError, r"num_layers must be greater than zero, got num_layers=0"),
        ({"num_layers": "2"}, TypeError, r"num_layers should be of type int, got: str"),
        ({"num_layers": 2, "dropout": 1.5}, ValueError, r"got dropout=1.5"),
        ({"num_layers": 2, "dropout": None}, ValueError, r"got dropout=None"),
        (
            {"num_layers": 2, "layer_options": {"rank": 2}},
            ValueError,
            r"layer_options must be a sequence of num_layers=2 dicts, got \{'rank': 2\}",
        ),
        (
            {"num_layers": 2, "layer_options": [{}, 3]},
            ValueError,
            r"num_layers=2 dicts, got \[\{\}, 3\]",
        ),
    ],
)
def test_module_only_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        kcprnn.GRU(5, 4, format="dense", **kwargs)


def test_dropout_warning_names_both_values():
    with pytest.warns(UserWarning, match=r"got dropout=0.25 and num_layers=1"):
        kcprnn.RNN(5, 4, dropout=0.25, format="dense")


def test_from_torch_validates_the_options_too():
    with pytest.raises(ValueError, match=r"hidden_modes=\[3\] multiply to 3, but hidden_size=4"):
        kcprnn.GRU.from_torch(nn.GRU(5, 4), format="dense", hidden_modes=[3])
    with pytest.raises(ValueError, match="unknown hidden_format 'nope'"):
        kcprnn.LSTMCell.from_torch(nn.LSTMCell(5, 4), format="dense", hidden_format="nope")


def test_valid_arguments_build_the_documented_shapes():
    """The validator lets every valid combination through (a check that refused too much would
    break these)."""
    cell = kcprnn.LSTMCell(6, 4, bias=False, proj_size=2, format="dense", hidden_modes=[2, 2])
    assert cell.weight_ih.out_modes == (8, 2) and cell.weight_hr is not None
    rnn = kcprnn.RNN(6, 4, 2, "relu", dropout=0.5, format="dense", layer_options=({}, {}))
    assert rnn.nonlinearity == "relu" and rnn.dropout == 0.5 and len(rnn.cells) == 2
    assert kcprnn.GRU(6, 4, dtype=torch.float64, format="dense").cell(0).bias_ih.dtype == (
        torch.float64
    )
