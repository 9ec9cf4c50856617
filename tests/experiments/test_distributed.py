"""Multi-process training: two ``torchrun`` processes (gloo, CPU) reach the parameters of one
process on the same global batches, also when resuming; the batch sharding; clear errors.

Tolerance: the two runs compute the same mathematical steps, but each process runs half a batch
(the kcprnn layers may pick other contraction routes for fewer rows) and the gradient all-reduce
adds the halves in another order, so float32 results differ by rounding, which Adam's normalized
steps carry forward: after 24 and 48 steps at lr 1e-2 the parameters agree to ``atol=5e-5``
(measured: up to 6e-6 after 48 steps), while an epoch moves them by about 1e-1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_resume import cli_args

from kcprnn.data.speech import write_sphere
from kcprnn.experiments import train as train_module
from kcprnn.experiments.config import Config, ConfigError
from kcprnn.experiments.loop import Dist, read_checkpoint, shard
from kcprnn.experiments.speech import SpeechTask, build_ctc_model, load_speech_data
from kcprnn.experiments.train import (
    ClassificationTask,
    build_model,
    load_data,
    split_indices,
    train,
)

SRC = Path(__file__).resolve().parents[2] / "src"
ATOL = 5e-5

# youtube-like: 47 training clips in global batches of 2 -> 24 steps per epoch, the last one a
# single clip (rank 1 runs it with weight 0)
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
    batch_size=2,
    lr=1e-2,
    epochs=1,
    seed=5,
    progress=False,
    threads=1,
)


def test_shard_splits_a_global_batch_and_weights_the_ranks():
    rows = np.arange(10, 15)
    parts = [shard(rows, Dist(rank, 2)) for rank in (0, 1)]
    assert [p.tolist() for p, _ in parts] == [[10, 11, 12], [13, 14]]
    assert [n for _, n in parts] == [3, 2]
    # a rank left without a row runs the first one with weight 0
    assert [(p.tolist(), n) for p, n in (shard(rows[:1], Dist(r, 2)) for r in (0, 1))] == [
        ([10], 1),
        ([10], 0),
    ]
    # single process: the whole batch
    p, n = shard(rows, Dist())
    assert p is rows and n == 5


def _timit_tree(root: Path, lengths: list[int]) -> Path:
    """A TIMIT layout: training utterances of ``lengths`` samples, one dev and one test."""
    rng = np.random.default_rng(1)
    phones = ["h#", "s", "ix", "n", "h#"]
    names = [f"SI{100 + k}" for k in range(len(lengths))]
    for split, speaker, items in (
        ("TRAIN", "FCJF0", list(zip(names, lengths, strict=True))),
        ("TEST", "MDAB0", [("SI1039", 4000)]),
        ("TEST", "FAKS0", [("SI943", 4000)]),
    ):
        folder = root / "TIMIT" / split / "DR1" / speaker
        folder.mkdir(parents=True)
        for name, n in items:
            write_sphere(folder / f"{name}.WAV", rng.normal(0, 0.1, n).astype(np.float32))
            edges = np.linspace(0, n, len(phones) + 1).astype(int)
            (folder / f"{name}.PHN").write_text(
                "".join(
                    f"{a} {b} {p}\n" for a, b, p in zip(edges[:-1], edges[1:], phones, strict=True)
                )
            )
    return root / "TIMIT"


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _sharded_grads(task, model, batch: np.ndarray, world: int) -> list[torch.Tensor]:
    """The gradient DDP averages over ``world`` ranks, each running its slice with the loop's
    weight."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for rank in range(world):
        rows, counted = shard(batch, Dist(rank, world))
        model.zero_grad()
        loss, _ = task.step(model, rows, batch)
        (loss * (counted * world / len(batch))).backward()
        total = [t + g / world for t, g in zip(total, _grads(model), strict=True)]
    return total


@pytest.mark.parametrize("kind", ["video", "speech"])
def test_sharded_steps_average_to_the_global_batch_gradient(tmp_path, cache, kind):
    """Slices of uneven batches (5 rows over 2 and 3 ranks; a single row, so that ranks run
    with weight 0) give the whole batch's gradient; speech slices are padded like the batch."""
    device = torch.device("cpu")
    if kind == "video":
        cfg = Config(**TINY, cache_dir=str(cache))
        data = load_data(cfg)
        train_idx, test_idx = split_indices(cfg, data)
        task = ClassificationTask(cfg, data, train_idx, test_idx, train_idx[:0], device)
        model = build_model(cfg, data.input_size, data.num_classes)
        batch = np.sort(train_idx[:5])
    else:
        lengths = [3000, 9000, 4000, 6000, 5000]
        cfg = Config(
            dataset="timit",
            data_dir=str(_timit_tree(tmp_path, lengths)),
            cache_dir=str(tmp_path / "cache"),
            hidden_size=8,
            hidden_modes=(2, 4),
            format="tt",
            format_options={"rank": 2},
            bidirectional=True,
        )
        data = load_speech_data(cfg)
        task = SpeechTask(cfg, data, device)
        model = build_ctc_model(cfg, data.input_size, data.num_symbols)
        batch = data.train[:5]
        assert len({len(data.frames[i]) for i in batch}) == 5
    model.zero_grad()
    task.step(model, batch, batch)[0].backward()
    whole = _grads(model)
    for world, rows in ((2, batch), (3, batch), (2, batch[:1])):
        if len(rows) == 1:
            model.zero_grad()
            task.step(model, rows, rows)[0].backward()
            whole_rows = _grads(model)
        else:
            whole_rows = whole
        for a, b in zip(_sharded_grads(task, model, rows, world), whole_rows, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "init_distributed", lambda device: (Dist(0, 3), device))
    cfg = Config(**{**TINY, "batch_size": 4}, out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"batch_size=4 is the global batch .* 3 processes"):
        train(cfg)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(read_checkpoint(run)[1])


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(two: Path, one: Path) -> None:
    a, b = weights(two), weights(one)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=key)
    rows_two, rows_one = metrics(two), metrics(one)
    assert [r["epoch"] for r in rows_two] == [r["epoch"] for r in rows_one]
    for r2, r1 in zip(rows_two, rows_one, strict=True):
        for key in ("train_loss", "test_loss"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
        assert r2["train_acc"] == r1["train_acc"] and r2["test_acc"] == r1["test_acc"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "kcprnn", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one_on_the_same_global_batch(tmp_path, cache):
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = Config(**TINY, cache_dir=str(cache), out_dir=str(one))
    train(cfg)
    # the epoch moves the parameters far beyond the tolerance (the run's seeded initialization)
    torch.manual_seed(cfg.seed)
    start = build_model(cfg, 32 * 24 * 3, 47).state_dict()
    moved = max((start[k] - v).abs().max().item() for k, v in weights(one).items())
    assert moved > 100 * ATOL
    done = torchrun(*cli_args({**TINY, "cache_dir": str(cache), "out_dir": str(two)}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close_runs(two, one)
    # rank 0 alone reports and writes
    assert done.stdout.count("run folder:") == 1
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_train"] == 47
    assert "2 processes (gloo), global batch 2" in (two / "run.log").read_text()


def test_two_processes_resume_a_run_mid_epoch(tmp_path, cache, monkeypatch):
    """One process trains to global step 30 (epoch 2, step 6), its next save fails; two
    processes resume it: epoch 2's loss and accuracy combine the steps of both."""
    one, two = tmp_path / "one", tmp_path / "two"
    longer = {**TINY, "epochs": 2, "checkpoint_every": 30}
    train(Config(**longer, cache_dir=str(cache), out_dir=str(one)))
    real_replace = os.replace

    def fail_after_step_30(src, dst):
        record = Path(dst).name == "checkpoint.json" and json.loads(Path(src).read_text())
        if record and record["global_step"] > 30:
            raise OSError("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_after_step_30)
    with pytest.raises(OSError, match="simulated"):
        train(Config(**longer, cache_dir=str(cache), out_dir=str(two)))
    monkeypatch.setattr(os, "replace", real_replace)
    record = read_checkpoint(two)[0]
    assert (record["epoch"], record["step"], record["world_size"]) == (1, 6, 1)

    done = torchrun("--resume", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at epoch 2, step 6" in (two / "run.log").read_text()
    assert_close_runs(two, one)
    assert read_checkpoint(two)[0]["global_step"] == 48
    assert read_checkpoint(two)[0]["world_size"] == 2
