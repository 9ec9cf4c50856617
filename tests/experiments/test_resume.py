"""Resuming a run: a SIGKILL mid-epoch and a checkpoint write cut short both resume to the same
parameters (bit for bit, CPU, one thread) and metrics as an uninterrupted run; extending a run;
the checkpoint files; clear errors."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_speech_train import tiny_timit_run

from kcprnn.experiments.config import Config, ConfigError
from kcprnn.experiments.loop import lr_factor, read_checkpoint
from kcprnn.experiments.train import main, resume_config, train

SRC = Path(__file__).resolve().parents[2] / "src"
TIMING = ("epoch_seconds", "eval_seconds")
SKIP = ("seconds_per_epoch", "name")  # summary keys that differ between equal runs

# youtube-like: 47 training clips, batches of 4 -> 12 steps per epoch, 36 in all; a checkpoint
# every 5 steps (5, 10, 15, ...) and after each epoch (12, 24, 36)
pytestmark = pytest.mark.usefixtures("source_images")

TINY = dict(
    dataset="youtube-like",
    clips_per_class=2,
    num_frames=3,
    frame_width=32,
    frame_height=24,
    hidden_size=16,
    hidden_modes=(2, 2, 2, 2),
    format="tt",
    format_options={"in_modes": (4, 8, 8, 9), "rank": 2},
    batch_size=4,
    lr=1e-2,
    epochs=3,
    seed=3,
    checkpoint_every=5,
    progress=False,
    threads=1,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted run of :data:`TINY`."""
    run = tmp_path_factory.mktemp("reference")
    train(Config(**TINY, cache_dir=str(cache), out_dir=str(run)))
    return run


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def cli_args(values: dict) -> list[str]:
    """``--key=value`` overrides that rebuild ``Config(**values)``."""
    args = []
    for key, value in values.items():
        if isinstance(value, dict):
            args += [f"--{key}.{k}={_toml(v)}" for k, v in value.items()]
        else:
            args.append(f"--{key}={_toml(value)}")
    return args


def weights(run: Path) -> dict[str, torch.Tensor]:
    record, path, _ = read_checkpoint(run)
    return load_file(path)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert metrics(run) == metrics(ref)
    summary, ref_summary = (
        {k: v for k, v in json.loads((r / "summary.json").read_text()).items() if k not in SKIP}
        for r in (run, ref)
    )
    assert summary == ref_summary


def killed_at_third_save(monkeypatch, cfg: Config) -> None:
    """Train ``cfg`` until its third checkpoint commit fails (a run killed while saving)."""
    real_replace, commits = os.replace, []

    def fail_third_commit(src, dst):
        if Path(dst).name == "checkpoint.json":
            commits.append(dst)
            if len(commits) == 3:
                raise OSError("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_third_commit)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.setattr(os, "replace", real_replace)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, cache, reference):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    # the child stops before its 18th optimizer step (epoch 2, after the checkpoint at step 15)
    # and waits there to be killed: steps 16 and 17 are lost and done again after resuming
    child = textwrap.dedent(
        """
        import sys, time, torch
        from kcprnn.experiments.train import main
        calls = 0
        step = torch.optim.Adam.step
        def stalling_step(self, *args, **kwargs):
            global calls
            calls += 1
            if calls == 18:
                open(sys.argv[1], "w").close()
                time.sleep(120)
            return step(self, *args, **kwargs)
        torch.optim.Adam.step = stalling_step
        sys.exit(main(sys.argv[2:]))
        """
    )
    args = cli_args({**TINY, "cache_dir": str(cache), "out_dir": str(run)})
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    err = tmp_path / "child.err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", child, str(ready), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the child never reached step 18"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    record, _, _ = read_checkpoint(run)
    assert (record["epoch"], record["step"], record["global_step"]) == (1, 3, 15)
    assert len(metrics(run)) == 1 and not (run / "summary.json").exists()

    assert main(["--resume", str(run)]) == 0
    assert_same_run(run, reference)
    assert "resumed at epoch 2, step 3" in (run / "run.log").read_text()


@pytest.mark.parametrize("fail_at", ["trainstate", "checkpoint.json"])
def test_checkpoint_write_cut_short_keeps_the_previous_one(
    tmp_path, cache, reference, monkeypatch, fail_at
):
    run = tmp_path / "run"
    real_replace = os.replace
    commits = []

    def replace(src, dst):
        name = Path(dst).name
        # the 3rd save (global step 12, end of epoch 1) fails after writing its weights file
        # ("trainstate"), or after both tensor files, just before the commit ("checkpoint.json")
        if name.startswith(fail_at) and len(commits) == 2:
            raise OSError("disk full (simulated)")
        real_replace(src, dst)
        if name == "checkpoint.json":
            commits.append(name)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        train(Config(**TINY, cache_dir=str(cache), out_dir=str(run)))
    monkeypatch.setattr(os, "replace", real_replace)

    # the previous checkpoint (global step 10) is intact, next to the orphans of the failed save
    record, weights_path, state_path = read_checkpoint(run)
    assert (record["epoch"], record["step"], record["global_step"]) == (0, 10, 10)
    assert state_path is not None and load_file(state_path)["rng/torch"].dtype == torch.uint8
    assert len(load_file(weights_path)) == len(weights(reference))
    assert len(list(run.glob("checkpoint-*.safetensors"))) == 2
    assert not list(run.glob("*.tmp"))

    assert main(["--resume", str(run)]) == 0
    assert_same_run(run, reference)
    # the next save removed the orphans: one weights and one train-state file remain
    assert len(list(run.glob("checkpoint-*.safetensors"))) == 1
    assert len(list(run.glob("trainstate-*.safetensors"))) == 1


def test_checkpoint_record_contents(reference):
    record, weights_path, state_path = read_checkpoint(reference)
    assert (
        record["config"]
        == Config(**TINY, cache_dir=record["config"]["cache_dir"], out_dir=str(reference)).to_dict()
    )
    assert (record["epoch"], record["step"], record["global_step"]) == (3, 0, 36)
    assert record["scheduler"] is None and record["world_size"] == 1
    assert [r["epoch"] for r in record["history"]] == [1, 2, 3]
    assert record["metrics"] == record["history"][-1]
    # RNG states: torch's as a tensor; NumPy's (batch order and global) and Python's as JSON
    state = load_file(state_path)
    assert state["rng/torch"].dtype == torch.uint8
    assert record["rng"]["numpy_epoch"]["bit_generator"] == "PCG64"
    assert record["rng"]["numpy_global"][0] == "MT19937"
    assert len(record["rng"]["python"][1]) == 625
    # Adam: moments as tensors, the step count with them, hyperparameters in JSON
    assert record["optimizer"]["param_groups"][0]["lr"] == TINY["lr"]
    assert record["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    n_params = len(record["optimizer"]["param_groups"][0]["params"])
    assert sum(k.endswith("/exp_avg") for k in state) == n_params
    assert float(state["optimizer/0/step"]) == 36
    assert weights_path.name.startswith("checkpoint-0003-000000-")


def test_extending_a_finished_run_equals_a_longer_run(tmp_path, cache, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert main(["--resume", str(run), "--epochs=4", "--no-progress"]) == 0
    longer = tmp_path / "longer"
    train(Config(**{**TINY, "epochs": 4}, cache_dir=str(cache), out_dir=str(longer)))
    assert_same_run(run, longer)
    assert metrics(run)[:3] == metrics(reference)
    assert json.loads((run / "config.json").read_text())["epochs"] == 4


def test_speech_run_resumes_bit_identical(tmp_path, monkeypatch):
    common = tiny_timit_run(
        tmp_path,
        format="tt",
        num_layers=2,
        dropout=0.3,  # its masks come from the saved RNG state as well
        band_warp=0.2,  # and so do the warp factors
        ema=0.9,  # the averages and the live parameters both come back
        batch_size=1,
        checkpoint_every=1,
    )
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(Config(**common, out_dir=str(ref)))
    killed_at_third_save(monkeypatch, Config(**common, out_dir=str(run)))
    # 2 utterances, batches of 1: saves at step 1 (mid-epoch), 2 (end of epoch 1), 3 (failed)
    record, _, _ = read_checkpoint(run)
    assert (record["epoch"], record["step"]) == (1, 0)
    assert main(["--resume", str(run)]) == 0
    assert_same_run(run, ref)
    assert "test_per" in metrics(run)[-1]


def test_clear_errors(tmp_path, cache, reference, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "no run to resume" in capsys.readouterr().err
    # a run folder whose checkpoint is gone
    shutil.copy(reference / "config.json", empty / "config.json")
    assert main(["--resume", str(empty)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    # only keys that leave the steps taken alone may change
    assert main(["--resume", str(reference), "--lr=0.1"]) == 2
    assert "--lr=0.1" in capsys.readouterr().err
    assert main(["--resume", str(reference), "--format_options.rank=3"]) == 2
    assert "only ['epochs'" in capsys.readouterr().err
    assert main(["--resume", str(reference), "--config", "x.toml"]) == 2
    assert "drop --config" in capsys.readouterr().err
    # fewer epochs than the run has done
    assert main(["--resume", str(reference), "--epochs=2"]) == 2
    assert "already completed 3 epochs" in capsys.readouterr().err
    # a checkpoint written under another config
    other = Config(**{**TINY, "lr": 5e-3}, cache_dir=str(cache), out_dir=str(reference))
    with pytest.raises(ConfigError, match=r"another config \(lr: 0.01 -> 0.005\)"):
        train(other, resume=True)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 0, got checkpoint_every=-1"):
        Config(checkpoint_every=-1)
    # the record names a file that is missing
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    for p in broken.glob("trainstate-*"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="trainstate-0003-000000-.*missing"):
        train(resume_config(broken), resume=True)


def test_cosine_schedule_resumes_bit_identical(tmp_path, cache, reference, monkeypatch):
    """``lr_schedule="cosine"``: the rates follow ``0.5 (1 + cos(pi k / 36))`` over the 36
    optimizer steps (each epoch's metrics line gives its last step's rate), the run differs from
    the constant-rate one, and a run whose third save fails resumes to the same parameters and
    metrics as an uninterrupted one."""
    cosine = {**TINY, "lr_schedule": "cosine"}
    ref = tmp_path / "ref"
    train(Config(**cosine, cache_dir=str(cache), out_dir=str(ref)))
    rates = [r["lr"] for r in metrics(ref)]
    expected = [TINY["lr"] * 0.5 * (1 + math.cos(math.pi * k / 36)) for k in (11, 23, 35)]
    assert rates == pytest.approx(expected, rel=1e-12)
    a, b = weights(ref), weights(reference)
    assert any(not torch.equal(a[k], b[k]) for k in a)

    run = tmp_path / "run"
    killed_at_third_save(monkeypatch, Config(**cosine, cache_dir=str(cache), out_dir=str(run)))
    record, _, _ = read_checkpoint(run)
    assert record["global_step"] == 10
    assert record["optimizer"]["param_groups"][0]["initial_lr"] == TINY["lr"]
    assert main(["--resume", str(run)]) == 0
    assert_same_run(run, ref)


def test_lr_factor_and_schedule_errors():
    assert [lr_factor("cosine", k, 4) for k in range(6)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.sqrt(0.5), 0.5, 0.5 - 0.5 * math.sqrt(0.5), 0.0, 0.0]
    )
    assert lr_factor("constant", 3, 4) == 1.0
    with pytest.raises(ConfigError, match=r"lr_schedule must be one of .*got lr_schedule='linear'"):
        Config(**{**TINY, "lr_schedule": "linear"})
