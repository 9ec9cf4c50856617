"""A format's product on a few rows: its chain (:mod:`kcprnn.formats._chain`, one autograd
node) against its own product (:meth:`FactorizedMatrix.matmul`), forward without gradients and
forward + backward, per format, shape and row count; the two interleaved call by call, medians
in microseconds, and own / chain (above 1, the chain is faster). The crossover in rows is what
``kcprnn.formats._base.CHAIN_ROWS`` is set from. ``--against greedy`` compares the plan's
chain with the chain in the cheaper of the listed and greedy orders instead
(:func:`~kcprnn.formats._chain.cheapest_order` against :func:`~kcprnn.formats._chain.greedy_order`).

Usage::

    python benchmarks/bench_chain.py [--shapes 40x512,512x512,512x2048] [--rows 1,2,4,8,16]
        [--formats tt,tr,cp,tucker,bt,ht] [--rank 4] [--reps 200] [--threads 1]
        [--against own|greedy]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from kcprnn.formats import FactorizedMatrix, make_matrix
from kcprnn.formats._chain import ChainPlan, chain_linear, chain_macs, chain_plan, greedy_order


def _median_us(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(10):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="40x512,512x512,512x2048")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--formats", default="tt,tr,cp,tucker,bt,ht")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", choices=("own", "greedy"), default="own")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or '?'}, "
        f"rank {args.rank}, medians of {args.reps} interleaved calls (us); own / chain"
        + (
            " (own: the chain in the listed or greedy order, MACs per row)"
            * (args.against == "greedy")
        )
    )
    print(
        "| format | in x out | rows | no grad: own | chain | ratio | fwd+bwd: own | chain | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            i, o = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            m = make_matrix(fmt, i, o, rank=args.rank)
            plan = m._chain_plan()
            assert plan is not None, fmt
            spec = m.chain_spec()
            assert spec is not None
            earlier = min(
                (chain_plan(spec), chain_plan(spec, greedy_order(spec))),
                key=lambda p: chain_macs(p, 1),
            )
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, i)

                def own(
                    x: torch.Tensor = x, m: FactorizedMatrix = m, earlier: ChainPlan = earlier
                ) -> torch.Tensor:
                    if args.against == "greedy":
                        return chain_linear(x, earlier, m.chain_tensors())  # type: ignore[return-value]
                    return m.matmul(x)

                def chain(
                    x: torch.Tensor = x, m: FactorizedMatrix = m, plan: ChainPlan = plan
                ) -> torch.Tensor:
                    return chain_linear(x, plan, m.chain_tensors())  # type: ignore[return-value]

                with torch.no_grad():
                    fwd = _median_us({"own": own, "chain": chain}, args.reps)
                train = _median_us(
                    {
                        "own": lambda: own().sum().backward(),
                        "chain": lambda: chain().sum().backward(),
                    },
                    args.reps,
                )
                cells = [fmt, f"{i}x{o}", rows]
                if args.against == "greedy":
                    cells[1] += f" ({chain_macs(earlier, 1)} -> {chain_macs(plan, 1)})"
                for t in (fwd, train):
                    cells += [
                        f"{t['own']:.0f}",
                        f"{t['chain']:.0f}",
                        f"{t['own'] / t['chain']:.2f}",
                    ]
                print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
