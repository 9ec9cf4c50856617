"""The spike task end to end: the SHD-like stand-in (deterministic, cached), ``kcprnn train`` on
a tiny stand-in preset, the checkpoint, and the classifier's readouts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kcprnn import FORMATS
from kcprnn.cli import main as cli_main
from kcprnn.data import (
    SHD_LIKE_CLASSES,
    SpikeStandInSpec,
    espeak_available,
    load_spike_dataset,
    make_shd_like,
    read_spike_file,
    shd_like_dir,
)
from kcprnn.experiments.config import load_config
from kcprnn.experiments.model import SequenceClassifier
from kcprnn.experiments.train import evaluate, load_checkpoint, load_data, model_numbers

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
TINY_SPEC = SpikeStandInSpec(repeats=2, classes=4, speakers=2, test_speakers=1)

needs_espeak = pytest.mark.skipif(
    not espeak_available(),
    reason="the espeak-ng program is missing (Debian package espeak-ng; `make system-deps`)",
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny stand-in (2 speakers x 4 classes x 2 utterances)."""
    cache = tmp_path_factory.mktemp("cache")
    shd_like_dir(TINY_SPEC, cache)
    return cache


@needs_espeak
def test_standin_generation_is_deterministic(tmp_path):
    spec = SpikeStandInSpec(repeats=1, speakers=2, test_speakers=1, classes=3)
    first = make_shd_like(spec, tmp_path / "first")
    second = make_shd_like(spec, tmp_path / "second")  # a second, independent generation
    for split in ("train", "test"):
        assert first[split].read_bytes() == second[split].read_bytes()
    test = read_spike_file(first["test"])
    assert set(test.speakers) >= {1} and set(test.labels) <= {0, 1, 2}
    assert len(test) + len(read_spike_file(first["train"])) == 6


@needs_espeak
def test_standin_is_cached_and_read_by_the_shd_loader(tiny_cache):
    folder = shd_like_dir(TINY_SPEC, tiny_cache)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    # the cache is reused, keyed by every parameter, and holds no temporary leftovers
    assert shd_like_dir(TINY_SPEC, tiny_cache) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    other = SpikeStandInSpec(repeats=2, classes=4, speakers=2, test_speakers=1, seed=1)
    assert other.key() != TINY_SPEC.key()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    # SHD's layout: the same loader as for the released files
    train, test = read_spike_file(folder / "shd_train.h5"), read_spike_file(folder / "shd_test.h5")
    assert train.class_names == SHD_LIKE_CLASSES and len(SHD_LIKE_CLASSES) == 20
    assert set(train.speakers) == {0} and 1 in set(test.speakers)  # speaker 1: test only
    assert len(train) + len(test) == 16
    assert sorted([*train.labels, *test.labels]) == sorted([*range(4)] * 4)
    counts = np.r_[train.spike_counts(), test.spike_counts()]
    assert counts.min() > 1000  # every utterance is encoded into thousands of spikes
    splits = load_spike_dataset(folder, "shd", valid_fraction=0.5)
    assert len(splits.test) == len(test)


@needs_espeak
def test_kcprnn_train_end_to_end_on_a_tiny_standin_preset(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        "--speakers=2",
        "--repeats=2",
        "--classes=4",
        "--valid_fraction=0.25",
        "--hidden_size=8",
        "--hidden_modes=[2, 2, 2]",
        "--format_options.rank=2",
        "--hidden_options.rank=2",
        "--bin_width=0.05",
        "--epochs=2",
        "--batch_size=8",
        "--grad_clip=1.0",
        f"--cache_dir={tiny_cache}",
        f"--out_dir={run}",
        "--no-progress",
    ]
    config = CONFIGS / "shd-like_kcp.toml"
    assert cli_main(["train", "--config", str(config), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nrun folder:")[0])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["valid_acc"] <= 1 for r in rows)
    assert summary["test_acc"] == rows[-1]["test_acc"]
    train_file = summary["num_train"] + summary["num_valid"]
    assert train_file + summary["num_test"] == 16 and train_file <= 8  # speaker 1: test only
    assert summary["num_valid"] == round(0.25 * train_file)
    assert (summary["format"], summary["hidden_format"]) == ("kcp", "kcp")
    # the checkpoint rebuilds the model; evaluating it reproduces the logged test accuracy
    model, cfg, meta = load_checkpoint(run)
    assert cfg == load_config(config, overrides[:-1] + ["--progress=false"])
    data = load_data(cfg)
    loss, acc = evaluate(model, data, data.test, 8, torch.device("cpu"))
    assert acc == pytest.approx(rows[-1]["test_acc"])
    assert loss == pytest.approx(rows[-1]["test_loss"], rel=1e-5)
    assert model(data.inputs(data.test[:3], torch.device("cpu"))).shape == (3, 20)
    assert data.inputs(data.test[:1], torch.device("cpu")).shape == (1, 20, 700)
    # recurrent parameters: W_ih and W_hh of the cell, counted from the modules themselves
    cell = model.rnn.cell(0)
    by_hand = sum(p.numel() for p in cell.weight_ih.parameters()) + sum(
        p.numel() for p in cell.weight_hh.parameters()
    )
    assert summary["recurrent_params"] == by_hand
    assert summary["recurrent_compression"] == pytest.approx((700 + 8) * 32 / by_hand)


# --- the classifier ---


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("fmt", ["dense", "kcp", "tt", "tr", "bt", "ht"])
def test_every_format_for_both_matrices_counts_its_parameters(cell, fmt):
    assert fmt in FORMATS
    model = SequenceClassifier(
        24,
        8,
        5,
        cell=cell,
        format=fmt,
        hidden_format=fmt,
        hidden_modes=[2, 2, 2],
        bidirectional=True,
        readout="mean",
    )
    assert model.rnn.format == fmt and model.rnn.hidden_format == fmt
    assert model(torch.randn(3, 4, 24)).shape == (3, 5)
    gates = 4 if cell == "lstm" else 3
    weights = [
        p for c in model.rnn.cells for m in (c.weight_ih, c.weight_hh) for p in m.parameters()
    ]
    numbers = model_numbers(model)
    assert numbers["recurrent_params"] == sum(p.numel() for p in weights)
    assert numbers["recurrent_dense_params"] == 2 * gates * 8 * (24 + 8)


def test_readouts_match_the_hidden_states():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    for bidirectional in (False, True):
        model = SequenceClassifier(
            6, 4, 3, cell="gru", format="dense", bidirectional=bidirectional, readout="last"
        )
        _, h_n = model.rnn(x)  # (d, b, h): final state of each direction
        expected = model.classifier(torch.cat(list(h_n), dim=-1))
        torch.testing.assert_close(model(x), expected)
        model.readout = "mean"
        out, _ = model.rnn(x)
        torch.testing.assert_close(model(x), model.classifier(out.mean(dim=1)))
    with pytest.raises(ValueError, match="readout"):
        SequenceClassifier(6, 4, 3, readout="max")


# --- presets ---


@pytest.mark.parametrize("fmt", ["dense", "kcp", "tt", "tr", "bt", "ht"])
def test_spike_presets_load_and_compress_both_matrices_100x(fmt):
    for kind in ("shd", "shd-like"):
        cfg = load_config(CONFIGS / f"{kind}_{fmt}.toml")
        assert (cfg.dataset, cfg.format, cfg.hidden_format) == (kind, fmt, fmt)
        assert (cfg.bin_width, cfg.max_time) == (0.01, 1.0)
        if kind == "shd":
            assert cfg.data_dir
        model = SequenceClassifier(
            700,
            cfg.hidden_size,
            20,
            cell=cfg.cell,
            format=cfg.format,
            hidden_modes=list(cfg.hidden_modes),
            format_options=dict(cfg.format_options),
            hidden_format=cfg.hidden_format,
            hidden_options=dict(cfg.hidden_options),
            readout=cfg.readout,
        )
        ratio = model_numbers(model)["recurrent_compression"]
        assert ratio == 1 if fmt == "dense" else ratio >= 100


def test_spike_config_keys_and_checks():
    from kcprnn.experiments.config import Config, ConfigError

    cfg = load_config(None, ["--dataset=shd-like", "--hidden_format=tt", "--hidden_options.rank=3"])
    assert (cfg.hidden_format, cfg.hidden_options) == ("tt", {"rank": 3})
    with pytest.raises(ConfigError, match="split must be 'auto'"):
        Config(dataset="shd-like", split="stratified")
    with pytest.raises(ConfigError, match="readout"):
        Config(readout="max")
    with pytest.raises(ConfigError, match="bin_width"):
        Config(bin_width=0.0)
    with pytest.raises(ConfigError, match="grad_clip"):
        Config(grad_clip=-1.0)
    with pytest.raises(ConfigError, match="set data_dir"):
        Config(dataset="shd")
    with pytest.raises(ConfigError, match="unknown config key 'hidden_option.rank'"):
        load_config(None, ["--hidden_option.rank=3"])
