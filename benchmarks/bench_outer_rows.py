"""The backward of KCP's flat factor groups (:func:`kcprnn.formats.kcp.algebra.outer_rows`):
batched products against autograd's broadcast product and reduction.

Part 1, the factor matrices on torch operations (those the compiled kernel does not take,
:func:`kcprnn._cpu.native_factor.applies`) of every module's default-budget KCP matrices at the
speech and spike sizes: :func:`~kcprnn.formats.kcp.algebra.factor_dense_torch` built and
back-propagated (one gradient of the matrix), with ``OUTER_BMM_ROWS`` at its value and with the
batched backward switched off, the two interleaved round by round; medians (us) and their
ratio (above 1: the batched backward is faster).

Part 2, one training step of a default-budget KCP cell at batch 1 (forward from a random state,
``sum``, backward) against ``torch.nn``'s cell, both ways. Every parameter's version counter is
bumped before each step, as an optimizer step does, so each step builds its factor matrices
afresh (a cell keeps them while its parameters are unchanged).

Usage::

    python benchmarks/bench_outer_rows.py [--threads 1] [--rounds 100]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import kcprnn
from kcprnn._cpu import native_factor
from kcprnn.formats.kcp import algebra

MODULES = [  # (mode, inputs, hidden)
    ("LSTM", 40, 512),
    ("LSTM", 40, 256),
    ("LSTM", 123, 512),
    ("GRU", 40, 512),
    ("RNN", 40, 512),
    ("LSTM", 700, 256),
    ("LSTM", 700, 128),
]
DEFAULT = algebra.OUTER_BMM_ROWS
OFF = 1 << 60  # OUTER_BMM_ROWS that never takes the batched backward


def _median_pair(
    a: Callable[[], object], b: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Medians (us) of ``a`` and ``b``, interleaved round by round after two warm-up calls."""
    for f in (a, b, a, b):
        f()
    ta, tb = [], []
    for k in range(rounds):
        for f, t in ((a, ta), (b, tb)) if k % 2 == 0 else ((b, tb), (a, ta)):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def _switched(on: bool, run: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        algebra.OUTER_BMM_ROWS = DEFAULT if on else OFF
        try:
            return run()
        finally:
            algebra.OUTER_BMM_ROWS = DEFAULT

    return call


def _factor_shapes() -> list[tuple[str, list[torch.Size]]]:
    """``(where, factor shapes)`` of every default-budget KCP factor built on torch operations."""
    found: dict[tuple[torch.Size, ...], str] = {}
    for mode, i, h in MODULES:
        cell = getattr(kcprnn, f"{mode}Cell")(i, h, format="kcp", hidden_format="kcp")
        for role in ("weight_ih", "weight_hh"):
            for n, factor in enumerate(getattr(cell, role).factors):
                if native_factor.applies(list(factor)):
                    continue
                shapes = tuple(p.shape for p in factor)
                found.setdefault(shapes, f"{mode} {i}->{h} {role[7:]} factor {n}")
    return [(where, list(shapes)) for shapes, where in found.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    print("\n| factor | shapes (P, R, J_d, I_d) | broadcast us | batched us | ratio |")
    print("|---|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for where, shapes in _factor_shapes():
        factor = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        grad = torch.randn(algebra.factor_dense_torch(factor).shape, generator=gen)

        def run(f: list[torch.Tensor] = factor, g: torch.Tensor = grad) -> object:
            return torch.autograd.grad(algebra.factor_dense_torch(f), f, g)

        off, on = _median_pair(_switched(False, run), _switched(True, run), args.rounds)
        dims = ", ".join(str(tuple(s)) for s in shapes)
        print(f"| {where} | {dims} | {off:.0f} | {on:.0f} | {off / on:.2f} |")

    print(
        "\n| cell step with backward, batch 1 | torch.nn us | broadcast us | batched us "
        "| torch / broadcast | torch / batched |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode, i, h in MODULES:
        torch.manual_seed(0)
        ours = getattr(kcprnn, f"{mode}Cell")(i, h, format="kcp", hidden_format="kcp")
        ref = getattr(torch.nn, f"{mode}Cell")(i, h)
        x = torch.randn(1, i, generator=gen)
        state = [torch.randn(1, h, generator=gen) for _ in range(2 if mode == "LSTM" else 1)]
        hx = tuple(state) if mode == "LSTM" else state[0]

        def step(m: torch.nn.Module = ours, hx: object = hx, x: torch.Tensor = x) -> None:
            for p in m.parameters():
                torch.autograd.graph.increment_version(p)
            out = m(x, hx)
            (out[0] + out[1] if isinstance(out, tuple) else out).sum().backward()

        def torch_step(m: torch.nn.Module = ref, hx: object = hx, x: torch.Tensor = x) -> None:
            step(m, hx, x)

        off, on = _median_pair(_switched(False, step), _switched(True, step), args.rounds)
        base, _ = _median_pair(torch_step, torch_step, args.rounds)
        print(
            f"| {mode}Cell({i}, {h}) | {base:.0f} | {off:.0f} | {on:.0f} "
            f"| {base / off:.2f} | {base / on:.2f} |"
        )


if __name__ == "__main__":
    main()
