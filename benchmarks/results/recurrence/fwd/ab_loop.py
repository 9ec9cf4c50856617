"""A/B timing of the compiled LSTM loop (one direction of the speech size, warm buffers, 1
thread, CPU time of the thread): libraries built from two versions of native_rnn.cpp, called
alternately.

    python ab_loop.py A.so B.so [reps]      (build: g++ -O3 -march=native -fopenmp -shared -fPIC
                                             -std=c++17 native_tall.cpp native_rnn.cpp -o X.so)
"""

import statistics
import sys
import time
from pathlib import Path

import torch

import kcprnn
from kcprnn._cpu import native, native_rnn
from kcprnn.rnn.fused import _Kron
from kcprnn.rnn.kron import kron_terms

torch.set_num_threads(1)
torch.manual_seed(0)
KCP = {"rank": 1, "num_factors": 2}
m = kcprnn.LSTM(40, 512, format="kcp", hidden_format="kcp", hidden_options=dict(KCP), **KCP)
mats, layout = kron_terms(m.cell(0, 0).weight_hh)
prod = _Kron(layout, [a.detach() for a in mats])
T, B, H = 300, 16, 512
gx = torch.randn(T * B, 4 * H)
bias = torch.randn(4 * H)
h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
libs = [native.load(Path(p)) for p in sys.argv[1:3]]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 11
args = prod.args()
outs = []
for _lib in libs:
    bufs = [torch.zeros(T, B, 4 * H)] + [torch.zeros(T, B, H) for _ in range(4)]
    outs.append(bufs)
times: list[list[float]] = [[], []]
for r in range(reps + 1):
    for k in (0, 1) if r % 2 else (1, 0):
        native._state["lib"] = libs[k]
        acts, hs, cs, tcs, x_fm = outs[k]
        t0 = time.thread_time()
        native_rnn.lstm_forward(gx, bias, acts, h0, c0, hs, cs, tcs, False, True, args, x_fm)
        if r:
            times[k].append(time.thread_time() - t0)
a, b = (statistics.median(t) * 1e3 for t in times)
print(
    f"A {a:.2f} ms  B {b:.2f} ms  B/A {b / a:.3f}  max|hs diff| "
    f"{(outs[0][1] - outs[1][1]).abs().max().item():.2e}"
)
