"""Config: TOML presets, --key=value overrides, clear errors naming the key."""

import pytest

from kcprnn.experiments.config import Config, ConfigError, load_config
from kcprnn.experiments.train import main as train_main


def _preset(tmp_path, text):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_preset_and_overrides(tmp_path):
    path = _preset(
        tmp_path,
        'format = "tt"\nlr = 1e-3\nepochs = 3\n\n[format_options]\n'
        "in_modes = [8, 20, 20, 18]\nrank = 4\n",
    )
    cfg = load_config(
        path,
        ["--epochs=5", "--format_options.rank=2", "--split=group", "--hidden_modes=[2, 2, 4, 16]"],
    )
    assert cfg == Config(
        format="tt",
        lr=1e-3,
        epochs=5,
        split="group",
        name="exp",
        hidden_modes=(2, 2, 4, 16),
        format_options={"in_modes": (8, 20, 20, 18), "rank": 2},
    )
    assert cfg.run_dir.as_posix() == "runs/exp"
    assert cfg.to_dict()["format_options"]["in_modes"] == [8, 20, 20, 18]
    # an int is accepted for a float field and stored as float
    assert load_config(None, ["--lr=1"]).lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--lrr=1", "unknown config key 'lrr'"),
        ("--lr=fast", "'lr' must be of type float"),
        ("--epochs=2.5", "'epochs' must be of type int"),
        ("--progress=1", "'progress' must be of type bool"),
        ("--cell=rnn", "cell must be one of"),
        ("--test_fraction=1.5", "test_fraction must lie in"),
        ("--device=gpu", "device must be"),
        ("--dataset=ucf11", "set data_dir"),
        ("lr=1", "not of the form --key=value"),
        ("--band_warp=-0.1", r"band_warp must lie in \[0, 1\), got band_warp=-0.1"),
        ("--ema=1.0", r"ema must lie in \[0, 1\), got ema=1.0"),
        ("--band_warp=0.1", r"band_warp=0.1 warps the mel bands.*'ucf11-like' has none"),
        ("--spectral_tilt=-1", r"spectral_tilt must be finite and >= 0, got spectral_tilt=-1"),
        ("--spectral_tilt=inf", r"spectral_tilt must be finite and >= 0, got spectral_tilt=inf"),
        ("--spectral_tilt=0.5", r"spectral_tilt=0.5 offsets the mel bands.*'ucf11-like' has none"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_preset_names_the_file_and_key(tmp_path):
    path = _preset(tmp_path, "batch = 16\n")
    with pytest.raises(ConfigError, match=r"exp\.toml.*unknown config key 'batch'"):
        load_config(path)
    path = _preset(tmp_path, 'epochs = "ten"\n')
    with pytest.raises(ConfigError, match=r"exp\.toml.*'epochs' must be of type int"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_config_errors(tmp_path, capsys):
    path = _preset(tmp_path, "epochs = 1\n")
    assert train_main(["--config", str(path), "--optimizer=sgd"]) == 2
    assert "unknown config key 'optimizer'" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err
