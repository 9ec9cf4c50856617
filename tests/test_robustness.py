"""Bad inputs across the library: the API, the command line, configurations, data files and
checkpoints. Each gets an exception of a stated type whose message names the offending value
(for the command line: exit status 2 and the message on stderr). A short training run writes
nothing outside its run folder and its cache."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import kcprnn
from kcprnn.cli import main as cli_main
from kcprnn.data import SpikeFileError, StandInSpec, load_standin, read_spike_file
from kcprnn.data._io import load_npy
from kcprnn.experiments.config import ConfigError, load_config
from kcprnn.experiments.train import load_checkpoint
from kcprnn.io import LoadError

PRESET = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "shd-like_dense.toml"


class CliError(Exception):
    """A command that exited with status 2; the message is what it wrote to stderr."""


def cli(*argv: str) -> None:
    """Run ``kcprnn ARGV``; raise :class:`CliError` with its stderr on exit status 2 (the
    status every command uses for bad input, argparse's included)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli_main(list(argv))
        except SystemExit as exc:  # argparse
            rc = exc.code
    if rc == 2:
        raise CliError(err.getvalue())
    raise AssertionError(f"kcprnn {' '.join(argv)} exited with {rc!r}, expected 2")


def _lstm() -> kcprnn.LSTM:
    return kcprnn.LSTM(10, 8, format="dense")


def _saved(tmp: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A saved TT LSTM, its configuration optionally rewritten by ``edit``."""
    path = tmp / "model.safetensors"
    kcprnn.save(kcprnn.LSTM(12, 4, format="tt", rank=2), path)
    if edit is not None:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        doc = json.loads(header["__metadata__"]["kcprnn"])
        edit(doc)
        header["__metadata__"]["kcprnn"] = json.dumps(doc)
        head = json.dumps(header).encode()
        path.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n :])
    return path


def _write(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _spike_file(tmp: Path, units: list[int]) -> Path:
    """An SHD-layout file of one sample whose spikes are on ``units``."""
    path = tmp / "spikes.h5"
    with h5py.File(path, "w") as f:
        for name, vals, dtype in (
            ("spikes/times", np.linspace(0, 0.5, len(units)), np.float32),
            ("spikes/units", np.asarray(units), np.uint16),
        ):
            ds = f.create_dataset(name, (1,), dtype=h5py.vlen_dtype(dtype))
            ds[0] = vals.astype(dtype)
        f.create_dataset("labels", data=np.zeros(1, np.uint16))
        f.create_dataset("extra/speaker", data=np.zeros(1, np.uint16))
    return path


def _corrupt_standin_cache(tmp: Path) -> None:
    from kcprnn.data.standins import _cache_key

    spec = StandInSpec(kind="ucf11-like", clips_per_class=2, num_frames=2, height=8, width=8)
    folder = tmp / "standins" / f"ucf11-like-{_cache_key(spec)}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text('{"class_names": ')  # cut short
    load_standin(spec, tmp)


def _other_rank(doc: dict) -> None:
    doc["module"]["cells"][0]["matrices"]["ih"]["options"]["rank"] = 3  # saved: 2


# (id, exception type, pattern the message must match, the bad input given tmp_path)
CASES: list[tuple[str, type[BaseException], str, Callable[[Path], object]]] = [
    # --- API: formats and layers ---
    (
        "zero in_features",
        ValueError,
        r"in_features=0",
        lambda t: kcprnn.FactorizedLinear(0, 4),
    ),
    (
        "negative rank",
        ValueError,
        r"rank=-1",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="tt", rank=-1),
    ),
    (
        "an option the format does not take",
        TypeError,
        r"format 'dense' \(DenseMatrix\) takes no option 'rank'; its options: in_modes",
        lambda t: kcprnn.LSTM(10, 8, format="dense", rank=4),
    ),
    (
        "a misspelt option",
        TypeError,
        r"format 'kcp' \(KCPMatrix\) takes no option 'ranks'; .*terms, rank, init",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="kcp", ranks=3),
    ),
    (
        "rank of the wrong type",
        TypeError,
        r"'abc' of type str",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="cp", rank="abc"),
    ),
    (
        "unknown format",
        ValueError,
        r"unknown format 'svd'",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="svd"),
    ),
    (
        "wrong input feature size",
        ValueError,
        r"in_features=24, got shape \(3, 23\)",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="tt")(torch.randn(3, 23)),
    ),
    (
        "integer weight dtype",
        TypeError,
        r"dtype=torch.int32",
        lambda t: kcprnn.FactorizedLinear(24, 16, dtype=torch.int32),
    ),
    (
        "modes that do not multiply to the size",
        ValueError,
        r"in_modes=\[2, 3, 5\] multiply to 30",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="tt", in_modes=[2, 3, 5]),
    ),
    (
        "HT with one mode",
        ValueError,
        r"in_modes=\[24\]",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="ht", num_modes=1),
    ),
    (
        "from_dense of a 3-D tensor",
        ValueError,
        r"shape \(2, 3, 4\)",
        lambda t: kcprnn.TTMatrix.from_dense(torch.randn(2, 3, 4)),
    ),
    (
        "unknown algorithm",
        ValueError,
        r"algorithm='magic'",
        lambda t: setattr(kcprnn.TTMatrix(24, 16), "algorithm", "magic"),
    ),
    # --- API: recurrent modules and cells ---
    (
        "LSTM input feature size",
        ValueError,
        r"Expected 10, got 9",
        lambda t: _lstm()(torch.randn(5, 3, 9)),
    ),
    (
        "LSTM h_0 shape",
        ValueError,
        r"Expected h_0 of size \(1, 3, 8\), got \(1, 3, 7\)",
        lambda t: _lstm()(torch.randn(5, 3, 10), (torch.zeros(1, 3, 7), torch.zeros(1, 3, 8))),
    ),
    (
        "LSTM hx not a tuple",
        TypeError,
        r"hx must be a tuple \(h_0, c_0\)",
        lambda t: _lstm()(torch.randn(5, 3, 10), torch.zeros(1, 3, 8)),
    ),
    (
        "4-D input",
        ValueError,
        r"got 4D instead",
        lambda t: _lstm()(torch.randn(5, 3, 10, 1)),
    ),
    (
        "factorized layer input dtype unlike its factors",
        TypeError,
        r"TTMatrix: input must have the type torch.float32, got type torch.float64",
        lambda t: kcprnn.FactorizedLinear(24, 16, format="tt")(
            torch.randn(3, 24, dtype=torch.float64)
        ),
    ),
    (
        "input dtype unlike the parameters",
        TypeError,
        r"LSTM: input must have the type torch.float32, got type torch.float64",
        lambda t: _lstm()(torch.randn(5, 3, 10, dtype=torch.float64)),
    ),
    (
        "PackedSequence with increasing batch sizes",
        ValueError,
        r"batch_sizes=\[2, 3, 1\]",
        lambda t: _lstm()(PackedSequence(torch.randn(6, 10), torch.tensor([2, 3, 1]))),
    ),
    (
        "PackedSequence rows unlike its batch sizes",
        ValueError,
        r"data has 7 rows but its batch_sizes sum to 6",
        lambda t: _lstm()(PackedSequence(torch.randn(7, 10), torch.tensor([3, 2, 1]))),
    ),
    (
        "GRU with a projection",
        ValueError,
        r"proj_size=2",
        lambda t: kcprnn.GRU(10, 8, proj_size=2),
    ),
    (
        "dropout out of range",
        ValueError,
        r"dropout=1.5",
        lambda t: kcprnn.LSTM(10, 8, num_layers=2, dropout=1.5),
    ),
    (
        "unknown nonlinearity",
        ValueError,
        r"'sigmoid'",
        lambda t: kcprnn.RNN(10, 8, nonlinearity="sigmoid"),
    ),
    (
        "hidden modes of the wrong product",
        ValueError,
        r"hidden_modes=\[2, 2, 3\] multiply to 12",
        lambda t: kcprnn.LSTM(10, 8, hidden_modes=[2, 2, 3]),
    ),
    (
        "from_torch of the wrong module",
        TypeError,
        r"expects a torch.nn.LSTM, got GRU",
        lambda t: kcprnn.LSTM.from_torch(nn.GRU(4, 3)),
    ),
    (
        "3-D input to a cell",
        ValueError,
        r"LSTMCell: Expected input to be 1D or 2D, got 3D",
        lambda t: kcprnn.LSTMCell(10, 8, format="dense")(torch.randn(2, 3, 10)),
    ),
    (
        "integer input to a cell",
        TypeError,
        r"GRUCell: input must have the type torch.float32, got type torch.int64",
        lambda t: kcprnn.GRUCell(4, 3, format="dense")(torch.ones(2, 4, dtype=torch.int64)),
    ),
    # --- command line ---
    (
        "unknown command",
        CliError,
        r"unknown command 'nonsense'",
        lambda t: cli("nonsense"),
    ),
    (
        "override not of the form --key=value",
        CliError,
        r"override 'lr=3' is not of the form --key=value",
        lambda t: cli("train", "--config", str(PRESET), "lr=3"),
    ),
    (
        "missing config file",
        CliError,
        r"config file '.*nope.toml' does not exist",
        lambda t: cli("train", "--config", str(t / "nope.toml")),
    ),
    (
        "unknown config key",
        CliError,
        r"unknown config key 'epoch'",
        lambda t: cli("train", "--config", str(PRESET), "--epoch=1"),
    ),
    (
        "config value of the wrong type",
        CliError,
        r"'epochs' must be of type int, got 1.5",
        lambda t: cli("train", "--config", str(PRESET), "--epochs=1.5"),
    ),
    (
        "unparsable override value",
        CliError,
        r"cannot parse '@@' as a TOML value",
        lambda t: cli("train", "--lr=@@"),
    ),
    (
        "compress without --out",
        CliError,
        r"the following arguments are required: --out",
        lambda t: cli("compress", str(t), "--format", "tt"),
    ),
    (
        "compress with an unknown format",
        CliError,
        r"unknown format 'svd'",
        lambda t: cli("compress", str(_saved(t)), "--out", str(t / "o"), "--format", "svd"),
    ),
    (
        "compress with an unknown option",
        CliError,
        r"unrecognized arguments: --bogus=1",
        lambda t: cli(
            "compress", str(_saved(t)), "--out", str(t / "o"), "--format=tt", "--bogus=1"
        ),
    ),
    (
        "compress to an unreachable compression",
        CliError,
        r"cannot compress a 16 x 12 matrix 1e\+06x",
        lambda t: cli(
            "compress", str(_saved(t)), "--out", str(t / "o"), "--format=tt", "--compression=1e6"
        ),
    ),
    (
        "compress of a run folder with a truncated checkpoint",
        CliError,
        r"checkpoint.safetensors' is truncated",
        lambda t: cli("compress", str(_cut_run(t)), "--out", str(t / "o"), "--format=tt"),
    ),
    # --- configuration files and values ---
    (
        "TOML syntax error",
        ConfigError,
        r"bad.toml: not valid TOML",
        lambda t: load_config(_write(t, "bad.toml", "epochs = = 3\n")),
    ),
    (
        "epochs out of range in a preset",
        ConfigError,
        r"range.toml: epochs must be >= 1, got epochs=0",
        lambda t: load_config(_write(t, "range.toml", "epochs = 0\n")),
    ),
    (
        "unknown hidden format in a preset, refused before any data loads",
        ConfigError,
        r"fmt.toml: hidden_format must be one of .*got hidden_format='svd'",
        lambda t: load_config(_write(t, "fmt.toml", 'hidden_format = "svd"\n')),
    ),
    (
        "test fraction out of range",
        ConfigError,
        r"got 1.5",
        lambda t: load_config(None, ["--test_fraction=1.5"]),
    ),
    (
        "unknown device",
        ConfigError,
        r"got 'tpu'",
        lambda t: load_config(None, ["--device=tpu"]),
    ),
    (
        "real data set without a folder",
        ConfigError,
        r"dataset='ucf11' is real data: set data_dir",
        lambda t: load_config(None, ["--dataset=ucf11"]),
    ),
    (
        "format options that are not a table",
        ConfigError,
        r"'format_options' must be of type dict, got 3",
        lambda t: load_config(None, ["--format_options=3"]),
    ),
    # --- data files ---
    (
        "SHD file that is not HDF5",
        SpikeFileError,
        r"garbage.h5: not a readable HDF5 file",
        lambda t: read_spike_file(_write(t, "garbage.h5", b"\0" * 100)),
    ),
    (
        "SHD file without spike times",
        SpikeFileError,
        r"missing field 'spikes/times'",
        lambda t: read_spike_file(_h5_labels_only(t)),
    ),
    (
        "SHD spikes on a unit outside 0..699",
        SpikeFileError,
        r"unit 900 \(sample 0\) outside 0..699",
        lambda t: read_spike_file(_spike_file(t, [3, 900])),
    ),
    (
        "cache array that is not .npy",
        ValueError,
        r"frames.npy' is not a readable .npy array",
        lambda t: load_npy(_write(t, "frames.npy", b"garbage" * 10)),
    ),
    (
        "cache array holding objects (a pickle)",
        ValueError,
        r"objects.npy' is not a readable .npy array \(Object arrays cannot be loaded",
        lambda t: load_npy(_object_npy(t)),
    ),
    (
        "corrupt stand-in cache record",
        ValueError,
        r"meta.json' is not a stand-in cache record",
        lambda t: _corrupt_standin_cache(t),
    ),
    # --- checkpoints and saved models ---
    (
        "torch.save file",
        LoadError,
        r"model.pt' is a zip archive \(torch.save's format\), which holds a pickle",
        lambda t: kcprnn.load(_torch_saved(t)),
    ),
    (
        "legacy pickle",
        LoadError,
        r"legacy.pkl' is a pickle file",
        lambda t: kcprnn.load(_write(t, "legacy.pkl", pickle.dumps({"w": [1.0]}, protocol=4))),
    ),
    (
        "empty file",
        LoadError,
        r"empty.safetensors' is not a safetensors file: 0 bytes",
        lambda t: kcprnn.load(_write(t, "empty.safetensors", b"")),
    ),
    (
        "truncated file",
        LoadError,
        r"is truncated: the header describes [\d,]+ bytes of tensor data, the file holds",
        lambda t: kcprnn.load(_write(t, "cut.safetensors", _saved(t).read_bytes()[:-3])),
    ),
    (
        "header that is not JSON",
        LoadError,
        r"header is not a JSON object",
        lambda t: kcprnn.load(_write(t, "x.safetensors", (16).to_bytes(8, "little") + b"x" * 16)),
    ),
    (
        "tensor shape unlike the configuration",
        LoadError,
        r"tensor 'cells.0.weight_ih.cores.\d' has shape \(\d+, \d+, \d+, \d+\) in the file, "
        r"the configuration needs",
        lambda t: kcprnn.load(_saved(t, _other_rank)),
    ),
    (
        "configuration of a matrix whose size differs",
        LoadError,
        r"invalid model configuration: .*out_features=12",
        lambda t: kcprnn.load(
            _saved(t, lambda d: d["module"]["cells"][0]["matrices"]["hh"].update(out_features=12))
        ),
    ),
    (
        "class outside the allow-list",
        LoadError,
        r"class 'subprocess.Popen' is not one kcprnn loads",
        lambda t: kcprnn.load(
            _saved(t, lambda d: d["module"].update({"class": "subprocess.Popen"}))
        ),
    ),
    (
        "newer format version",
        LoadError,
        r"format_version=99",
        lambda t: kcprnn.load(_saved(t, lambda d: d.update(format_version=99))),
    ),
    (
        "unknown format in a saved configuration",
        LoadError,
        r"unknown format 'svd'",
        lambda t: kcprnn.load(
            _saved(t, lambda d: d["module"]["cells"][0]["matrices"]["ih"].update(format="svd"))
        ),
    ),
    (
        "run folder with a corrupt checkpoint.json",
        ValueError,
        r"checkpoint.json' is not a valid checkpoint record",
        lambda t: load_checkpoint(_corrupt_record(t)),
    ),
    (
        "run folder without a checkpoint",
        FileNotFoundError,
        r"missing checkpoint.json",
        lambda t: load_checkpoint(t),
    ),
    (
        "saving a class kcprnn cannot rebuild",
        TypeError,
        r"cannot save a torch.nn.modules.linear.Linear",
        lambda t: kcprnn.save(nn.Linear(3, 2), t / "x.safetensors"),
    ),
]


def _corrupt_record(tmp: Path) -> Path:
    """A run folder whose checkpoint.json was cut mid-write by something other than kcprnn."""
    run = tmp / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text('{"weights": "checkpoint-0-0')
    return run


def _cut_run(tmp: Path) -> Path:
    """A run folder whose checkpoint lost its last bytes."""
    run = tmp / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text("{}")
    (run / "checkpoint.safetensors").write_bytes(_saved(tmp).read_bytes()[:-10])
    return run


def _h5_labels_only(tmp: Path) -> Path:
    path = tmp / "labels_only.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.zeros(3, np.int64))
    return path


def _object_npy(tmp: Path) -> Path:
    path = tmp / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


def _torch_saved(tmp: Path) -> Path:
    path = tmp / "model.pt"
    torch.save(kcprnn.LSTM(4, 2, format="dense").state_dict(), path)
    return path


def test_the_table_is_long_and_distinct():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("error", "pattern", "make"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_clear_error(tmp_path, error, pattern, make):
    with pytest.raises(error, match=pattern):
        make(tmp_path)


# --- a run writes only into its run folder and its cache ---------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_a_training_run_writes_only_its_run_folder_and_cache(tmp_path, monkeypatch):
    from kcprnn.data import load_source_images
    from kcprnn.experiments.config import Config
    from kcprnn.experiments.train import train

    try:
        load_source_images()
    except FileNotFoundError as exc:  # system data (apt package), not a Python package
        pytest.skip(str(exc))
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    (cwd / "keep.txt").write_text("a file that must stay as it is")
    cache, run = tmp_path / "cache", tmp_path / "runs" / "tiny"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    repo = Path(__file__).resolve().parents[1]
    repo_before = _tree(repo / "src") | {
        f"experiments/{k}": v for k, v in _tree(repo / "experiments").items()
    }
    before = _tree(tmp_path)
    cfg = Config(
        dataset="ucf11-like",
        clips_per_class=2,
        num_frames=2,
        frame_width=16,
        frame_height=12,
        hidden_size=8,
        hidden_modes=(2, 2, 2),
        format="kcp",
        format_options={"rank": 2},
        batch_size=4,
        epochs=1,
        progress=False,
        threads=1,
        out_dir=str(run),
    )
    train(cfg)
    after = _tree(tmp_path)
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    outside = sorted(k for k in changed if not k.startswith(("runs/tiny/", "cache/")))
    # (files only: the empty folder torch makes in the temp directory is checked below)
    assert outside == []
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.json"} <= names
    weights = json.loads((run / "checkpoint.json").read_text())["weights"]
    assert weights in names and weights.endswith(".safetensors")
    assert any(k.startswith("cache/standins/") for k in changed)  # the stand-in went to the cache
    assert not list(run.glob("*.tmp"))
    # torch itself (Adam's first step) makes an empty torchinductor_<user> folder in the temp
    # directory; nothing else may appear there
    left = [p for p in tmp.iterdir() if not (p.name.startswith("torchinductor_") and p.is_dir())]
    assert left == [] and all(not any(p.iterdir()) for p in tmp.iterdir())
    repo_after = _tree(repo / "src") | {
        f"experiments/{k}": v for k, v in _tree(repo / "experiments").items()
    }
    assert {k for k in repo_after if repo_before.get(k) != repo_after[k]} == set()


def test_the_input_dtype_check_lets_autocast_mix_dtypes():
    lstm, cell = kcprnn.LSTM(10, 8, format="dense"), kcprnn.GRUCell(10, 8, format="tt")
    x = torch.randn(5, 3, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lstm(x)[0].dtype == torch.bfloat16 and cell(x[0]).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="GRUCell: input must have the type torch.float32"):
        cell(x[0])  # outside autocast the same input is refused


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_follow_torch_under_autocast_and_after_it(name):
    """Under CPU autocast a compressed cell steps as ``torch.nn``'s does (its output dtype for
    float32 and bfloat16 inputs, with and without gradients), and the dense weights it keeps
    there are in the parameters' dtype, so the same cell steps in float32 after it."""
    torch.manual_seed(0)
    ours = getattr(kcprnn, name)(10, 8, format="tt", hidden_format="tt")
    ref = getattr(torch.nn, name)(10, 8)
    with torch.no_grad():
        ref.weight_ih.copy_(ours.weight_ih.to_dense())
        ref.weight_hh.copy_(ours.weight_hh.to_dense())
        ref.bias_ih.copy_(ours.bias_ih)
        ref.bias_hh.copy_(ours.bias_hh)
    x = torch.randn(3, 10)
    h = (torch.zeros(3, 8), torch.zeros(3, 8)) if name == "LSTMCell" else torch.zeros(3, 8)

    def first(out):
        return out[0] if name == "LSTMCell" else out

    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for given in (x, x.bfloat16()):
                    got, want = first(ours(given, h)), first(ref(given, h))
                    assert got.dtype == want.dtype
                    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            got = first(ours(x, h))  # outside autocast again: float32, the same values
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, first(ref(x, h)), rtol=1e-5, atol=1e-6)
