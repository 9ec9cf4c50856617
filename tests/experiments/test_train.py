"""Loader -> training -> checkpoint -> evaluation on tiny data; repeatability; report."""

import dataclasses
import json

import pytest
import torch

from kcprnn.experiments import report
from kcprnn.experiments.config import Config
from kcprnn.experiments.train import evaluate, load_checkpoint, load_data, split_indices, train

# 24x32 RGB frames: 2,304 inputs = 4x8x8x9; hidden 16 = 2x2x2x2 (gates fold to 8x2x2x2)
TINY = dict(
    frame_width=32,
    frame_height=24,
    hidden_size=16,
    hidden_modes=(2, 2, 2, 2),
    batch_size=4,
    lr=1e-2,
    progress=False,
    threads=1,
)
TT = dict(format="tt", format_options={"in_modes": (4, 8, 8, 9), "rank": 2})


@pytest.fixture(scope="module", autouse=True)
def _source_images():
    from kcprnn.data import load_source_images

    try:
        load_source_images()
    except FileNotFoundError as exc:  # system data (apt package), not a Python package
        pytest.skip(str(exc))


def test_standin_run_writes_everything_and_checkpoint_evaluates(tmp_path):
    cfg = Config(
        dataset="ucf11-like",
        clips_per_class=3,
        num_frames=3,
        epochs=2,
        seed=0,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
        **TINY,
        **TT,
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert json.loads((run / "summary.json").read_text()) == summary
    # the checkpoint rebuilds the model; evaluating it reproduces the logged test accuracy
    model, cfg2, meta = load_checkpoint(run)
    assert cfg2 == dataclasses.replace(cfg, threads=1) and meta["epoch"] == 2
    clips = load_data(cfg2)
    _, test_idx = split_indices(cfg2, clips)
    loss, acc = evaluate(model, clips, test_idx, 4, torch.device("cpu"))
    assert acc == pytest.approx(lines[-1]["test_acc"])
    assert loss == pytest.approx(lines[-1]["test_loss"], rel=1e-5)
    # TT cores (r_{d-1}, J_d, I_d, r_d), ranks 1,2,2,2,1, out 8x2x2x2, in 4x8x8x9
    assert summary["ih_params"] == 1 * 8 * 4 * 2 + 2 * 2 * 8 * 2 + 2 * 2 * 8 * 2 + 2 * 2 * 9 * 1
    assert summary["compression"] == pytest.approx(2304 * 64 / summary["ih_params"])
    assert not list(run.glob("*.tmp")) and not list(run.glob("*.pkl"))


def test_seeded_runs_repeat_and_training_lowers_the_loss(tmp_path):
    common = dict(
        dataset="youtube-like",
        clips_per_class=2,
        num_frames=3,
        epochs=3,
        seed=1,
        cache_dir=str(tmp_path / "cache"),
        format="dense",
        **TINY,
    )
    a = train(Config(out_dir=str(tmp_path / "a"), **common))
    b = train(Config(out_dir=str(tmp_path / "b"), **common))
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]
    assert a["test_acc"] == b["test_acc"]
    assert ma[-1]["train_loss"] < ma[0]["train_loss"]


def test_real_video_folder_run_skips_and_counts_a_corrupt_clip(tmp_path, ucf11_tree):
    bad = ucf11_tree / "walking" / "v_walk_dog_02" / "v_walk_dog_02_09.avi"
    bad.write_bytes(b"RIFF....AVI broken")
    cfg = Config(
        dataset="ucf11",
        data_dir=str(ucf11_tree),
        num_frames=3,
        epochs=1,
        seed=0,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
        test_fraction=0.5,
        **TINY,
        **TT,
    )
    summary = train(cfg)
    assert summary["skipped_clips"] == 1
    assert summary["num_train"] + summary["num_test"] == 8
    assert "v_walk_dog_02_09.avi" in (tmp_path / "run" / "run.log").read_text()


def test_missing_dataset_folder_is_a_clear_cli_error(tmp_path, capsys):
    from kcprnn.experiments.train import main

    assert (
        main(
            [
                "--dataset=ucf50",
                f"--data_dir={tmp_path / 'UCF50'}",
                f"--out_dir={tmp_path / 'run'}",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "UCF50" in capsys.readouterr().err


def test_report_table_and_files(tmp_path, capsys):
    rows = [
        {
            "format": "dense",
            "dataset": "ucf11-like",
            "ih_params": 58982400,
            "compression": 1.0,
            "ih_macs_per_frame": 58982400,
            "seconds_per_epoch": 30.25,
            "test_acc": 0.5,
            "num_classes": 11,
        },
        {
            "format": "tt",
            "dataset": "ucf11-like",
            "ih_params": 3360,
            "compression": 17554.3,
            "ih_macs_per_frame": 123456,
            "seconds_per_epoch": 4.0,
            "test_acc": 0.875,
            "num_classes": 11,
        },
    ]
    for row in rows:
        (tmp_path / row["format"]).mkdir()
        (tmp_path / row["format"] / "summary.json").write_text(json.dumps(row))
    assert report.main([str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2] == "| dense | 58,982,400 | 1x | 58,982,400 | 30.2 | 50.0% |"
    assert table[3] == "| tt | 3,360 | 17,554x | 123,456 | 4.0 | 87.5% |"
    assert [r["format"] for r in json.loads((tmp_path / "results.json").read_text())] == [
        "dense",
        "tt",
    ]
    assert (tmp_path / "accuracy_vs_compression.png").read_bytes()[:4] == b"\x89PNG"
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
