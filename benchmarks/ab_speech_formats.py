"""Interleaved A/B at the speech point: every format (both matrices, the modules' default sizes
unless noted) against the same torch.nn module, bidirectional, T=300, batch 16, 40 -> 512,
1 thread. Each round times torch.nn then kcprnn; the reading is the median of the per-round
ratios (and the largest), which separates a real overhead from the machine's drift. Three
measurements: the forward under ``no_grad`` (``infer``: kcprnn keeps weights rebuilt from its
factors between such calls), the forward with autograd recording (``fwd``) and the forward
plus ``backward`` (``fwd+bwd``).

    python benchmarks/ab_speech_formats.py LSTM 9 [infer,fwd,fwd+bwd]
"""

import statistics
import sys
import time

import torch

import kcprnn


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode, reps = sys.argv[1], int(sys.argv[2])
    x = torch.randn(300, 16, 40)  # (t, b, i)
    ref = getattr(torch.nn, mode)(40, 512, bidirectional=True)
    make = getattr(kcprnn, mode)
    small = {"rank": 1, "num_factors": 2, "hidden_options": {"rank": 1, "num_factors": 2}}
    cases = {
        "dense/dense": {"format": "dense"},
        "kcp/dense": {"format": "kcp", "rank": 1},
        "kcp/kcp": {"format": "kcp", "hidden_format": "kcp", **small},
    }
    for f in ("tt", "tr", "bt", "ht", "cp", "tucker"):
        cases[f"{f}/{f}"] = {"format": f, "hidden_format": f}
    cases["kcp/kcp default"] = {"format": "kcp", "hidden_format": "kcp"}
    mods = {k: make(40, 512, bidirectional=True, **v) for k, v in cases.items()}

    def timed(m: torch.nn.Module, kind: str) -> float:
        t0 = time.perf_counter()
        with torch.set_grad_enabled(kind != "infer"):
            out, _ = m(x)
        if kind == "fwd+bwd":
            out.sum().backward()
        return time.perf_counter() - t0

    kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["infer", "fwd", "fwd+bwd"]

    print(f"# {mode} torch {torch.__version__} threads 1 reps {reps}", flush=True)
    for kind in kinds:
        for m in [*mods.values(), ref]:
            timed(m, kind)  # warm
        for k, m in mods.items():
            a, b = [], []
            for _ in range(reps):
                a.append(timed(ref, kind))
                b.append(timed(m, kind))
            ratios = [q / p for p, q in zip(a, b, strict=True)]
            print(
                f"{mode} {kind:8s} {k:16s} "
                f"torch {1e3 * statistics.median(a):7.1f} ms  "
                f"kcprnn {1e3 * statistics.median(b):7.1f} ms  "
                f"median ratio {statistics.median(ratios):.3f}  max ratio {max(ratios):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
