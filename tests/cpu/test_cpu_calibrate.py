"""``kcprnn calibrate``: a run on a tiny budget prints a cost model that loads, writes the same
model atomically with ``--out``, and keeps the fields it does not measure."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kcprnn
from kcprnn import cli
from kcprnn._cpu import calibrate, cost, native, ops
from kcprnn._cpu.cost import CostModel
from kcprnn.rnn.plan import layer_costs

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
    "onednn_gemm",
    "recurrent_grad_mm",
    "recurrent_grad_mm_wide",
    *calibrate.ROUTE_FIELDS,
}
SMALL_LAYER = (8, 32, 16, 20)  # (input, hidden, batch, steps): the route timings' layer, small


def test_calibrate_prints_a_loadable_model(tmp_path, capsys, monkeypatch):
    raw_calls = []
    real = calibrate.measure_all
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
    monkeypatch.setattr(
        calibrate, "measure_all", lambda b: raw_calls.append(real(b)) or raw_calls[-1]
    )
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
        if name == "onednn_gemm":  # kept as measured
            assert value == (calibrate._sig(raw[name]) if name in raw else default.onednn_gemm)
        elif name in raw:  # the default scaled by this machine over the reference one
            expected = getattr(default, name) * raw[name] / calibrate.REFERENCE[name]
            assert math.isclose(value, expected, rel_tol=1e-2), name
        elif name == "recurrent_grad_mm_rows":
            assert value == grad_rows
        elif name in calibrate.ROUTE_FIELDS.values():  # solved (tested below)
            assert value == calibrate._route_fields(raw, default).get(name, 1.0), name
        else:
            assert value == getattr(default, name), name
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left


def test_save_keeps_the_model_as_this_machines_default(tmp_path, capsys, monkeypatch):
    path = tmp_path / "cost-model-here.json"
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
    monkeypatch.setattr(cost, "machine_model_path", lambda: path)
    monkeypatch.setattr(calibrate, "machine_model_path", lambda: path)
    monkeypatch.delenv("KCPRNN_COST_MODEL")
    cost.forget_machine_model()
    try:
        assert cost.default_cost_model() == CostModel()
        assert cli.main(["calibrate", "--budget", "0.01", "--save"]) == 0
        captured = capsys.readouterr()
        printed = CostModel.from_dict(json.loads(captured.out))
        assert str(path) in captured.err
        assert CostModel.load(path) == printed
        assert cost.default_cost_model() == printed  # used from now on, in this process too
        monkeypatch.setenv("KCPRNN_COST_MODEL", "builtin")
        assert cost.default_cost_model() == CostModel()
    finally:
        cost.forget_machine_model()


def test_raw_measurements_are_printed_as_json(capsys, monkeypatch):
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
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
    monkeypatch.setattr(calibrate, "measure_all", lambda budget: dict(raw))
    base = CostModel().replace(recurrent_grad_mm_rows=777)
    model = calibrate.calibrate(0.0, base)
    assert model.recurrent_grad_mm_rows == (777 if rows is None else rows)


@pytest.mark.parametrize(("raw", "gain"), [({"onednn_gemm": 0.4567}, 0.457), ({}, 0.77)])
def test_onednn_gemm_is_kept_as_measured(monkeypatch, raw, gain):
    """``onednn_gemm`` is the measured ratio itself (three digits), not scaled by a reference
    machine's; without a timing (no oneDNN) the starting model's value stays."""
    monkeypatch.setattr(calibrate, "measure_all", lambda budget: dict(raw))
    assert calibrate.calibrate(0.0, CostModel(onednn_gemm=0.77)).onednn_gemm == gain


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


@pytest.mark.parametrize("ratio", [0.7, 1.3])
def test_route_fields_make_the_model_price_the_measured_ratio(monkeypatch, ratio):
    """Each ``rnn_dense_*`` factor is solved so that the model's price of the dense loop over
    torch's kernel, on the layer that was timed, equals the measured ratio."""
    torch.manual_seed(0)
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
    raw = dict.fromkeys(calibrate.ROUTE_FIELDS, ratio)
    model = calibrate.CostModel().replace(**calibrate._route_fields(raw, CostModel()))
    i, h, b, t = SMALL_LAYER
    for key, field in calibrate.ROUTE_FIELDS.items():
        assert getattr(model, field) != 1.0, field
        mode = key.split("_")[1].upper()
        cells = [getattr(kcprnn, mode)(i, h).cell(0)]
        costs = layer_costs(cells, b * t, t, True, key.endswith("_train"), model)
        assert costs["dense"] / costs["torch"] == pytest.approx(ratio, rel=1e-2), key


def test_route_fields_are_bounded(monkeypatch):
    """A wild timing (a busy machine) moves a factor no further than 0.25-4."""
    torch.manual_seed(0)
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
    fields = calibrate._route_fields({"route_gru": 1e4, "route_rnn_train": 1e-4}, CostModel())
    assert fields == {"rnn_dense_gru": 4.0, "rnn_dense_rnn_train": 0.25}


def test_measured_routes_are_ratios_of_the_two_routes(monkeypatch):
    """``measure_routes`` times the same layer on kcprnn's dense loop and on torch's kernel
    (both run it: their outputs match) and reports one finite ratio per mode and phase."""
    torch.manual_seed(0)
    monkeypatch.setattr(calibrate, "ROUTE_LAYER", SMALL_LAYER)
    loop, kernel, x = calibrate._route_layer("GRU")
    assert (loop.recurrence, kernel.recurrence) == ("dense", "torch")
    torch.testing.assert_close(loop(x)[0], kernel(x)[0], rtol=1e-4, atol=1e-5)
    raw = calibrate.measure_routes(0.01)
    if not (native.available() and ops.onednn_available()):
        assert raw == {}
        return
    assert set(raw) == set(calibrate.ROUTE_FIELDS)
    assert all(math.isfinite(v) and v > 0 for v in raw.values())
