"""Default-budget KCP cells (``kcprnn.<MODE>Cell(40, 512, format="kcp", hidden_format="kcp")``)
stepping with their own backward and unchanged weights (the suite's cell protocol: the factor
matrices are built once and every step back-propagates through that build), with KCP's flat
factor groups back-propagated by broadcast or by batched products
(:func:`kcprnn.formats.kcp.algebra.outer_rows`), against ``torch.nn``'s cell; the three
interleaved step by step, medians of 300 steps, 1 thread.

Usage::

    python benchmarks/ab_outer_rows_cells.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

import kcprnn
from kcprnn.formats.kcp import algebra

DEFAULT = algebra.OUTER_BMM_ROWS
OFF = 1 << 60  # OUTER_BMM_ROWS that never takes the batched backward


def _step(m: nn.Module, x: Tensor, hx: object, lstm: bool) -> None:
    out = m(x, hx)
    (out[0] + out[1] if lstm else out).sum().backward()


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, 300 interleaved steps")
    for mode in ("LSTM", "GRU", "RNN"):
        lstm = mode == "LSTM"
        torch.manual_seed(0)
        x = torch.randn(1, 40)
        state = [torch.randn(1, 512) for _ in range(2 if lstm else 1)]
        hx = tuple(state) if lstm else state[0]
        ref = getattr(torch.nn, f"{mode}Cell")(40, 512)
        cells = {}
        for batched in (False, True):
            algebra.OUTER_BMM_ROWS = DEFAULT if batched else OFF
            torch.manual_seed(1)
            cell = getattr(kcprnn, f"{mode}Cell")(40, 512, format="kcp", hidden_format="kcp")
            _step(cell, x, hx, lstm)  # builds the kept factor matrices under this setting
            cells[batched] = cell
        algebra.OUTER_BMM_ROWS = DEFAULT
        times: dict[object, list[float]] = {"torch": [], False: [], True: []}
        for _ in range(300):
            for key, t in times.items():
                m = ref if key == "torch" else cells[key]
                start = time.perf_counter()
                _step(m, x, hx, lstm)
                t.append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"{mode}Cell(40, 512) default KCP: torch {med['torch']:.2f} ms, "
            f"broadcast {med[False]:.2f} ms ({med['torch'] / med[False]:.2f}x), "
            f"batched {med[True]:.2f} ms ({med['torch'] / med[True]:.2f}x)"
        )


if __name__ == "__main__":
    main()
