"""Short sequences: ``torch.nn``'s recurrent modules against kcprnn's dense ones on each route.

torch's fused recurrent kernels (oneDNN's RNN primitive on the CPU) pay a fixed price per call
(the weights reordered into the primitive's layout, forward and again backward, and its
workspace), which a long sequence hides and a short one does not. For each mode, size, batch
and length: ``torch.nn``'s module and kcprnn's dense module with ``recurrence`` set to
``torch``, ``dense`` and ``auto`` (the route the cost model picks), forward without gradients
(``infer``) and forward+backward of ``output.sum()`` with the gradients set to ``None`` first
(``train``); medians over ``--rounds`` interleaved rounds, and each module's time over
``torch.nn``'s.

Usage::

    python benchmarks/ab_short_sequences.py [--modes LSTM,GRU,RNN] [--sizes 40x512,40x256]
        [--batches 1,16] [--lengths 1,2,4,8,16,32] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kcprnn

ROUTES = ("torch", "dense", "auto")


def _call(module: torch.nn.Module, x: torch.Tensor, kind: str) -> float:
    start = time.perf_counter()
    if kind == "infer":
        with torch.no_grad():
            module(x)
    else:
        for p in module.parameters():
            p.grad = None
        module(x)[0].sum().backward()
    return time.perf_counter() - start


def point(mode: str, n_in: int, hidden: int, batch: int, steps: int, kind: str, rounds: int):
    torch.manual_seed(0)
    mods: dict[str, torch.nn.Module] = {"torch.nn": getattr(torch.nn, mode)(n_in, hidden)}
    for route in ROUTES:
        m = getattr(kcprnn, mode)(n_in, hidden, format="dense")
        m.recurrence = route
        mods[route] = m
    x = torch.randn(steps, batch, n_in)
    times: dict[str, list[float]] = {k: [] for k in mods}
    for m in mods.values():
        for _ in range(2):
            _call(m, x, kind)
    names = list(mods)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            times[k].append(_call(mods[k], x, kind))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    cell = mods["auto"].cell(0)  # type: ignore[operator]
    costs = kcprnn.rnn.plan.layer_costs(
        [cell], steps * batch, steps, True, kind == "train", cell.weight_hh.planning_model()
    )
    chosen = min(costs, key=lambda k: costs[k])
    return med, chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="LSTM,GRU,RNN")
    ap.add_argument("--sizes", default="40x512,40x256")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--lengths", default="1,2,4,8,16,32")
    ap.add_argument("--kinds", default="infer,train")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms, and x torch.nn's time")
    for mode in args.modes.split(","):
        for size in args.sizes.split(","):
            n_in, hidden = (int(v) for v in size.split("x"))
            for kind in args.kinds.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    for steps in (int(t) for t in args.lengths.split(",")):
                        med, chosen = point(mode, n_in, hidden, batch, steps, kind, args.rounds)
                        base = med["torch.nn"]
                        cols = "  ".join(
                            f"{k} {med[k]:7.2f} ({med[k] / base:4.2f})" for k in ROUTES
                        )
                        print(
                            f"{mode:4s} {size:7s} {kind:5s} B={batch:<3d} T={steps:<4d} "
                            f"torch.nn {base:7.2f}  {cols}  auto->{chosen}",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
