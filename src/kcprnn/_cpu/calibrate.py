"""``kcprnn calibrate``: measure this machine's costs and print a :class:`~.cost.CostModel`.

Every cost is relative to one multiply-accumulate of a large float32 GEMM, so the command first
times such a GEMM, then per element: a strided permute copy (contiguous runs of 6), a block
transpose, an ``index_select`` gather, the compiled one-pass gather; per op: a launch with and
without autograd recording; per row: a narrow GEMM's time (on one thread); for tall products (many
rows, few outputs) the time on oneDNN and on the compiled kernel over MKL's, each pair interleaved;
for a large product over a sequence's rows (an input projection) oneDNN's time over MKL's
(``onednn_gemm``, kept as measured); for a recurrent weight's gradient (``grad.T @ h`` over a
sequence's rows) ``torch.mm`` against oneDNN; and for the recurrent layers kcprnn's compiled dense
loop against torch's kernel, one layer per mode (:func:`measure_routes`). The defaults fold in
effects no micro-benchmark sees (they were tuned end to end), so each measured field of the starting
model (the defaults, or ``--base FILE``) is scaled by this machine's measurement over
:data:`REFERENCE`, the same measurement on the machine the defaults come from; where ``torch.mm``
computes the recurrent gradient faster at both measured sizes, ``recurrent_grad_mm_rows`` becomes 0
(always ``mm``), where oneDNN does, :data:`ONEDNN_GRAD_ROWS` (oneDNN up to that many rows); the
``rnn_dense_*`` factors are solved so that the model prices the dense loop over torch's kernel as
measured; the other fields are kept.
``--raw`` prints the measurements themselves. Usage::

    kcprnn calibrate [--budget SECONDS] [--threads N] [--base FILE] [--out FILE] [--save] [--raw]
    python -m kcprnn._cpu.calibrate ...

The JSON it prints (or writes atomically with ``--out``) loads with :meth:`CostModel.load`;
point ``$KCPRNN_COST_MODEL`` at the file to make it the default model, or pass ``--save`` to
keep it where every later process on this CPU and torch version loads it by default
(:func:`~.cost.machine_model_path`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import native, ops
from .cost import CostModel, forget_machine_model, machine_model_path

if TYPE_CHECKING:
    from ..rnn.recurrent import RNNBase

__all__ = ["calibrate", "main"]


@dataclass
class _Clock:
    """Splits a time budget between the measurements."""

    seconds_each: float

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds of one call of ``fn``: the fastest of as many calls as fit in this
        measurement's share of the budget (at least 3, after one warm-up call)."""
        fn()
        best = math.inf
        start = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - start < self.seconds_each:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            calls += 1
        return best

    def ratio(self, fn: Callable[[], object], reference: Callable[[], object]) -> float:
        """Time of ``fn`` over ``reference``'s, the two called alternately (so that a busy
        moment of the machine slows both), each the fastest of its calls."""
        fn()
        reference()
        best = [math.inf, math.inf]
        start = time.perf_counter()
        calls = 0
        while calls < 3 or time.perf_counter() - start < self.seconds_each:
            for k, f in enumerate((fn, reference)):
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
            calls += 1
        return best[0] / best[1]


def _sig(value: float) -> float:
    """Three significant digits: the measurements are not more precise than that."""
    return float(f"{value:.3g}")


REFERENCE: dict[str, float] = {
    "permute": 67.4,
    "swap": 30.4,
    "gather_index": 6.48,
    "kernel_prepared": 23200.0,
    "kernel": 33900.0,
    "row": 235.0,
    "onednn_gain": 0.595,
    "native_gain": 0.508,
    "native_gain_wide": 0.594,
    "native_gather": 60.6,
}
"""What :func:`measure` gives on the machine the defaults were tuned on: medians of several
runs at 2 threads (``benchmarks/results/cost-model``)."""


def measure(budget: float = 60.0) -> dict[str, float]:
    """The raw costs of this machine, in MACs of a large float32 GEMM (ratios to MKL for the
    ``*_gain`` entries), in about ``budget`` seconds: the sizes are fixed (those of KCP's
    UCF11 layer, 96 rows of 57,600 inputs), the budget sets how often each is repeated."""
    clock = _Clock(max(budget, 0.0) / 18)
    raw: dict[str, float] = {}
    with torch.no_grad():
        # one MAC of a large float32 GEMM: the unit of every cost
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        mac = clock.time(lambda: torch.mm(a, b)) / 1024**3

        # per element: a permute copy with contiguous runs of 6, a block transpose with runs
        # of 36, an index_select gather of whole rows
        x = torch.randn(96, 160, 60, 6)
        numel = x.numel()
        view = x.permute(0, 2, 1, 3)
        raw["permute"] = clock.time(lambda: view.contiguous()) / numel / mac
        swapped = x.view(96, 40, 40, 36).transpose(1, 2)
        raw["swap"] = clock.time(lambda: swapped.contiguous()) / numel / mac
        flat = torch.randn(96, 1024)
        index = torch.randperm(1024)
        raw["gather_index"] = (
            clock.time(lambda: torch.index_select(flat, 1, index)) / flat.numel() / mac
        )

        # per op launch under no_grad, then with autograd recording
        s = torch.randn(4)
        raw["kernel_prepared"] = clock.time(lambda: torch.add(s, s)) / mac

    sg = torch.randn(4, requires_grad=True)

    def record() -> None:
        torch.add(sg, sg)

    raw["kernel"] = clock.time(record) / mac

    with torch.no_grad():
        # per GEMM row: a narrow GEMM's time per row, on one thread (on several, a busy core
        # makes the threads of so short a product wait for each other, by 10-100x)
        rows, f, g = 65536, 4, 4
        xr, wr = torch.randn(rows, f), torch.randn(g, f)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            raw["row"] = clock.time(lambda: F.linear(xr, wr)) / rows / mac
        finally:
            torch.set_num_threads(threads)

        # tall products: oneDNN and the compiled kernel against MKL
        tall = torch.randn(15360, 360)
        w16 = torch.randn(16, 360)
        if ops.onednn_available():
            raw["onednn_gain"] = clock.ratio(
                lambda: ops.linear_nt(tall, w16), lambda: F.linear(tall, w16)
            )
        if native.available():
            for g, name in ((2, "native_gain"), (8, "native_gain_wide")):
                weight, out = torch.randn(g, 360), tall.new_empty(1, 15360, g)
                raw[name] = clock.ratio(
                    functools.partial(native.tall_matmul, tall[None], weight, out),
                    functools.partial(F.linear, tall, weight),
                )
            dest = torch.empty(view.shape)
            raw["native_gather"] = clock.time(lambda: native.gather(view, dest)) / numel / mac

        # a large product over a sequence's rows (a fused layer's input projection): oneDNN's
        # time over MKL's, the model's onednn_gemm as it is (not scaled by REFERENCE)
        if ops.onednn_available():
            n, f, g = ONEDNN_GEMM_SIZE
            rows_x, weight = torch.randn(n, f), torch.randn(g, f)
            raw["onednn_gemm"] = clock.ratio(
                lambda: ops.linear_nt(rows_x, weight), lambda: F.linear(rows_x, weight)
            )

        # a recurrent weight's gradient over a sequence's rows, torch.mm over oneDNN: the video
        # layer's (96 rows, 1,024 x 256) and a speech layer's share (960 rows, 2,048 x 512)
        if ops.onednn_available():
            for name, (n, g, h) in RECURRENT_GRAD_SIZES.items():
                d, hp = torch.randn(n, g), torch.randn(n, h)
                raw[name] = clock.ratio(
                    functools.partial(torch.mm, d.t(), hp),
                    functools.partial(ops.onednn_weight_grad, d, hp),
                )
    return raw


ROUTE_LAYER = (40, 256, 16, 300)
"""``(input, hidden, batch, steps)`` of the one-direction dense layer per mode that
:func:`measure_routes` times on kcprnn's compiled dense loop and on torch's kernel: the speech
regime's first layer."""

ROUTE_FIELDS = {
    f"route_{mode.lower()}{suffix}": f"rnn_dense_{mode.lower()}{suffix}"
    for mode in ("LSTM", "GRU", "RNN")
    for suffix in ("", "_train")
}
""":func:`measure_routes`' ratios and the cost-model fields :func:`calibrate` solves from them."""


def _route_layer(mode: str) -> tuple[RNNBase, RNNBase, torch.Tensor]:
    """A dense ``mode`` layer of :data:`ROUTE_LAYER`'s size run on kcprnn's dense loop, the
    same layer on torch's kernel, and an input."""
    import kcprnn  # here: kcprnn imports this package

    i, h, b, t = ROUTE_LAYER
    gen = torch.Generator().manual_seed(0)
    loop = getattr(kcprnn, mode)(i, h, format="dense")
    loop.recurrence = "dense"
    kernel = getattr(kcprnn, mode)(i, h, format="dense")
    kernel.load_state_dict(loop.state_dict())
    kernel.recurrence = "torch"
    return loop, kernel, torch.randn(t, b, i, generator=gen)


def measure_routes(budget: float = 20.0) -> dict[str, float]:
    """This machine's time of kcprnn's compiled dense loop over torch's kernel on one dense
    layer per mode (:data:`ROUTE_LAYER`), without gradients (``route_lstm``, ...) and for a
    forward and backward (``route_lstm_train``, ...), each pair called alternately; in about
    ``budget`` seconds. Empty where the compiled kernels or oneDNN are missing (the loop then
    runs on torch operations, which these fields do not price)."""
    if not (native.available() and ops.onednn_available()):
        return {}
    clock = _Clock(max(budget, 0.0) / len(ROUTE_FIELDS))
    raw: dict[str, float] = {}
    for mode in ("LSTM", "GRU", "RNN"):
        loop, kernel, x = _route_layer(mode)
        name = f"route_{mode.lower()}"
        with torch.no_grad():
            raw[name] = clock.ratio(functools.partial(loop, x), functools.partial(kernel, x))
        raw[name + "_train"] = clock.ratio(
            functools.partial(_train_call, loop, x), functools.partial(_train_call, kernel, x)
        )
    return raw


def measure_all(budget: float = 60.0) -> dict[str, float]:
    """:func:`measure` and :func:`measure_routes` in about ``budget`` seconds (three quarters
    and a quarter of it)."""
    raw = measure(budget * 0.75)
    raw.update(measure_routes(budget * 0.25))
    return raw


def _train_call(module: torch.nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    module(x)[0].sum().backward()


def _route_fields(raw: dict[str, float], base: CostModel) -> dict[str, float]:
    """The ``rnn_dense_*`` fields under which ``base`` prices the dense loop over torch's
    kernel at :data:`ROUTE_LAYER` as :func:`measure_routes` measured it (``raw``): the loop's
    price is linear in the field, so each is solved from the prices at 0 and 1; kept within
    0.25-4."""
    from ..rnn.plan import layer_costs  # here: the recurrent modules import this package

    changes: dict[str, float] = {}
    i, h, b, t = ROUTE_LAYER
    for key, field in ROUTE_FIELDS.items():
        if key not in raw:
            continue
        mode = key.split("_")[1].upper()
        training = key.endswith("_train")
        cells = [_route_layer(mode)[0].cell(0)]
        prices = [
            layer_costs(cells, b * t, t, True, training, base.replace(**{field: f}))
            for f in (0.0, 1.0)
        ]
        fixed, per_unit = prices[0]["dense"], prices[1]["dense"] - prices[0]["dense"]
        solved = (raw[key] * prices[0]["torch"] - fixed) / per_unit
        changes[field] = _sig(min(max(solved, 0.25), 4.0))
    return changes


RECURRENT_GRAD_SIZES: dict[str, tuple[int, int, int]] = {
    "recurrent_grad_mm": (96, 1024, 256),
    "recurrent_grad_mm_wide": (960, 2048, 512),
}
"""The ``(rows, gates, hidden)`` of :func:`measure`'s recurrent-gradient timings."""

ONEDNN_GEMM_SIZE = (1600, 256, 1024)
"""``(rows, inputs, outputs)`` of :func:`measure`'s ``onednn_gemm`` timing: the input
projection of a speech layer's 100 steps (batch 16, 256 inputs, an LSTM's 1,024 gates)."""

ONEDNN_GRAD_ROWS = 2048
"""``recurrent_grad_mm_rows`` where oneDNN computed the recurrent gradient faster at both sizes:
oneDNN up to 2,048 rows, ``torch.mm`` beyond (faster at 4,800 rows on every machine measured)."""


def calibrate(budget: float = 60.0, base: CostModel | None = None) -> CostModel:
    """``base`` (default: the built-in defaults) with every field :func:`measure` covers
    scaled by how this machine's measurement compares with :data:`REFERENCE`'s: the defaults
    fold in effects a micro-benchmark does not see (they were tuned end to end by
    ``benchmarks/bench_kcp_auto.py``), so the ratio carries them to the new machine; and
    ``recurrent_grad_mm_rows`` 0 where ``torch.mm`` computed the recurrent gradient faster than
    oneDNN at every size measured (:data:`RECURRENT_GRAD_SIZES`), :data:`ONEDNN_GRAD_ROWS` where
    oneDNN did (a mixed result keeps ``base``'s); and the ``rnn_dense_*`` factors that make
    ``base`` price the dense loop over torch's kernel as :func:`measure_routes` timed them."""
    base = CostModel() if base is None else base
    raw = measure_all(budget)
    changes: dict[str, float | int] = {
        name: _sig(getattr(base, name) * value / REFERENCE[name])
        for name, value in raw.items()
        if name in REFERENCE and REFERENCE[name] > 0
    }
    grad = [raw[name] for name in RECURRENT_GRAD_SIZES if name in raw]
    if grad and max(grad) < 1.0:  # torch.mm faster at every size measured
        changes["recurrent_grad_mm_rows"] = 0
    elif grad and min(grad) > 1.0:  # oneDNN faster at every size measured
        changes["recurrent_grad_mm_rows"] = ONEDNN_GRAD_ROWS
    if "onednn_gemm" in raw:
        changes["onednn_gemm"] = _sig(raw["onednn_gemm"])
    changes.update(_route_fields(raw, base))
    return base.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn calibrate",
        description="Measure this machine's costs (relative to one MAC of a large float32 GEMM) "
        "and print the cost model as JSON.",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds to spend (default 60)")
    parser.add_argument("--threads", type=int, help="torch threads to measure with")
    parser.add_argument("--base", help="a cost model JSON to scale (default: the built-in one)")
    parser.add_argument(
        "--raw", action="store_true", help="print the raw measurements instead of a model"
    )
    parser.add_argument("--out", help="also write the model to this file (atomically)")
    parser.add_argument(
        "--save",
        action="store_true",
        help="also keep the model as this machine's default: every later kcprnn process on this "
        "CPU and torch version loads it unless $KCPRNN_COST_MODEL names another "
        "(`builtin`: the defaults)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.raw:
        print(json.dumps(measure_all(args.budget), indent=2))
        return 0
    base = CostModel.load(args.base) if args.base else None
    model = calibrate(args.budget, base)
    print(json.dumps(model.to_dict(), indent=2))
    if args.out:
        model.save(args.out)
    if args.save:
        path = machine_model_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        forget_machine_model()
        print(f"saved as this machine's cost model: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
