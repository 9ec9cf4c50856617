"""``kcprnn demo``: its models at one parameter budget, its configs, the summary over seeds, the
reading of the numbers, and a tiny end-to-end run."""

import dataclasses
import json
import math
import statistics

import numpy as np
import pytest

import kcprnn
from kcprnn.experiments import demo, report


def _w_ih(name: str):
    spec = demo.DEMO_MODELS[name]
    lstm = kcprnn.LSTM(
        57600,
        256,
        batch_first=True,
        format=spec.format,
        hidden_modes=[4, 4, 4, 4],
        device="meta",
        **spec.options,
    )
    return lstm.cell(0, 0).weight_ih


def test_matched_models_share_one_budget_and_the_extreme_point_is_far_below():
    counts = {m: _w_ih(m).num_params for m in demo.DEMO_MODELS if m != "dense"}
    # the published UCF11 counts anchor the budget
    assert counts["tt"] == 3360 and counts["bt"] == 3392
    # KCP: P * R * 78 (interleaved) or P * R * 193 (blocked)
    assert counts["kcp"] == 43 * 78 and counts["kcp-p2"] == 2 * 21 * 78
    assert counts["kcp-blocked"] == 17 * 193 and counts["kcp-r1"] == 78
    for name, spec in demo.DEMO_MODELS.items():
        if spec.group == "matched":
            assert abs(counts[name] - 3360) <= 0.1 * 3360, (name, counts[name])
    assert demo.DEMO_MODELS["kcp-r1"].group == "extreme"
    assert _w_ih("kcp-r1").compression_ratio > 7e5


def test_demo_configs_share_one_protocol(tmp_path):
    models = list(demo.DEMO_MODELS)
    configs = demo.demo_configs(
        tmp_path, models, seeds=[0, 1], epochs=2, dense_ih_lr=3e-6, dense_seeds=None
    )
    assert [c.name for c in configs] == [f"{m}-s{s}" for s in (0, 1) for m in models]
    assert [c.seed for c in configs] == [0] * len(models) + [1] * len(models)
    for c in configs:
        assert (c.dataset, c.epochs, c.batch_size, c.num_frames, c.hidden_format, c.lr) == (
            "ucf11-like",
            2,
            16,
            6,
            "dense",
            1e-3,
        )
        # only the dense W_ih has its own rate; weight decay is off for every model
        assert c.ih_lr == (3e-6 if c.format == "dense" else 0.0) and c.weight_decay == 0.0
        assert c.run_dir == tmp_path / c.name
    kcp = configs[models.index("kcp")]
    assert np.prod([np.prod(m) for m in kcp.format_options["in_modes"]]) == 57600
    assert demo.main(["--models=dense,svd"]) == 2
    assert demo.main(["--dense-seeds=-1"]) == 2
    with pytest.raises(SystemExit):
        demo.main(["--seeds=0,0"])


def test_dense_runs_on_the_first_dense_seeds_only(tmp_path):
    names = [c.name for c in demo.demo_configs(tmp_path, ["dense", "tt"], seeds=[3, 1, 2])]
    assert demo.DEFAULT_DENSE_SEEDS == 1
    assert names == ["dense-s3", "tt-s3", "tt-s1", "tt-s2"]
    two = demo.demo_configs(tmp_path, ["dense", "tt"], seeds=[3, 1, 2], dense_seeds=2)
    assert [c.name for c in two] == ["dense-s3", "tt-s3", "dense-s1", "tt-s1", "tt-s2"]
    defaults = demo.demo_configs(tmp_path, ["dense"])
    assert [(c.seed, c.epochs, c.ih_lr) for c in defaults] == [
        (0, demo.DEFAULT_EPOCHS, demo.DEFAULT_DENSE_IH_LR)
    ]


def _run(model, seed, acc, fmt=None, params=3360, compression=17554.3):
    return {
        "model": model,
        "format": fmt or model.split("-")[0],
        "seed": seed,
        "test_acc": acc,
        "ih_params": params,
        "compression": compression,
        "seconds_per_epoch": 1.0 + seed,
        "train_acc": 0.3 if model == "dense" else 0.9,
        "num_classes": 11,
    }


RUNS = [
    _run("dense", 0, 0.30, params=58982400, compression=1.0),
    _run("dense", 1, 0.40, params=58982400, compression=1.0),
    _run("tt", 0, 0.60),
    _run("tt", 1, 0.50),
    _run("kcp", 0, 0.52, params=3354),
    _run("kcp", 1, 0.54, params=3354),
    _run("kcp-r1", 0, 0.20, fmt="kcp", params=78, compression=756185.0),
    _run("kcp-r1", 1, 0.30, fmt="kcp", params=78, compression=756185.0),
]


def test_summarize_takes_mean_and_sample_std_over_seeds():
    rows = {r["model"]: r for r in demo.summarize(RUNS)}
    assert list(rows) == ["dense", "tt", "kcp", "kcp-r1"]
    assert rows["tt"]["test_acc_mean"] == pytest.approx(0.55)
    assert rows["tt"]["test_acc_std"] == pytest.approx(statistics.stdev([0.6, 0.5]))
    assert rows["tt"]["seconds_per_epoch"] == pytest.approx(1.5)
    assert rows["dense"]["train_acc_mean"] == pytest.approx(0.3)
    assert rows["kcp"]["seeds"] == [0, 1] and rows["kcp"]["ih_params"] == 3354
    assert rows["kcp-r1"]["group"] == "extreme" and rows["tt"]["group"] == "matched"
    one = demo.summarize(RUNS[:1])
    assert one[0]["test_acc_mean"] == 0.30 and math.isnan(one[0]["test_acc_std"])


def test_reading_names_the_best_the_close_ones_and_the_extreme_gap():
    rows = demo.summarize(RUNS)
    text = demo.reading(rows, 1 / 11)
    # tt 55.0 +- 7.1 is best; kcp at 53.0 is within tt's spread
    assert "tt scores highest, 55.0 ± 7.1 %" in text
    assert "kcp is within one standard deviation" in text
    assert "KCP at that budget: kcp (interleaved, P=1, R=43) 53.0 ± 1.4 %." in text
    # extreme: 25.0 %, 30.0 points below tt, 3360 / 78 = 43x fewer parameters
    assert "25.0 ± 7.1 %, 30.0 points below tt with 43x fewer parameters" in text
    assert "above 1 of the 3 compressed models" in text  # dense 35 % beats only kcp-r1
    assert "far from fitting the training clips (30 % training accuracy" in text
    assert "Chance is 9.1 %" in text and "Over 2 seeds" in text
    one_dense = demo.reading(demo.summarize(RUNS[:1] + RUNS[2:]), 1 / 11)
    assert "(58,982,400 input-to-hidden parameters; seed 0 only) scores 30.0 %," in one_dense
    assert "seed 0 only" not in text
    no_extreme = demo.reading(demo.summarize(RUNS[:6]), 1 / 11)
    assert "below all 2 compressed models" in no_extreme and "extreme" not in no_extreme
    table = demo.format_table(rows)
    assert "| tt | tt, ranks 1,4,4,4,1 | 3,360 | 17,554x | 1.5 | 90.0 | 55.0 ± 7.1 | 2 |" in table


def test_write_demo_report_files(tmp_path):
    protocol = {
        "dataset": "ucf11-like",
        "clips_per_class": 80,
        "num_frames": 6,
        "epochs": 8,
        "batch_size": 16,
        "lr": 1e-3,
        "dense_ih_lr": 2e-6,
        "dense_seeds": [0, 1],
    }
    demo.write_demo_report(RUNS, tmp_path, protocol)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["protocol"]["seeds"] == [0, 1]
    assert [r["model"] for r in record["models"]] == ["dense", "tt", "kcp", "kcp-r1"]
    assert len(record["runs"]) == len(RUNS)
    md = (tmp_path / "results.md").read_text()
    assert "seeds 0, 1" in md and "| kcp-r1 | 20.0 | 30.0 |" in md
    assert (tmp_path / "accuracy_vs_compression.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_demo_end_to_end_and_resumes(tmp_path, source_images, cache, capsys):
    out = tmp_path / "demo"
    args = [
        "--models=kcp-r1,tt",
        "--seeds=0,1",
        "--epochs=1",
        "--clips-per-class=2",
        f"--cache-dir={cache}",
        f"--out={out}",
        "--no-progress",
    ]
    assert demo.main(args) == 0
    record = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in record["runs"]] == [
        ("kcp-r1", 0),
        ("tt", 0),
        ("kcp-r1", 1),
        ("tt", 1),
    ]
    assert [r["ih_params"] for r in record["models"]] == [78, 3360]
    for r in record["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["num_classes"] == 11
    printed = capsys.readouterr().out
    assert "2 seeds" in printed and "rough" in printed and "reused" not in printed
    # kcprnn report reads the demo folder's runs too
    assert len(report.collect([out])) == 4
    # a second call reuses the finished runs (same config): same numbers, nothing trained
    stamp = (out / "tt-s1" / "summary.json").stat().st_mtime_ns
    assert demo.main(args) == 0
    assert capsys.readouterr().out.count("finished before, reused") == 4
    assert (out / "tt-s1" / "summary.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "results.json").read_text())
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in record["runs"]]
    # another config (epochs, lr, threads) is not reused, except for the thread count
    (cfg,) = demo.demo_configs(out, ["tt"], seeds=[1], epochs=1, clips_per_class=2)
    assert demo.finished_run(cfg) is not None
    assert demo.finished_run(dataclasses.replace(cfg, threads=1, cache_dir="x")) is not None
    absolute = dataclasses.replace(cfg, out_dir=str(cfg.run_dir.resolve()))
    assert demo.finished_run(absolute) is not None
    assert demo.finished_run(dataclasses.replace(cfg, epochs=2)) is None
    assert demo.finished_run(dataclasses.replace(cfg, lr=1e-2)) is None
