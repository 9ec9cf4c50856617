"""How far one Adam step moves a factorized matrix, relative to its size: a probe of how the
learning rate a format needs depends on its configuration (docs/accuracy.md, "The learning rate
at about 1,000x").

For each matrix: build it (seed 0), take a random direction ``G`` in the dense matrix's space,
differentiate ``<G, W>`` with respect to the factors, move every parameter by ``lr`` against the
sign of its gradient (Adam's first step, whatever the gradient's size) and print
``|W' - W| / |W|`` per 1e-3 of learning rate. A product of small factors (low rank) moves
less per step than one of many; a sum over many ranks moves more.

Usage::

    python benchmarks/relative_step.py kcp 57600 1024 --shares 3e-5,1.39e-4,5e-4,2e-3
    python benchmarks/relative_step.py ht 13 1024 --shares 0.01034
    python benchmarks/relative_step.py kcp 13 1024 --options '{"rank": 1, "in_modes": [[13, 1],
        [1, 1], [1, 1]], "out_modes": [[8, 2], [8, 1], [8, 1]]}'
"""

from __future__ import annotations

import argparse
import json

import torch

import kcprnn
from kcprnn.budget import budget_options


def relative_step(matrix: torch.nn.Module, lr: float = 1e-3) -> float:
    """``|W' - W| / |W|`` after one sign step of ``lr`` on every parameter of ``matrix`` (a
    factorized matrix, changed in place)."""
    before = matrix.to_dense().detach().clone()  # (n_out, n_in); dense: not the parameter
    direction = torch.randn_like(before)
    (matrix.to_dense() * direction).sum().backward()
    with torch.no_grad():
        for p in matrix.parameters():
            p -= lr * torch.sign(p.grad)
    return float((matrix.to_dense().detach() - before).norm() / before.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format")
    parser.add_argument("in_features", type=int)
    parser.add_argument("out_features", type=int)
    parser.add_argument("--shares", default="", help="comma-separated budgets (a float rank)")
    parser.add_argument("--options", default="", help="the matrix's options as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [json.loads(args.options)] if args.options else []
    for share in filter(None, args.shares.split(",")):
        rank = {"rank": float(share)}
        cases.append(budget_options(args.format, args.in_features, args.out_features, rank))
    if not cases:
        parser.error("give --shares or --options")
    for options in cases:
        torch.manual_seed(0)
        matrix = kcprnn.make_matrix(args.format, args.in_features, args.out_features, **options)
        params = sum(p.numel() for p in matrix.parameters())
        step = relative_step(matrix)
        print(f"{args.format} {options}: {params:,} parameters, |dW|/|W| per 1e-3 = {step:.4f}")


if __name__ == "__main__":
    main()
