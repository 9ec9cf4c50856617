"""Dense cells at batch 1 against ``torch.nn``'s: one step with a given state, forward under
``no_grad`` and forward+backward of ``h.sum()``, kcprnn's cell made ``from_torch`` (the same
weights), the two interleaved call by call; medians of ``--rounds`` (us) and ``torch.nn``'s
time over kcprnn's (above 1, kcprnn is faster). Run it on two checkouts to compare them.

Usage::

    python benchmarks/ab_dense_cell_step.py [--size 40x512] [--rounds 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="40x512")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_in, hidden = map(int, args.size.split("x"))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {n_in} -> {hidden}, batch 1")
    for name in ("RNNCell", "GRUCell", "LSTMCell"):
        torch.manual_seed(0)
        ref = getattr(torch.nn, name)(n_in, hidden)
        ours = getattr(kcprnn, name).from_torch(ref, format="dense")
        x, h = torch.randn(1, n_in), torch.randn(1, hidden)
        state = (h, torch.randn(1, hidden)) if name == "LSTMCell" else h
        times: dict[str, list[list[float]]] = {"torch": [[], []], "kcprnn": [[], []]}
        for r in range(args.rounds + 20):
            for label, cell in (("torch", ref), ("kcprnn", ours)):
                with torch.no_grad():
                    start = time.perf_counter()
                    cell(x, state)
                    forward = time.perf_counter() - start
                start = time.perf_counter()
                out = cell(x, state)
                (out[0] if isinstance(out, tuple) else out).sum().backward()
                train = time.perf_counter() - start
                if r >= 20:  # warm-up
                    times[label][0].append(forward)
                    times[label][1].append(train)
        med = {k: [statistics.median(v) * 1e6 for v in pair] for k, pair in times.items()}
        t, k = med["torch"], med["kcprnn"]
        print(
            f"{name}: forward torch.nn {t[0]:.1f} us, kcprnn {k[0]:.1f} us ({t[0] / k[0]:.3f}); "
            f"forward+backward {t[1]:.1f} us, {k[1]:.1f} us ({t[1] / k[1]:.3f})"
        )


if __name__ == "__main__":
    main()
