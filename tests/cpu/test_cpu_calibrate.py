"""``kcprnn calibrate``: a run on a tiny budget prints a cost model that loads, writes the same
model atomically with ``--out``, and keeps the fields it does not measure."""

from __future__ import annotations

import json
import math

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
    for name, value in printed.to_dict().items():
        if name in raw:  # the default scaled by this machine over the reference one
            expected = getattr(default, name) * raw[name] / calibrate.REFERENCE[name]
            assert math.isclose(value, expected, rel_tol=1e-2), name
        else:
            assert value == getattr(default, name), name
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary file left


def test_raw_measurements_are_printed_as_json(capsys):
    assert calibrate.main(["--raw", "--budget", "0.01"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert set(raw) <= MEASURED and all(v > 0 for v in raw.values())
