"""Measures the cost model's prices of one cell step without gradients
(``CostModel.rnn_torch_cell``, ``rnn_cell_weight``, ``rnn_cell_row``, ``rnn_native_weight``,
``rnn_native_row``, ``rnn_cell_gather``, and ``rnn_cell_op`` as the compiled step's fixed
price), on one thread.

Each price is a least-squares fit over a few sizes, every size's time the median of short
blocks of calls:

- torch's fused cell on kept dense weights: ``t = fixed + elements * (weight + row * rows)``
  over LSTM cells 40 -> {8, 128, 512} and 1, 4, 16 rows (kcprnn KCP cells forced to their dense
  step, so the cell's Python is included);
- the compiled step with two dense matrices, the same sizes: the same form;
- the compiled step's fixed price: a KCP LSTM cell 8 -> 8 at one row;
- one gathered input element: the compiled step of a KCP ``W_ih`` 57,600 -> 1,024 (a
  permuted layout) against the same factors with no permutation (CP), per input.

Times are converted to the model's units (one MAC of a large float32 GEMM on the reference
machine, 2 threads) with :data:`UNIT_PS`, the unit behind ``kernel_prepared`` (1.5e5 for an op
launch of 2.7 us). Usage: ``python benchmarks/bench_cell_costs.py [--rounds 41]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import kcprnn
from kcprnn._cpu.native_rnn import KronArgs
from kcprnn._cpu.native_step import CellStep

UNIT_PS = 18.0  # picoseconds per cost unit


def _median_us(fn, rounds: int) -> float:
    """Median time of ``fn`` over ``rounds`` blocks of about 0.3 ms each: blocks this short are
    seldom cut by the scheduler on a shared machine, so the median sees the unloaded time."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(3e-4 / (time.perf_counter() - start)))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def _fit(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least squares of ``t = a + b * elements + c * elements * rows`` over ``(elements, rows,
    t)``."""
    x = torch.tensor([[1.0, e, e * r] for e, r, _ in points], dtype=torch.float64)
    y = torch.tensor([t for _, _, t in points], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    return a, b, c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"load before {os.getloadavg()}")
    torch_points, native_points = [], []
    with torch.no_grad():
        for hidden in (8, 128, 512):
            cell = kcprnn.LSTMCell(40, hidden, format="kcp", hidden_format="kcp")
            w_ih, w_hh = cell._dense_weights()
            elements = w_ih.numel() + w_hh.numel()
            dense = CellStep("LSTM", hidden, 40, w_ih, cell.bias_ih, w_hh, cell.bias_hh)
            cell._use_dense = lambda b: True  # type: ignore[method-assign]
            for rows in (1, 4, 16):
                x, h, c = (
                    torch.randn(rows, 40),
                    torch.randn(rows, hidden),
                    torch.randn(rows, hidden),
                )
                step = (cell, dense, x, h, c)
                t_torch = _median_us(lambda s=step: s[0](s[2], (s[3], s[4])), args.rounds)
                t_native = _median_us(lambda s=step: s[1](*s[2:]), args.rounds)
                torch_points.append((elements, rows, t_torch))
                native_points.append((elements, rows, t_native))
                print(
                    f"hidden {hidden:4} rows {rows:3}: torch cell {t_torch:8.1f} us, "
                    f"compiled dense {t_native:8.1f} us"
                )
        small = kcprnn.LSTMCell(8, 8, format="kcp", hidden_format="kcp")
        x, h, c = torch.randn(1, 8), torch.randn(1, 8), torch.randn(1, 8)
        t_call = _median_us(lambda: small(x, (h, c)), args.rounds)
        wide = kcprnn.LSTMCell(57_600, 256, format="kcp")
        mats = [a.detach() for a in kcprnn.rnn.kron.kron_terms(wide.weight_ih)[0]]
        layout = kcprnn.rnn.kron.kron_terms(wide.weight_ih)[1]
        w_hh = wide.weight_hh.to_dense().detach().contiguous()
        permuted = CellStep(
            "LSTM", 256, 57_600, KronArgs(mats, *layout.indices("cpu")), None, w_hh, None
        )
        plain = CellStep("LSTM", 256, 57_600, KronArgs(mats, None, None), None, w_hh, None)
        x, h, c = torch.randn(1, 57_600), torch.randn(1, 256), torch.randn(1, 256)
        t_perm = _median_us(lambda: permuted(x, h, c), args.rounds)
        t_plain = _median_us(lambda: plain(x, h, c), args.rounds)
    fixed, weight, row = _fit(torch_points)
    n_fixed, n_weight, n_row = _fit(native_points)
    gather_ps = max(t_perm - t_plain, 0.0) * 1e6 / 57_600
    to_units = 1e6 / UNIT_PS  # us -> units
    print(
        f"torch cell: fixed {fixed:.1f} us, {weight * 1e6:.0f} ps per element, "
        f"{row * 1e6:.0f} ps per element and row"
    )
    print(
        f"compiled dense: fixed {n_fixed:.1f} us, {n_weight * 1e6:.0f} ps per element, "
        f"{n_row * 1e6:.0f} ps per element and row"
    )
    print(
        f"compiled KCP step 8 -> 8 in the cell: {t_call:.1f} us; gather {gather_ps:.0f} ps "
        f"per input ({t_perm:.1f} against {t_plain:.1f} us)"
    )
    print("in units:")
    print(f"  rnn_torch_cell    {fixed * to_units:.3g}")
    print(f"  rnn_cell_weight   {weight * to_units:.3g}")
    print(f"  rnn_cell_row      {row * to_units:.3g}")
    print(f"  rnn_native_weight {n_weight * to_units:.3g}")
    print(f"  rnn_native_row    {n_row * to_units:.3g}")
    print(f"  rnn_cell_op       {t_call * to_units:.3g}  (the compiled step's fixed price)")
    print(f"  rnn_cell_gather   {gather_ps / UNIT_PS:.3g}")
    print(f"load after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
