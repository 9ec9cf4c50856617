"""The first GEMM of KCP's blocked layout, with the input in cache and in memory.

At the UCF11 size (96 rows x 57,600, factor 2 owning the trailing 360 inputs of every row and
writing 2 outputs) the first contraction is the one pass over the input every factorized layer
must make. This script times the ways to run it against reading the input once (``x.sum()``):

* ``linear``: ``F.linear`` on the ``(15,360, 360)`` view (MKL), output ``(b, 160, 2)``;
* ``linear+T``: the same plus the transposing copy the next factor needs (what kcprnn runs);
* ``bmm-T``: one GEMM per row on the broadcast matrix, writing ``(b, 2, 160)`` directly;
* ``onednn``: oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``), where present;
* ``kernel``: kcprnn's compiled kernel (``kcprnn._cpu.native``), output ``(b e, 2)``;
* ``kernel-T``: the same writing ``(b, 2, 160)`` through strides (what kcprnn runs now);

each "hot" (called twice in a row, the input in cache) and "cold" (a 128 MB write between calls
evicts it), with interleaved rounds; medians and ratios to the read from one run. Among torch's
ways ``linear+T`` was kcprnn's choice: ``bmm-T`` wins hot and loses badly cold. The compiled
kernel beats all of them hot and cold, and ``kernel-T`` saves the transposing copy.

Usage::

    python benchmarks/bench_first_gemm.py [--threads 2] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kcprnn._cpu import native as _native


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(96, 57600)  # (b, i)
    w = torch.randn(2, 360)  # factor 2's dense matrix (g, f)
    rows = x.view(-1, 360)  # (b e, f)
    per_row = x.view(96, 160, 360)  # (b, e, f)
    flush = torch.zeros(32 * 1024 * 1024)  # 128 MB, larger than the last-level cache
    cases = {
        "read": lambda: x.sum(),
        "linear": lambda: F.linear(rows, w),
        "linear+T": lambda: F.linear(rows, w).view(96, 160, 2).transpose(1, 2).contiguous(),
        "bmm-T": lambda: torch.bmm(w.expand(96, 2, 360), per_row.transpose(1, 2)),
    }
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if onednn is not None:
        cases["onednn"] = lambda: onednn(rows, w, None, "none", [], "")
    if _native.available():
        cases["kernel"] = lambda: _native.tall_matmul(rows[None], w, x.new_empty(1, 15360, 2))
        cases["kernel-T"] = lambda: _native.tall_matmul(
            per_row, w, x.new_empty(96, 2, 160).transpose(1, 2)
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median ms of {args.rounds} interleaved rounds; ratio to the read of the same regime"
    )
    for regime in ("hot", "cold"):
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                if regime == "cold":
                    flush.add_(1.0)
                else:
                    fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        line = ", ".join(f"{name} {ms:.3f} ({ms / med['read']:.2f}x)" for name, ms in med.items())
        print(f"{regime:4s}: {line}")


if __name__ == "__main__":
    main()
