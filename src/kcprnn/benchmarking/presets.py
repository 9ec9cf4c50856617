"""Benchmark sizes: the UCF11 layer (57,600 -> 1,024, 96 rows) and its sweeps, a quick variant,
and a tiny one for tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..shapes import balanced_factors

__all__ = ["PRESETS", "Preset", "blocked_split", "kronecker_split"]


def kronecker_split(modes: Sequence[int]) -> list[list[int]]:
    """Split every mode into two Kronecker factors for KCP, smaller first:
    ``[8, 20, 20, 18] -> [[2, 4], [4, 5], [4, 5], [3, 6]]``."""
    return [sorted(balanced_factors(int(m), 2)) for m in modes]


def blocked_split(
    in_modes: Sequence[int], out_modes: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Two Kronecker factors that each own whole input modes, for KCP's fast layout.

    Factor 1 takes the leading half of the input modes and every output mode but a factor of
    the first one; factor 2 takes the trailing input modes and the smallest factor (> 1) of the
    first output mode. Factor 2's inputs are then the contiguous trailing block of every row, so
    the sequential product runs its first GEMM on a view of the input with no gathering copy,
    and its ``J^(2)`` outputs per ``I^(2)`` inputs keep that GEMM cheap. Taking them from the
    first output mode leaves factor 1's later output modes as one contiguous run, so the final
    reordering of the output moves blocks of ``J_2 ⋯ J_D`` numbers instead of single ones
    (the faster choice at the UCF11 size):
    ``[8, 20, 20, 18] -> [16, 4, 4, 4]`` gives ``[[8, 1], [20, 1], [1, 20], [1, 18]]`` and
    ``[[8, 2], [4, 1], [4, 1], [4, 1]]``.
    """
    half = len(in_modes) // 2
    ins = [[int(m), 1] if d < half else [1, int(m)] for d, m in enumerate(in_modes)]
    first = int(out_modes[0])
    small = next((f for f in range(2, first + 1) if first % f == 0), 1)
    outs = [[first // small, small]] + [[int(m), 1] for m in out_modes[1:]]
    return ins, outs


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run.

    Attributes:
        in_modes, out_modes: tensorization of the main layer (UCF11: 8x20x20x18 -> 16x4x4x4).
        rows: rows per call at the main point (UCF11: batch 16 x 6 frames).
        rank: rank of every format at the main point and in the rows/input sweeps.
        kcp_ranks: KCP ranks at the main point (interleaved and, for ``kcp_blocked``, blocked
            layouts: :func:`kronecker_split` and :func:`blocked_split`).
        extra_ranks: more ``(format, rank)`` cases at the main point (e.g. a Tucker rank whose
            parameter count is closer to the peer's).
        sweep_ranks, sweep_rows: the rank and rows sweeps.
        sweep_inputs: input tensorizations of the input-size sweep (output fixed).
        lstm_in_modes, lstm_hidden_modes, seq_len, batch: the LSTM training step point.
        tk2_in_modes: tednet Tucker-2 input shape (3 modes) for the LSTM point.
        rounds, block_s: timing repetitions (see :func:`~.timing.time_interleaved`).
    """

    name: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rows: int
    rank: int
    kcp_ranks: tuple[int, ...]
    extra_ranks: tuple[tuple[str, Any], ...]
    sweep_ranks: tuple[int, ...]
    sweep_rows: tuple[int, ...]
    sweep_inputs: tuple[tuple[int, ...], ...]
    lstm_in_modes: tuple[int, ...]
    lstm_hidden_modes: tuple[int, ...]
    seq_len: int
    batch: int
    tk2_in_modes: tuple[int, ...]
    rounds: int = 7
    block_s: float = 0.05


_UCF11 = Preset(
    name="ucf11",
    in_modes=(8, 20, 20, 18),
    out_modes=(16, 4, 4, 4),
    rows=96,
    rank=4,
    kcp_ranks=(1, 2, 4),
    extra_ranks=(("tucker", (2, 1, 1, 1)),),  # 490 parameters against tltorch's 444
    sweep_ranks=(1, 2, 4, 8, 16),
    sweep_rows=(1, 4, 16, 96, 384, 1024),
    sweep_inputs=((8, 8, 8, 8), (8, 10, 10, 18), (8, 20, 20, 18), (16, 20, 20, 36)),
    lstm_in_modes=(8, 20, 20, 18),
    lstm_hidden_modes=(4, 4, 4, 4),
    seq_len=6,
    batch=16,
    tk2_in_modes=(160, 20, 18),
)

PRESETS: dict[str, Preset] = {
    "ucf11": _UCF11,
    "quick": replace(
        _UCF11,
        name="quick",
        sweep_ranks=(1, 16),
        sweep_rows=(1, 256),
        sweep_inputs=((8, 8, 8, 8), (8, 20, 20, 18)),
        rounds=3,
        block_s=0.02,
    ),
    "tiny": Preset(
        name="tiny",
        in_modes=(4, 4, 4, 4),
        out_modes=(4, 4, 4, 4),
        rows=4,
        rank=2,
        kcp_ranks=(1, 2),
        extra_ranks=(("tucker", (2, 1, 1, 1)),),
        sweep_ranks=(1, 2),
        sweep_rows=(1, 4),
        sweep_inputs=((4, 4, 4, 4), (4, 4, 4, 8)),
        lstm_in_modes=(4, 4, 4, 4),
        lstm_hidden_modes=(4, 4, 4, 4),
        seq_len=2,
        batch=2,
        tk2_in_modes=(16, 4, 4),
        rounds=2,
        block_s=0.002,
    ),
}
"""``ucf11``: the full run; ``quick``: fewer sweep points and rounds; ``tiny``: for tests."""
