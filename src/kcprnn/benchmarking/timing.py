"""Interleaved wall-clock timing of several callables, with device synchronization.

Every timed item is a zero-argument callable. :func:`time_interleaved` calibrates each item
once (warm-up), picks a per-item block size so that one block takes about ``block_s``, then
runs ``rounds`` rounds; in each round every item runs one block, in an order that rotates from
round to round so no item always follows the same neighbour. The result per item is the
median (and the spread) of its per-call times over the rounds, so ratios between items come
from one interleaved run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["TimingStats", "median", "synchronize", "time_interleaved"]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (the mean of the two middle values for even lengths)."""
    if len(values) == 0:
        raise ValueError("median of an empty sequence is undefined")
    return float(statistics.median(values))


@dataclass(frozen=True)
class TimingStats:
    """Per-call seconds of one item over the interleaved rounds."""

    median_s: float
    min_s: float
    max_s: float
    rounds: int
    calls_per_round: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "median_ms": self.median_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "max_ms": self.max_s * 1e3,
            "rounds": self.rounds,
            "calls_per_round": self.calls_per_round,
        }


def _time_block(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    items: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    rounds: int = 5,
    block_s: float = 0.02,
    warmup: int = 1,
) -> list[TimingStats]:
    """Time ``items`` with interleaved repetitions; returns one :class:`TimingStats` per item.

    Args:
        items: zero-argument callables.
        device: where they run (CUDA is synchronized around every block).
        rounds: number of interleaved rounds (one block per item per round).
        block_s: target duration of one block; an item slower than this runs once per block.
        warmup: untimed calls per item before calibration.
    """
    if rounds < 1 or warmup < 0 or block_s <= 0:
        raise ValueError(
            f"need rounds >= 1, warmup >= 0, block_s > 0; got {rounds=}, {warmup=}, {block_s=}"
        )
    calls: list[int] = []
    for fn in items:
        for _ in range(warmup):
            fn()
        estimate = _time_block(fn, 1, device)
        calls.append(max(1, min(1000, round(block_s / max(estimate, 1e-7)))))
    per_call: list[list[float]] = [[] for _ in items]
    n = len(items)
    for r in range(rounds):
        for k in range(n):
            i = (k + r) % n
            per_call[i].append(_time_block(items[i], calls[i], device))
    return [
        TimingStats(median(t), min(t), max(t), rounds, c)
        for t, c in zip(per_call, calls, strict=True)
    ]
