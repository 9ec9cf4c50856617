"""Model options of the experiment harness. ``dropout``: the recurrent outputs are dropped before
the output layer (and between stacked layers) in training only, exactly as
``torch.nn.functional``'s dropout with the same random draws. ``layer_options``: one table per
stacked layer laid over ``format_options``. Bad values name themselves."""

import pytest
import torch

import kcprnn
from kcprnn.experiments.config import Config, ConfigError, load_config
from kcprnn.experiments.ctc import CTCModel
from kcprnn.experiments.model import SequenceClassifier
from kcprnn.experiments.speech import build_ctc_model
from kcprnn.experiments.train import build_model


def _check_dropout(make, x, head):
    """``make(p)`` with p = 0.4 against the same model (same initialization) with p = 0: equal
    in eval mode; in training, ``head`` applied to the recurrent output dropped by
    ``torch.nn.functional.dropout`` with the same random draws."""
    torch.manual_seed(0)
    plain = make(0.0)
    torch.manual_seed(0)
    dropped = make(0.4)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), dropped.parameters(), strict=True)
    )
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x), rtol=0, atol=0)
    dropped.train()
    torch.manual_seed(5)
    got = dropped(x)
    torch.manual_seed(5)
    out, _ = plain.rnn(x)  # (b, t, d*h)
    expected = head(plain, torch.nn.functional.dropout(out, 0.4))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, plain.train()(x))  # the masks change the output


def test_ctc_model_drops_the_recurrent_output_in_training_only():
    _check_dropout(
        lambda p: CTCModel(6, 4, 5, format="tt", format_options={"rank": 2}, dropout=p),
        torch.randn(3, 7, 6),
        lambda m, out: m.output(out).log_softmax(-1),
    )


def test_sequence_classifier_drops_before_the_readout():
    _check_dropout(
        lambda p: SequenceClassifier(6, 4, 3, format="dense", readout="mean", dropout=p),
        torch.randn(2, 5, 6),
        lambda m, out: m.classifier(out.mean(dim=1)),
    )


def test_config_reaches_the_stacked_layers():
    cfg = Config(dataset="timit-like", num_layers=2, bidirectional=True, dropout=0.25)
    model = build_ctc_model(cfg, 6, 5)
    assert model.rnn.dropout == 0.25 and model.dropout.p == 0.25
    one = build_ctc_model(Config(dataset="timit-like", dropout=0.25), 6, 5)
    assert one.rnn.dropout == 0.0 and one.dropout.p == 0.25  # nothing between one layer
    video = build_model(Config(dropout=0.1, format="dense"), 12, 3)
    assert video.dropout.p == 0.1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--dropout=-0.1", r"dropout must lie in \[0, 1\), got dropout=-0\.1"),
        ("--dropout=1", r"dropout must lie in \[0, 1\), got dropout=1\.0"),
        ("--dropout=half", r"'dropout' must be of type float"),
    ],
)
def test_bad_dropout_names_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_models_refuse_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got dropout=1\.5"):
        CTCModel(6, 4, 5, dropout=1.5)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\), got dropout=-1"):
        SequenceClassifier(6, 4, 3, dropout=-1)


def test_layer_options_from_a_preset_shape_each_layer(tmp_path):
    preset = tmp_path / "two.toml"
    preset.write_text(
        'dataset = "timit-like"\nnum_layers = 2\nbidirectional = true\n'
        "hidden_size = 8\nhidden_modes = []\n"
        'format = "tt"\nhidden_format = "dense"\n'
        "[format_options]\nrank = 2\n"
        "[[layer_options]]\nin_modes = [3, 2]\n"
        "[[layer_options]]\nrank = 3\n"
    )
    cfg = load_config(preset)
    assert cfg.layer_options == ({"in_modes": (3, 2)}, {"rank": 3})
    torch.manual_seed(0)
    model = build_ctc_model(cfg, 6, 5)
    torch.manual_seed(0)
    reference = kcprnn.LSTM(
        6,
        8,
        num_layers=2,
        bidirectional=True,
        batch_first=True,
        format="tt",
        hidden_modes=None,
        rank=2,
        layer_options=[{"in_modes": [3, 2]}, {"rank": 3}],
    )
    assert [tuple(p.shape) for p in model.rnn.parameters()] == [
        tuple(p.shape) for p in reference.parameters()
    ]
    first, second = model.rnn.cell(0).weight_ih, model.rnn.cell(1).weight_ih
    assert first.in_modes == (3, 2) and second.in_features == 16
    assert first.num_params != second.num_params
    # the same through an override, and the saved config keeps the tables
    over = load_config(preset, ["--layer_options=[{rank = 1}, {rank = 2}]"])
    assert over.layer_options == ({"rank": 1}, {"rank": 2})
    assert over.to_dict()["layer_options"] == [{"rank": 1}, {"rank": 2}]
    # a saved config (lists) makes the same Config, with or without tables
    assert Config(**over.to_dict()) == over
    assert Config(**Config().to_dict()) == Config()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--dataset=timit-like", "--num_layers=2", "--layer_options=[{rank = 1}]"],
            r"layer_options must be one table per layer \(num_layers=2\)",
        ),
        (
            ["--dataset=timit-like", "--layer_options=[3]"],
            r"layer_options must be one table per layer \(num_layers=1\), got layer_options=\[3\]",
        ),
        (["--layer_options=[{rank = 1}]"], r"layer_options is for the speech data sets"),
    ],
)
def test_bad_layer_options_name_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
