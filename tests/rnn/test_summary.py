"""kcprnn.summary: counts checked by hand on tiny models."""

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn import FORMATS


class Classifier(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(4, 2)


def test_dense_lstm_by_hand():
    model = Classifier(kcprnn.LSTM(6, 4, format="dense"))
    s = kcprnn.summary(model, batch_size=2, seq_len=3)
    (layer,) = s.layers
    assert layer.name == "rnn.l0" and layer.kind == "LSTM" and layer.format == "dense"
    assert layer.input_shape == (16, 6)
    assert (layer.input_params, layer.hidden_params, layer.bias_params) == (96, 64, 32)
    assert layer.params == 192 and layer.input_compression == 1.0
    # W_ih over 2*3 rows once, shared by 3 steps: 6*96/3; W_hh per step on 2 rows: 2*64
    assert layer.macs_per_step == 192 + 128
    assert s.params == 192 + 4 * 2 + 2 and s.dense_params == s.params and s.compression == 1.0
    text = str(s)
    assert "rnn.l0" in text and "16 x 6" in text and "202 parameters" in text


def test_bidirectional_projection_rows():
    model = kcprnn.LSTM(
        6, 4, num_layers=2, bidirectional=True, proj_size=2, bias=False, format="dense"
    )
    s = kcprnn.summary(model)
    assert [x.name for x in s.layers] == ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert [x.input_shape for x in s.layers] == [(16, 6)] * 2 + [(16, 4)] * 2
    # hidden: W_hh (16 x 2) + W_hr (2 x 4); no biases
    assert all(x.hidden_params == 32 + 8 and x.bias_params == 0 for x in s.layers)
    assert s.input_params == 2 * 96 + 2 * 64
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.macs_per_step == 2 * (96 + 40) + 2 * (64 + 40)


@pytest.mark.skipif("cp" not in FORMATS, reason="the cp format has not landed")
def test_compressed_counts_by_hand():
    # CP over merged modes, rank R: R * sum_d I_d J_d = 2 * (3*4 + 4*2) = 40 parameters
    model = kcprnn.LSTM(12, 2, format="cp", in_modes=[3, 4], out_modes=[4, 2], rank=2)
    s = kcprnn.summary(model, batch_size=5)
    (layer,) = s.layers
    assert layer.input_params == 40 and layer.input_dense_params == 96
    assert layer.input_compression == pytest.approx(96 / 40) == s.input_compression
    assert s.params == 40 + 8 * 2 + 16
    assert s.dense_params == 96 + 8 * 2 + 16
    assert s.compression == pytest.approx(128 / 72)
    cell = model.cell(0)
    assert layer.macs_per_step == cell.weight_ih.flops(5) + 5 * 16


def test_standalone_cells_and_errors():
    cell = kcprnn.GRUCell(3, 2, format="dense")
    s = kcprnn.summary(cell)
    assert [(x.name, x.kind, x.params) for x in s.layers] == [("GRU", "GRU", 18 + 12 + 12)]
    with pytest.raises(ValueError, match="batch_size must be a positive int, got batch_size=0"):
        kcprnn.summary(cell, batch_size=0)
    assert kcprnn.summary(nn.Linear(3, 2)).layers == []


def test_summary_has_no_side_effects(capsys):
    model = kcprnn.RNN(3, 2, format="dense")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kcprnn.summary(model)
    assert capsys.readouterr().out == ""
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
