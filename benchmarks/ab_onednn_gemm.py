"""Interleaved A/B of the large products of a sequence on oneDNN against MKL: the fused layers'
input projections, their weight gradients and ``W_hh``'s gradient, run where
:func:`kcprnn._cpu.ops.onednn_gemm_wins` prices them lower (the cost model's ``onednn_gemm``:
the built-in value for this CPU, or ``--gain``) against the same modules with ``onednn_gemm =
1`` (always MKL), each next to ``torch.nn``'s module, at the speech and spike points of the
suite.

    python benchmarks/ab_onednn_gemm.py [--points speech,spikes] [--modes LSTM,GRU,RNN]
        [--formats dense,kcp,tt] [--reps 5] [--threads 1] [--gain G] [--gemms]

Prints one line per point, module and phase: ``torch.nn``'s time over kcprnn's with MKL and with
the priced choice (medians of the per-round ratios; the three modules called in turn each
round), then the large GEMM's rates on both libraries at the point's input projection.
``--gemms`` times the three products of a set of shapes on both libraries instead.
"""

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from ab_dense_loop import _timed  # the same protocol (benchmarks/)

import kcprnn
from kcprnn._cpu.cost import CostModel

POINTS = {  # (input, hidden, batch, steps, bidirectional)
    "speech": [(40, 256, 16, 300, True), (40, 512, 16, 300, True), (123, 256, 16, 300, True),
               (123, 512, 16, 300, True)],
    "spikes": [(700, 256, 32, 100, False), (700, 256, 32, 250, False)],
}  # fmt: skip


def _gemm_rates(n: int, i: int, g: int, reps: int = 5) -> str:
    """MKL's and oneDNN's rate (GMAC/s) for the input projection ``(n, i) @ (i, g)``."""
    x, w = torch.randn(n, i), torch.randn(g, i)
    onednn = torch.ops.mkldnn._linear_pointwise
    rates = []
    for fn in (lambda: torch.mm(x, w.t()), lambda: onednn(x, w, None, "none", [], "")):
        fn()
        best = min(_time(fn) for _ in range(reps))
        rates.append(n * i * g / best / 1e9)
    return f"input projection {n}x{i}x{g}: MKL {rates[0]:.1f}, oneDNN {rates[1]:.1f} GMAC/s"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


GEMM_SHAPES = [  # (rows, inputs, outputs): input projections of the suite's layers and others
    (4800, 40, 1024), (4800, 40, 2048), (4800, 123, 1024), (4800, 123, 2048), (4800, 512, 2048),
    (3200, 700, 1024), (8000, 700, 1024), (3200, 256, 1024), (320, 40, 2048), (64, 700, 1024),
]  # fmt: skip


def _gemm_table(reps: int) -> None:
    """Each shape's three products on MKL and on oneDNN (ms, medians): the forward into memory
    kept between calls (as the fused layers' input projection on MKL) against oneDNN's fresh
    output; the weight's gradient ``grad.T @ x`` and the input's ``grad @ W``."""
    onednn = torch.ops.mkldnn._linear_pointwise

    def ms(fn) -> float:
        fn()
        return 1e3 * statistics.median(_time(fn) for _ in range(reps))

    print("# rows x in x out: forward MKL / oneDNN | weight grad | input grad (ms)")
    for n, i, g in GEMM_SHAPES:
        x, w, d, b = torch.randn(n, i), torch.randn(g, i), torch.randn(n, g), torch.randn(g)
        out = torch.empty(n, g)
        wt = w.t().contiguous()
        pairs = [
            (partial(torch.addmm, b, x, w.t(), out=out), partial(onednn, x, w, b, "none", [], "")),
            (partial(torch.mm, d.t(), x), partial(onednn, d.t(), x.t(), None, "none", [], "")),
            (partial(torch.mm, d, w), partial(onednn, d, wt, None, "none", [], "")),
        ]
        cells = [f"{ms(a):.2f} / {ms(c):.2f}" for a, c in pairs]
        print(f"{n}x{i}x{g}: " + " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="speech,spikes")
    ap.add_argument("--modes", default="LSTM,GRU,RNN")
    ap.add_argument("--formats", default="dense,kcp,tt")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--gain", type=float, help="onednn_gemm of the priced model (default: built-in)"
    )
    ap.add_argument("--gemms", action="store_true", help="only time the GEMM shapes on both")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gemms:
        _gemm_table(max(args.reps, 3))
        return
    folder = Path(tempfile.mkdtemp(prefix="ab-onednn-"))
    priced = CostModel() if args.gain is None else CostModel(onednn_gemm=args.gain)
    models = {"mkl": folder / "mkl.json", "priced": folder / "priced.json"}
    CostModel(onednn_gemm=1.0).save(models["mkl"])
    priced.save(models["priced"])
    print(
        f"# torch {torch.__version__}, threads {args.threads}, reps {args.reps}, "
        f"priced onednn_gemm {priced.onednn_gemm}",
        flush=True,
    )
    for point in args.points.split(","):
        for i, h, b, t, bi in POINTS[point]:
            for mode in args.modes.split(","):
                ref = getattr(torch.nn, mode)(i, h, bidirectional=bi)
                x = torch.randn(t, b, i)
                for fmt in args.formats.split(","):
                    options = {"format": fmt, "hidden_format": "dense"}
                    if fmt != "dense":
                        options["rank"] = 4
                    ours = {}
                    for name, path in models.items():
                        os.environ["KCPRNN_COST_MODEL"] = str(path)
                        torch.manual_seed(1)
                        ours[name] = getattr(kcprnn, mode)(i, h, bidirectional=bi, **options)
                    for kind in ("infer", "train"):
                        ratios: dict[str, list[float]] = {name: [] for name in models}
                        for rep in range(args.reps + 1):
                            base = _timed(ref, x, kind)
                            ref.zero_grad(set_to_none=True)
                            for name, module in ours.items():
                                os.environ["KCPRNN_COST_MODEL"] = str(models[name])
                                took = _timed(module, x, kind)
                                module.zero_grad(set_to_none=True)
                                if rep:  # the first round warms every module
                                    ratios[name].append(base / took)
                        cells = " ".join(
                            f"{name} {statistics.median(r):.2f}" for name, r in ratios.items()
                        )
                        print(
                            f"{point} {mode} {i}->{h} B={b} T={t}{' bi' if bi else ''} {fmt:5s} "
                            f"{kind:5s} torch.nn/kcprnn: {cells}",
                            flush=True,
                        )
                g = {"LSTM": 4, "GRU": 3, "RNN": 1}[mode] * h
                print(f"# {_gemm_rates(b * t, i, g)}", flush=True)
    os.environ.pop("KCPRNN_COST_MODEL", None)


if __name__ == "__main__":
    main()
