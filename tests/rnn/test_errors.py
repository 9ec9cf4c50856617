"""Bad input to the recurrent modules gives a clear error, in the spirit of torch.nn's."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import kcprnn


def lstm(**kw):
    return kcprnn.LSTM(5, 3, format="dense", **kw)


def test_wrong_input_size():
    with pytest.raises(
        ValueError,
        match=r"LSTM: input.size\(-1\) must be equal to input_size. "
        r"Expected 5, got 4",
    ):
        lstm()(torch.randn(2, 3, 4))
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="Expected 5, got 4"):
        lstm()(packed)


def test_wrong_input_dims():
    with pytest.raises(ValueError, match="GRU: Expected input to be 2D or 3D, got 4D instead"):
        kcprnn.GRU(5, 3, format="dense")(torch.randn(1, 2, 3, 5))
    with pytest.raises(TypeError, match="input must be a Tensor or a PackedSequence, got list"):
        lstm()([1, 2])


def test_empty_sequence_and_empty_batch():
    with pytest.raises(ValueError, match="Expected sequence length to be larger than 0"):
        lstm()(torch.randn(0, 2, 5))
    out, (h, c) = lstm()(torch.randn(4, 0, 5))  # torch.nn accepts an empty batch, so do we
    assert out.shape == (4, 0, 3) and h.shape == c.shape == (1, 0, 3)


def test_wrong_hx_shapes():
    model = lstm(num_layers=2)
    x = torch.randn(4, 2, 5)
    good = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match=r"Expected h_0 of size \(2, 2, 3\), got \(1, 2, 3\)"):
        model(x, (torch.zeros(1, 2, 3), good))
    with pytest.raises(ValueError, match=r"Expected c_0 of size \(2, 2, 3\), got \(2, 3, 3\)"):
        model(x, (good, torch.zeros(2, 3, 3)))
    with pytest.raises(
        ValueError, match="for batched 3-D input, h_0 should also be 3-D but got a 2-D tensor"
    ):
        model(x, (good[:, 0], good))
    with pytest.raises(ValueError, match="for unbatched 2-D input, c_0 should also be 2-D"):
        model(x[:, 0], (good[:, 0], good))
    with pytest.raises(ValueError, match=r"Expected h_0 of size \(2, 3\), got \(2, 4\)"):
        model(x[:, 0], (torch.zeros(2, 4), good[:, 0]))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        model(x, good)
    gru = kcprnn.GRU(5, 3, format="dense", bidirectional=True)
    with pytest.raises(ValueError, match=r"GRU: Expected hx of size \(2, 2, 3\), got \(1, 2, 3\)"):
        gru(x, torch.zeros(1, 2, 3))
    proj = lstm(proj_size=2)
    with pytest.raises(ValueError, match=r"Expected h_0 of size \(1, 2, 2\), got \(1, 2, 3\)"):
        proj(x, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))


def test_packed_unsorted_lengths():
    x = torch.randn(4, 3, 5)
    lengths = torch.tensor([2, 4, 3])
    # torch refuses to pack them with enforce_sorted=True ...
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        pack_padded_sequence(x, lengths, enforce_sorted=True)
    # ... and so do we when a PackedSequence is built around increasing batch sizes.
    bad = PackedSequence(torch.randn(6, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(
        ValueError,
        match=r"batch_sizes must be positive and non-increasing .*"
        r"enforce_sorted=False.*got batch_sizes=\[1, 2, 3\]",
    ):
        lstm()(bad)
    with pytest.raises(ValueError, match="data has 5 rows but its batch_sizes sum to 6"):
        lstm()(PackedSequence(torch.randn(5, 5), torch.tensor([3, 2, 1])))


@pytest.mark.parametrize("dropout", [-0.1, 1.5, float("nan"), "0.5", True])
def test_dropout_outside_unit_interval(dropout):
    with pytest.raises(ValueError, match="dropout should be a number in range \\[0, 1\\]"):
        lstm(num_layers=2, dropout=dropout)


def test_dropout_with_one_layer_warns_as_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstm(dropout=0.5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        kcprnn.GRU(5, 3, format="dense", proj_size=1)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        lstm(proj_size=3)
    with pytest.raises(ValueError, match="proj_size should be a non-negative int"):
        lstm(proj_size=-1)
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        kcprnn.RNN(5, 3, nonlinearity="sigmoid", format="dense")
    with pytest.raises(ValueError, match="unknown format 'dens'; choose one of"):
        kcprnn.LSTM(5, 3, format="dens")
    with pytest.raises(ValueError, match="layer_options must be a sequence of num_layers=2 dicts"):
        lstm(num_layers=2, layer_options=[{}])
    with pytest.raises(TypeError, match="num_layers should be of type int"):
        lstm(num_layers=1.0)
    with pytest.raises(ValueError, match="the product of in_modes must equal in_features"):
        lstm(in_modes=[2, 2])
