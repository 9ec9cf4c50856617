"""The factor gradients of a Kronecker-sum ``W_hh`` over all rows of a sequence, taken from the
whole matrix's gradient (the compiled structured loop's dense-first path): the gradient's GEMM
on MKL and as :func:`kcprnn.rnn._fused_base._recurrent_weight_grad` runs it (oneDNN where that
prices lower), then the factors' gradients as the sweeps of :func:`kcprnn.rnn.kron.kron_grads`
over an identity of ``I`` rows (the previous method) and as the MTTKRP of
:func:`kcprnn.rnn.kron.kron_grads_from_dense`, with their largest relative difference.

    python benchmarks/bench_kron_grads.py [--threads 1] [--reps 7]

Prints one line per matrix (the suite's rank-4 CP and KCP ``W_hh`` of LSTMs at hidden 256 and
512, 4,800 rows): medians of ``--reps`` calls after one warm-up, ms.
"""

import argparse

import torch
from ab_factor_dense import median_ms  # the same timing (benchmarks/)

import kcprnn
from kcprnn.rnn._fused_base import _recurrent_weight_grad
from kcprnn.rnn.kron import kron_grads, kron_grads_from_dense, kron_terms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = 4800  # T = 300, batch 16
    print(f"# torch {torch.__version__} threads {args.threads} reps {args.reps} rows {rows}")
    for fmt in ("cp", "kcp"):
        for hidden in (256, 512):
            module = kcprnn.LSTM(
                40, hidden, format=fmt, rank=4, hidden_format=fmt, hidden_options={"rank": 4}
            )
            found = kron_terms(module.cell(0).weight_hh)
            assert found is not None
            mats = [a.detach() for a in found[0]]
            needs = [True] * len(mats)
            grad, x = torch.randn(rows, 4 * hidden), torch.randn(rows, hidden)
            dense = grad.t() @ x  # (g, h)
            eye = torch.eye(hidden)
            sweeps = kron_grads(eye, dense.t(), mats, needs)
            mttkrp = kron_grads_from_dense(dense, mats, needs)
            diff = max(
                float((a - b).abs().max() / a.abs().max())
                for a, b in zip(sweeps, mttkrp, strict=True)
                if a is not None and b is not None
            )
            t_mkl = median_ms(lambda g=grad, x=x: g.t().mm(x), args.reps)
            t_gemm = median_ms(lambda g=grad, x=x: _recurrent_weight_grad(g, x), args.reps)
            t_sweeps = median_ms(
                lambda e=eye, d=dense, m=mats, n=needs: kron_grads(e, d.t(), m, n), args.reps
            )
            t_mttkrp = median_ms(
                lambda d=dense, m=mats, n=needs: kron_grads_from_dense(d, m, n), args.reps
            )
            shapes = [tuple(a.shape) for a in mats]
            print(
                f"{fmt:3s} hidden {hidden}: factors {shapes}; GEMM {rows}x{4 * hidden}x{hidden} "
                f"MKL {t_mkl:.1f} ms, as run {t_gemm:.1f} ms; factor gradients: sweeps over an "
                f"identity {t_sweeps:.2f} ms, MTTKRP {t_mttkrp:.2f} ms (max rel diff {diff:.1e})",
                flush=True,
            )


if __name__ == "__main__":
    main()
