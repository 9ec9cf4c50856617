"""How well one ``rnn_dense_<mode>[_train]`` factor routes a grid of dense layers.

Reads the output of ``ab_dense_loop.py`` (kcprnn's dense loop and torch's kernel, each over
``torch.nn``, per mode, size and phase), prices every layer's two routes under the built-in cost
model with the factor at 0 and 1 (the loop's price is linear in it), and for several choices of
calibration layers fits the factor (least squares of the log of the priced ratio over the
measured one, on a grid from 0.25 to 4), then reports the regret over the whole grid: the route
the factor picks over the faster one, as measured (mean and worst). Also evaluates given
factors (``--factor LSTM:train=1.2``)::

    python benchmarks/ab_dense_loop.py --modes LSTM,GRU --sizes ... > grid.txt
    KCPRNN_COST_MODEL=builtin python benchmarks/fit_dense_loop_factor.py grid.txt \\
        --factor LSTM:train=1.2 --factor GRU:infer=1.15
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import kcprnn
from kcprnn._cpu.cost import CostModel
from kcprnn.rnn.plan import layer_costs

LINE = re.compile(
    r"(\w+) i=(\d+) h=(\d+) b=(\d+) T=(\d+): infer torch ([\d.]+)  infer dense ([\d.]+)  "
    r"train torch ([\d.]+)  train dense ([\d.]+)"
)
CALIBRATIONS = {  # name -> the (input, hidden, batch, steps) layers a factor is fitted on
    "40:256:16:300 (calibrate's)": [(40, 256, 16, 300)],
    "40:128:16:300 + 40:512:16:300": [(40, 128, 16, 300), (40, 512, 16, 300)],
    "40:256 at batch 16 and 32 + 40:512:16": [
        (40, 256, 16, 300),
        (40, 256, 32, 300),
        (40, 512, 16, 300),
    ],
    "every layer of the grid": None,
}

Key = tuple[str, tuple[int, int, int, int], bool]


def read_grid(path: str) -> dict[Key, float]:
    """Measured loop-over-kernel ratio per (mode, size, training)."""
    ratios: dict[Key, float] = {}
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            size = (int(m[2]), int(m[3]), int(m[4]), int(m[5]))
            infer_torch, infer_dense, train_torch, train_dense = map(float, m.groups()[5:9])
            ratios[(m[1], size, False)] = infer_dense / infer_torch
            ratios[(m[1], size, True)] = train_dense / train_torch
    return ratios


def prices(key: Key) -> tuple[float, float, float]:
    """torch's price, the loop's price at factor 0, and its price per unit of factor."""
    mode, (i, h, b, t), training = key
    cell = getattr(kcprnn, mode)(i, h, format="dense").cell(0)
    field = f"rnn_dense_{mode.lower()}" + ("_train" if training else "")
    at = [
        layer_costs([cell], b * t, t, True, training, CostModel().replace(**{field: f}))
        for f in (0, 1)
    ]
    return at[0]["torch"], at[0]["dense"], at[1]["dense"] - at[0]["dense"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="the output of ab_dense_loop.py")
    parser.add_argument("--factor", action="append", default=[], help="MODE:infer|train=VALUE")
    args = parser.parse_args(argv)
    measured = read_grid(args.grid)
    priced = {key: prices(key) for key in measured}

    def regret(mode: str, training: bool, factor: float) -> tuple[float, float]:
        out = []
        for key, ratio in measured.items():
            if key[0] != mode or key[2] != training:
                continue
            torch_price, fixed, per_unit = priced[key]
            loop_chosen = (fixed + factor * per_unit) < torch_price
            out.append((ratio if loop_chosen else 1.0) / min(ratio, 1.0))
        return sum(out) / len(out), max(out)

    grid = [math.exp(math.log(0.25) + k * math.log(16) / 399) for k in range(400)]
    for mode in sorted({k[0] for k in measured}):
        for training in (False, True):
            phase = "train" if training else "infer"
            for name, sizes in CALIBRATIONS.items():
                keys = [
                    k
                    for k in measured
                    if k[0] == mode and k[2] == training and (sizes is None or k[1] in sizes)
                ]
                if not keys:
                    continue

                def loss(f: float, keys: list[Key] = keys) -> float:
                    return sum(
                        math.log((priced[k][1] + f * priced[k][2]) / priced[k][0] / measured[k])
                        ** 2
                        for k in keys
                    )

                factor = min(grid, key=loss)
                mean, worst = regret(mode, training, factor)
                fitted = f"{mode} {phase} fitted on {name}: {factor:.2f}"
                print(f"{fitted}, regret {mean:.3f} / {worst:.3f}")
    for given in args.factor:
        mode_phase, value = given.split("=")
        mode, phase = mode_phase.split(":")
        mean, worst = regret(mode, phase == "train", float(value))
        print(f"{mode} {phase} at {float(value):.2f}: regret {mean:.3f} / {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
