"""torch.nn.LSTM against kcprnn's dense biLSTM (the compiled dense loop in training) at the
speech point (T=300, batch 16, 40 -> 512, 1 thread), forward+backward, under three protocols:
gradients accumulated, gradients cleared before each call (``p.grad = None``), and cleared with
``train()``/``eval()`` toggled by a ``no_grad`` forward between calls (as ``kcprnn bench``
does). Run it twice, once as is and once with glibc's mmap threshold raised, to see how much of
torch's training call is page faults on fresh workspace::

    python benchmarks/ab_lstm_allocator.py [--layers 3] [--reps 5]
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        python benchmarks/ab_lstm_allocator.py
"""

import argparse
import os
import statistics
import time

import torch

import kcprnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(300, 16, 40)
    ref = torch.nn.LSTM(40, 512, bidirectional=True, num_layers=args.layers)
    ours = kcprnn.LSTM(40, 512, bidirectional=True, format="dense", num_layers=args.layers)

    def train_call(m: torch.nn.Module, clear: bool, toggle: bool) -> float:
        if toggle:
            m.train()
        if clear:
            for p in m.parameters():
                p.grad = None
        start = time.perf_counter()
        m(x)[0].sum().backward()
        return time.perf_counter() - start

    def infer_call(m: torch.nn.Module) -> None:
        m.eval()
        with torch.no_grad():
            m(x)

    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(
        f"# torch {torch.__version__}, 1 thread, {args.layers} layer(s), "
        f"MALLOC_MMAP_THRESHOLD_={threshold}"
    )
    for clear, toggle in ((False, False), (True, False), (True, True)):
        a, b = [], []
        for _ in range(args.reps):
            if toggle:
                infer_call(ref)
                infer_call(ours)
            a.append(train_call(ref, clear, toggle))
            b.append(train_call(ours, clear, toggle))
        ta, tb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(
            f"clear grads {clear!s:5} toggle {toggle!s:5}: torch.nn {ta:.0f} ms, "
            f"kcprnn {tb:.0f} ms, ratio {tb / ta:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
