"""The parameters' moving average (``ema``): against a hand-written recurrence, the swap in and
out for evaluation, and a run whose checkpoint and metrics are the average's."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import TINY
from torch import nn

from kcprnn.experiments.average import ParameterAverage
from kcprnn.experiments.config import Config
from kcprnn.experiments.loop import read_checkpoint
from kcprnn.experiments.train import evaluate, load_checkpoint, load_data, split_indices, train


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_average_follows_the_recurrence_by_hand():
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    average = ParameterAverage(model, 0.9)
    trajectory = []
    x = torch.randn(8, 3, dtype=torch.float64)
    for step in range(1, 31):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        average.update(step)
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # the bias-corrected average: step k's parameters weighted by 0.9 ** (30 - k), normalized
    weights = [0.9 ** (30 - k) for k in range(1, 31)]
    expected = {
        n: sum(w * t[n] for w, t in zip(weights, trajectory, strict=True)) / sum(weights)
        for n in trajectory[0]
    }
    for n, p in model.named_parameters():
        torch.testing.assert_close(average.values[n], expected[n], rtol=1e-12, atol=1e-12)
        assert not torch.equal(average.values[n], p)  # it lags the live parameters


def test_first_steps_by_hand():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(5.0)
    average = ParameterAverage(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(1.5)
    average.update(1)  # d = 0: the initial 5.0 never counts
    assert average.values["weight"].item() == 1.5
    with torch.no_grad():
        model.weight.fill_(3.0)
    average.update(2)  # d = (0.5 - 0.25) / (1 - 0.25) = 1/3: (1.5 * 0.5 + 3.0) / 1.5 = 2.5
    assert average.values["weight"].item() == pytest.approx(2.5, abs=1e-15)


def test_applied_swaps_in_and_back_even_on_error():
    torch.manual_seed(1)
    model = _model()
    average = ParameterAverage(model, 0.5)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    for v in average.values.values():
        v.add_(1.0)
    with pytest.raises(RuntimeError, match="inside"), average.applied():
        for n, p in model.named_parameters():
            assert torch.equal(p, live[n] + 1.0)
        raise RuntimeError("inside")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])


def test_restore_needs_the_live_parameters():
    model = _model()
    average = ParameterAverage(model, 0.5)
    with pytest.raises(ValueError, match=r"no live parameters for \['0.weight'.*ema = 0"):
        average.restore({})
    with pytest.raises(ValueError, match="decay must lie in"):
        ParameterAverage(model, 1.0)


@pytest.mark.usefixtures("source_images")
def test_run_evaluates_and_saves_the_average(tmp_path, cache):
    # the resume tests' tiny video run (a TT layer), two epochs, averaged
    cfg = Config(
        **{**TINY, "epochs": 2, "checkpoint_every": 0, "ema": 0.8},
        cache_dir=str(cache),
        out_dir=str(tmp_path / "run"),
    )
    train(cfg)
    record, weights_path, state_path = read_checkpoint(cfg.run_dir)
    saved, state = load_file(weights_path), load_file(state_path)
    names = [k[len("live/") :] for k in state if k.startswith("live/")]
    assert names and all(k in saved for k in names)
    assert any(not torch.equal(saved[k], state[f"live/{k}"]) for k in names)
    # the last metrics line describes the saved (averaged) weights
    model, cfg2, _ = load_checkpoint(cfg.run_dir)
    clips = load_data(cfg2)
    _, test_idx = split_indices(cfg2, clips)
    loss, acc = evaluate(model, clips, test_idx, cfg2.batch_size, torch.device("cpu"))
    last = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert loss == pytest.approx(last["test_loss"], rel=1e-6)
    assert acc == last["test_acc"]
