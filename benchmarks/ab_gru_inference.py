"""GRU (and ``--modes LSTM``) inference on the fused routes against ``torch.nn``'s module
(eval, ``no_grad``).

One-layer modules with dense weights on the ``dense`` route (the compiled dense loop) and, for
``--formats cp`` or ``kcp``, that format at rank 4 for both matrices on the ``structured``
route, at the spike points
(700 inputs, 32 sequences of 100 and 250 steps, hidden 256; and hidden 128, batch 16) and the
speech point (bidirectional, 40 inputs, 16 sequences of 300 steps, hidden 256). Prints the
medians of ``--reps`` calls after two warm-ups, ours and torch's interleaved
(:func:`~kcprnn.benchmarking.timing.time_interleaved`), and
``torch.nn``'s time over ours. Run it on two versions of the code to compare them.

Usage::

    python benchmarks/ab_gru_inference.py [--threads 1] [--reps 11] [--formats dense,cp]
        [--modes GRU,LSTM]
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch

import kcprnn
from kcprnn.benchmarking.timing import time_interleaved

# (input, hidden, steps, batch, bidirectional)
SIZES = [
    (700, 256, 100, 32, False),
    (700, 256, 250, 32, False),
    (700, 128, 100, 16, False),
    (40, 256, 300, 16, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--formats", default="dense")
    parser.add_argument("--modes", default="GRU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms, medians of {args.reps}")
    for mode, fmt in itertools.product(args.modes.split(","), args.formats.split(",")):
        for inputs, hidden, steps, batch, bi in SIZES:
            torch.manual_seed(0)
            options = {} if fmt == "dense" else {"rank": 4, "hidden_options": {"rank": 4}}
            ours = getattr(kcprnn, mode)(
                inputs, hidden, bidirectional=bi, format=fmt, hidden_format=fmt, **options
            ).eval()
            ours.recurrence = "dense" if fmt == "dense" else "structured"
            ref = getattr(torch.nn, mode)(inputs, hidden, bidirectional=bi).eval()
            x = torch.randn(steps, batch, inputs)
            with torch.no_grad():
                ours_t, ref_t = time_interleaved(
                    [partial(ours, x), partial(ref, x)],
                    device=x.device,
                    rounds=args.reps,
                    warmup=2,
                )
            ms = {"ours": ours_t.median_s * 1e3, "torch.nn": ref_t.median_s * 1e3}
            print(
                f"{mode} {fmt:5s} {(inputs, hidden, steps, batch, bi)}: ours {ms['ours']:.2f}, "
                f"torch.nn {ms['torch.nn']:.2f}, torch.nn / ours {ms['torch.nn'] / ms['ours']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
