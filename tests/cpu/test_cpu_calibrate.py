"""``kcprnn calibrate``: a run on a tiny budget prints a cost model that loads, writes the same
model atomically with ``--out``, and keeps the fields it does not measure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcprnn import cli
from kcprnn._cpu import calibrate
from kcprnn._cpu.cost import CostModel

MEASURED = {
    "permute",
    "swap",
    "gather_index",
    "kernel",
    "kernel_prepared",
    "row",
    "onednn_gain",
    "native_gain",
    "native_gain_wide",
    "native_gather",
    "recurrent_grad_mm",
    "recurrent_grad_mm_wide",
}


def test_calibrate_prints_a_loadable_model(tmp_path, capsys, monkeypatch):
    raw_calls = []
    real = calibrate.measure
    monkeypatch.setattr(calibrate, "measure", lambda b: raw_calls.append(real(b)) or raw_calls[-1])
    out = tmp_path / "model.json"
    assert cli.main(["calibrate", "--budget", "0.01", "--out", str(out)]) == 0
    printed = CostModel.from_dict(json.loads(capsys.readouterr().out))
    assert CostModel.load(out) == printed
    (raw,) = raw_calls
    assert {"permute", "gather_index", "kernel", "kernel_prepared", "row"} <= set(raw) <= MEASURED
    assert all(math.isfinite(v) and v > 0 for v in raw.values())
    default = CostModel()
    grad = [raw[k] for k in calibrate.RECURRENT_GRAD_SIZES if k in raw]
    grad_rows = default.recurrent_grad_mm_rows
    if grad and max(grad) < 1:
        grad_rows = 0
    elif grad and min(grad) > 1:
        grad_rows = calibrate.ONEDNN_GRAD_ROWS
    for name, value in printed.to_dict().items():
        if name in raw:  # the default scaled by this machine over the reference one
            expected = getattr(default, name) * raw[name] / calibrate.REFERENCE[name]
            assert math.isclose(value, expected, rel_tol=1e-2), name
        elif name == "recurrent_grad_mm_rows":
            assert value == grad_rows
        else:
            assert value == getattr(default, name), name
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left


def test_raw_measurements_are_printed_as_json(capsys):
    assert calibrate.main(["--raw", "--budget", "0.01"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert set(raw) <= MEASURED and all(v > 0 for v in raw.values())


@pytest.mark.parametrize(
    ("ratios", "rows"), [((0.6, 0.7), 0), ((0.6, 1.2), None), ((1.3, 1.5), 2048), ((), None)]
)
def test_recurrent_gradient_route_follows_the_faster_at_both_sizes(monkeypatch, ratios, rows):
    """``recurrent_grad_mm_rows`` is 0 (``torch.mm`` at any number of rows) where ``mm`` beat
    oneDNN at both measured sizes, 2,048 (oneDNN up to there) where oneDNN beat ``mm`` at both;
    a mixed result (or no timings, without oneDNN) keeps the starting model's threshold."""
    raw = dict(zip(calibrate.RECURRENT_GRAD_SIZES, ratios, strict=False))
    monkeypatch.setattr(calibrate, "measure", lambda budget: dict(raw))
    base = CostModel().replace(recurrent_grad_mm_rows=777)
    model = calibrate.calibrate(0.0, base)
    assert model.recurrent_grad_mm_rows == (777 if rows is None else rows)


@pytest.mark.parametrize("threshold", [0, 2048])
def test_recurrent_gradient_is_the_same_product_on_either_route(monkeypatch, threshold):
    """W_hh's gradient ``grad.T @ h_prev`` on ``torch.mm`` (threshold 0) and on oneDNN (96
    rows under 2,048) against a float64 product."""
    from kcprnn.rnn import _fused_base

    model = CostModel().replace(recurrent_grad_mm_rows=threshold)
    monkeypatch.setattr(_fused_base, "default_cost_model", lambda: model)
    torch.manual_seed(0)
    grad, h_prev = torch.randn(96, 64), torch.randn(96, 16)
    got = _fused_base._recurrent_weight_grad(grad, h_prev)
    want = grad.double().t() @ h_prev.double()  # sums of 96 products: float32 rounding
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
