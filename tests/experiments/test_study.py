"""``kcprnn study``: the grid on a tiny FSDD-like file, resuming, and the aggregation math."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kcprnn.cli import main as cli_main
from kcprnn.data.fsdd import write_digits
from kcprnn.experiments.config import ConfigError, load_config
from kcprnn.experiments.study import (
    DEFAULT,
    RunSpec,
    aggregate,
    metric_goal,
    paired,
    parse_budget,
    plan_runs,
    read_runs,
    run_config,
    run_study,
    study_config,
)
from kcprnn.experiments.study_tables import RunResult

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


@pytest.fixture
def tiny_digits(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    utts = [(y + 0.1 * rng.standard_normal((4, 13))).astype(np.float32) for y in labels]
    return write_digits(tmp_path / "digits.npz", utts, labels)


def study_args(digits: Path, out: Path, *extra: str) -> list[str]:
    return [
        "study",
        "--preset",
        str(CONFIGS / "fsdd_dense.toml"),
        "--formats",
        "dense,tt,kcp",
        "--budgets",
        "0.5,default,0.5:1",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"data_dir={digits}",
        "--set",
        "hidden_size=8",
        "--set",
        "epochs=1",
        *extra,
    ]


def test_grid_runs_resumes_and_aggregates(tiny_digits, tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(study_args(tiny_digits, out)) == 0
    first = capsys.readouterr().out
    assert "runs: 14 done, 0 skipped" in first  # dense x 2 seeds + (tt, kcp) x 3 budgets x 2
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert "kcp-0.5-s1" in runs and "dense-default-s0" in runs and "dense-0.5-s0" not in runs
    config = json.loads((out / "runs" / "tt-0.5-s0" / "config.json").read_text())
    assert config["format"] == config["hidden_format"] == "tt"
    assert config["format_options"] == {"rank": 0.5} == config["hidden_options"]
    assert config["seed"] == 0 and config["threads"] == 1
    summary = json.loads((out / "runs" / "tt-0.5-s0" / "summary.json").read_text())
    dense_params = 4 * 8 * (13 + 8)
    assert summary["recurrent_params"] <= 0.5 * dense_params
    for name in ("study.csv", "study.md", "paired.csv", "paired.md", "study.png", "runs.csv"):
        assert (out / name).is_file(), name
    listed = (out / "runs.csv").read_text().splitlines()
    assert len(listed) == 1 + 14 and listed[0].startswith("format,budget,seed,test_acc (%)")
    row = next(r.split(",") for r in listed if r.startswith("tt,0.5,0,"))
    assert float(row[3]) == pytest.approx(100 * summary["test_acc"], abs=0.005)
    assert int(row[4]) == summary["recurrent_params"]
    stamp = (out / "runs" / "tt-0.5-s0" / "summary.json").stat().st_mtime_ns
    # a rerun skips every finished run and rewrites the same table
    table = (out / "study.csv").read_text()
    assert cli_main(study_args(tiny_digits, out)) == 0
    assert "runs: 0 done, 14 skipped" in capsys.readouterr().out
    assert (out / "runs" / "tt-0.5-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert (out / "study.csv").read_text() == table
    # a removed summary is run again, in a spawned worker process
    (out / "runs" / "kcp-default-s1" / "summary.json").unlink()
    (out / "runs" / "tt-default-s1" / "summary.json").unlink()
    assert cli_main(study_args(tiny_digits, out, "--jobs", "2")) == 0
    assert "runs: 2 done, 12 skipped" in capsys.readouterr().out
    split = json.loads((out / "runs" / "kcp-ih0.5-hh1-s0" / "config.json").read_text())
    assert split["format_options"] == {"rank": 0.5} and split["hidden_options"] == {"rank": 1.0}
    assert "ih0.5-hh1" in (out / "study.csv").read_text()
    assert "best other (highest mean)" in (out / "paired.md").read_text()
    # the same runs read as a metric that is better low
    assert cli_main(study_args(tiny_digits, out, "--aggregate-only", "--goal", "min")) == 0
    assert "best other (lowest mean)" in (out / "paired.md").read_text()


def fake_run(root: Path, fmt: str, budget, seed: int, acc: float, params: int) -> None:
    run = root / "runs" / f"{fmt}-{budget}-s{seed}"
    run.mkdir(parents=True)
    options = {} if budget == DEFAULT else {"rank": budget}
    (run / "config.json").write_text(
        json.dumps(
            {"format": fmt, "seed": seed, "format_options": options, "hidden_options": options}
        )
    )
    summary = {
        "test_acc": acc,
        "recurrent_params": params,
        "recurrent_compression": 1000 / params,
        "seconds_per_epoch": 2.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))


def test_aggregation_math(tmp_path):
    accs = {
        ("kcp", 0.1): [0.90, 0.94, 0.92],
        ("tt", 0.1): [0.91, 0.93, 0.95],
        ("ht", 0.1): [0.80, 0.82, 0.84],
        ("dense", DEFAULT): [0.97, 0.99, 0.98],
        ("kcp", 0.01): [0.70, 0.72],  # seed 2 missing: 2 pairs
        ("ht", 0.01): [0.60, 0.70, 0.65],
    }
    for (fmt, budget), values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path, fmt, budget, seed, acc, 100 if budget == 0.1 else 10)
    results = read_runs(tmp_path)
    rows = {(r.format, r.budget): r for r in aggregate(results)}
    kcp = rows[("kcp", 0.1)]
    assert kcp.runs == 3 and math.isclose(kcp.mean, 0.92)
    assert math.isclose(kcp.std, 0.02)  # deviations -0.02, 0.02, 0: sqrt(0.0008 / 2)
    assert math.isclose(rows[("kcp", 0.01)].std, math.sqrt(0.0002))
    assert rows[("kcp", 0.1)].recurrent_compression == 10.0
    assert math.isclose(rows[("dense", DEFAULT)].mean, 0.98)
    pairs = {p.budget: p for p in paired(results)}
    # budget 0.1: the best other is tt (mean 0.93); differences -0.01, 0.01, -0.03
    p = pairs[0.1]
    assert p.other == "tt" and p.pairs == 3
    assert math.isclose(p.mean_diff, -0.01)
    assert math.isclose(p.std_diff, 0.02)  # deviations 0, 0.02, -0.02
    # budget 0.01: ht, seeds 0 and 1 only: 0.10 and 0.02
    p = pairs[0.01]
    assert p.other == "ht" and p.pairs == 2
    assert math.isclose(p.mean_diff, 0.06) and math.isclose(p.std_diff, math.sqrt(0.0032))
    assert math.isclose(p.other_mean, 0.65)


def test_a_metric_missing_from_the_summary_comes_from_the_last_epoch(tmp_path):
    fake_run(tmp_path, "kcp", 0.1, 0, 0.9, 100)
    run = tmp_path / "runs" / "kcp-0.1-s0"
    epochs = [{"epoch": 1, "dev_cer": 0.5}, {"epoch": 2, "dev_cer": 0.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (result,) = read_runs(tmp_path, "dev_cer")
    assert result.metric == 0.25
    assert read_runs(tmp_path, "test_acc")[0].metric == 0.9  # the summary's own first
    with pytest.raises(ConfigError, match="no metric 'test_cer'.*last epoch"):
        read_runs(tmp_path, "test_cer")


def test_paired_error_rate_takes_the_lowest_other():
    """For an error rate the best other format is the one with the lowest mean, and the
    differences stay KCP - other (negative: KCP ahead)."""
    per = {"kcp": [0.40, 0.44], "tt": [0.42, 0.46], "ht": [0.50, 0.52]}
    results = [
        RunResult(fmt, 0.01, seed, value, 100, 10.0, 1.0)
        for fmt, values in per.items()
        for seed, value in enumerate(values)
    ]
    assert metric_goal("test_per") == "min" and metric_goal("dev_wer") == "min"
    assert metric_goal("test_loss") == "min" and metric_goal("test_acc") == "max"
    (low,) = paired(results, goal="min")
    assert low.other == "tt" and math.isclose(low.mean_diff, -0.02)
    assert math.isclose(low.other_mean, 0.44) and low.pairs == 2
    (high,) = paired(results)  # read as an accuracy, HT would be the best other
    assert high.other == "ht" and math.isclose(high.mean_diff, -0.09)
    with pytest.raises(ValueError, match="goal"):
        paired(results, goal="lowest")


def test_plan_and_budget_parsing():
    specs = plan_runs(["dense", "kcp"], [0.1, DEFAULT], [0, 1])
    assert specs == [
        RunSpec("dense", DEFAULT, 0),
        RunSpec("kcp", 0.1, 0),
        RunSpec("kcp", DEFAULT, 0),
        RunSpec("dense", DEFAULT, 1),
        RunSpec("kcp", 0.1, 1),
        RunSpec("kcp", DEFAULT, 1),
    ]
    assert RunSpec("tt", 0.001, 2).run_id == "tt-0.001-s2"
    assert parse_budget("1/50") == 0.02 and parse_budget("default") == DEFAULT
    assert parse_budget("0.25:1/50") == (0.25, 0.02)
    assert RunSpec("kcp", (0.25, 0.02), 0).run_id == "kcp-ih0.25-hh0.02-s0"
    for bad in ("0", "1.5", "-0.1", "nan", "abc", "0.1:2"):
        with pytest.raises(ConfigError):
            parse_budget(bad)


def test_failed_runs_are_recorded_and_retried(tmp_path):
    base = load_config(CONFIGS / "fsdd_dense.toml")

    def boom(values):
        raise RuntimeError("no data here")

    outcome = run_study(base, [RunSpec("tt", 0.5, 0)], tmp_path, runner=boom, progress=False)
    assert outcome == {"done": [], "skipped": [], "failed": ["tt-0.5-s0"]}
    assert "no data here" in (tmp_path / "runs" / "tt-0.5-s0" / "error.txt").read_text()


def test_bad_arguments(tmp_path, capsys):
    args = ["study", "--preset", str(CONFIGS / "fsdd_dense.toml"), "--out", str(tmp_path)]
    assert cli_main([*args, "--formats", "kcp,nope"]) == 2
    assert "unknown formats ['nope']" in capsys.readouterr().err
    assert cli_main([*args, "--budgets", "2"]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_empty_study_writes_tables_without_a_plot(tmp_path, capsys):
    args = ["study", "--preset", str(CONFIGS / "fsdd_dense.toml"), "--out", str(tmp_path)]
    assert cli_main([*args, "--aggregate-only"]) == 0
    assert (tmp_path / "study.csv").read_text().startswith("format,budget,runs,")
    assert not (tmp_path / "study.png").exists()
    capsys.readouterr()


def test_set_format_options_reach_every_compressed_run(tmp_path):
    # the preset's own KCP options are dropped; options given with --set go to every
    # compressed run next to its budget's rank, and never to dense
    preset = CONFIGS / "shd-like_kcp.toml"
    assert load_config(preset, []).format_options  # the preset has options of its own
    base = study_config(preset, ["format_options.init=orthogonal", "epochs=2"])
    assert base.epochs == 2
    assert base.format_options == {"init": "orthogonal"} and base.hidden_options == {}
    kcp = run_config(base, RunSpec("kcp", (0.25, 0.02), 1), tmp_path)
    assert kcp.format_options == {"init": "orthogonal", "rank": 0.25}
    assert kcp.hidden_options == {"rank": 0.02}
    assert run_config(base, RunSpec("kcp", DEFAULT, 0), tmp_path).format_options == {
        "init": "orthogonal"
    }
    dense = run_config(base, RunSpec("dense", DEFAULT, 0), tmp_path)
    assert dense.format_options == {} == dense.hidden_options
    plain = study_config(preset, [])
    assert plain.format_options == {} == plain.hidden_options


_PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from kcprnn.experiments.study import exit_with_parent

def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=exit_with_parent,
                               initargs=(os.getpid(), 0.1))
    pool.submit(work, sys.argv[1])
    while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
        time.sleep(0.05)
    os._exit(0)  # as if killed: no shutdown of the pool
"""


def test_pool_workers_end_when_the_study_is_killed(tmp_path):
    """A study's pool workers watch their parent: killed without shutting its pool down, the
    parent leaves no worker training on (a spawn worker otherwise finishes its run)."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    marker = tmp_path / "worker.pid"
    subprocess.run([sys.executable, str(script), str(marker)], check=True, timeout=60)
    worker = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), f"worker {worker} outlived its parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"
