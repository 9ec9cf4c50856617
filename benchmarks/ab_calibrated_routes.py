"""Does a calibrated cost model keep kcprnn's dense recurrent layers at least as fast as
``torch.nn`` on a machine other than the one the defaults were fitted on?

For each layer (the suite's speech and spike points, dense matrices), the same kcprnn module is
run under the built-in cost model and under ``--model`` (written by ``kcprnn calibrate --out``;
``$KCPRNN_COST_MODEL`` is switched between calls, which re-plans the layer), each interleaved
with ``torch.nn``'s module, round by round. Prints per layer and phase the route each model
chooses and ``torch.nn``'s median time over kcprnn's (above 1, kcprnn is faster), in
inference (eval, ``no_grad``) and training (forward, ``sum``, backward).

Usage::

    kcprnn calibrate --threads 1 --out model.json
    python benchmarks/ab_calibrated_routes.py --model model.json [--threads 1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kcprnn
from kcprnn.rnn import plan

# (mode, input, hidden, steps, batch, bidirectional)
LAYERS = [
    ("LSTM", 40, 256, 300, 16, True),
    ("LSTM", 40, 512, 300, 16, True),
    ("LSTM", 123, 256, 300, 16, True),
    ("GRU", 40, 256, 300, 16, True),
    ("GRU", 40, 512, 300, 16, True),
    ("LSTM", 700, 256, 100, 32, False),
    ("GRU", 700, 256, 100, 32, False),
    ("RNN", 40, 512, 300, 16, True),
]


def _call(module: torch.nn.Module, x: torch.Tensor, train: bool) -> float:
    t0 = time.perf_counter()
    if train:
        module.zero_grad(set_to_none=True)
        module(x)[0].sum().backward()
    else:
        with torch.no_grad():
            module(x)
    return time.perf_counter() - t0


def _route(module: torch.nn.Module, x: torch.Tensor, train: bool) -> str:
    cells = [module.cell(0)]  # type: ignore[operator]
    with torch.set_grad_enabled(train):
        return plan.choose_route("auto", cells, x.shape[0] * x.shape[1], x.shape[0], True, train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a cost model JSON (kcprnn calibrate)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"default": None, "calibrated": os.path.abspath(args.model)}
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, "
        f"model {args.model}",
        flush=True,
    )
    for mode, i, h, t, b, bi in LAYERS:
        torch.manual_seed(0)
        x = torch.randn(t, b, i)
        ref = getattr(torch.nn, mode)(i, h, bidirectional=bi)
        ours = getattr(kcprnn, mode)(i, h, format="dense", bidirectional=bi)
        for train in (False, True):
            ref.train(train)
            ours.train(train)
            times: dict[str, list[float]] = {"torch.nn": [], **{k: [] for k in models}}
            routes = {}
            for name, path in models.items():
                _set_model(path)
                routes[name] = _route(ours, x, train)
                _call(ours, x, train)  # warm, planned
            _call(ref, x, train)
            for _ in range(args.rounds):
                times["torch.nn"].append(_call(ref, x, train))
                for name, path in models.items():
                    _set_model(path)
                    times[name].append(_call(ours, x, train))
            base = statistics.median(times["torch.nn"])
            cells = "  ".join(
                f"{name} {routes[name]:5s} {base / statistics.median(times[name]):.2f}"
                for name in models
            )
            phase = "train" if train else "infer"
            print(
                f"{mode:4s} {i:3d}->{h:3d} T={t} B={b} {'bi ' if bi else 'uni'} {phase}: "
                f"torch.nn {base * 1e3:7.1f} ms  {cells}",
                flush=True,
            )
    _set_model(None)


def _set_model(path: str | None) -> None:
    if path is None:
        os.environ.pop("KCPRNN_COST_MODEL", None)
    else:
        os.environ["KCPRNN_COST_MODEL"] = path


if __name__ == "__main__":
    main()
