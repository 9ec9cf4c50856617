"""Benchmark sizes: the UCF11 layer (57,600 -> 1,024, 96 rows) and its sweeps, the recurrent
regimes (speech, spikes, streaming, sweeps over the sequence length and the hidden size), a quick
variant, and a tiny one for tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..budget import blocked_splits
from ..shapes import balanced_factors

__all__ = [
    "PRESETS",
    "Preset",
    "RegimeSizes",
    "blocked_split",
    "kronecker_split",
    "override_regimes",
]


def kronecker_split(modes: Sequence[int]) -> list[list[int]]:
    """Split every mode into two Kronecker factors for KCP, smaller first:
    ``[8, 20, 20, 18] -> [[2, 4], [4, 5], [4, 5], [3, 6]]``."""
    return [sorted(balanced_factors(int(m), 2)) for m in modes]


blocked_split = blocked_splits
"""KCP's blocked layout for two Kronecker factors (:func:`kcprnn.budget.blocked_splits`):
``[8, 20, 20, 18] -> [16, 4, 4, 4]`` gives ``[[8, 1], [20, 1], [1, 20], [1, 18]]`` and
``[[8, 2], [4, 1], [4, 1], [4, 1]]``."""


@dataclass(frozen=True)
class RegimeSizes:
    """Sizes of the recurrent regimes (see :mod:`~.regimes`).

    Every point compares ``torch.nn``'s module with kcprnn's dense one and with every format for
    the input-to-hidden matrix alone and for both matrices, all at ``rank``.

    Attributes:
        speech_modes, speech_seq_len, speech_batch, speech_inputs, speech_hiddens,
            speech_layers: bidirectional modules, one point per mode, input, hidden size and
            number of layers.
        spikes_modes, spikes_input, spikes_seq_lens, spikes_batch, spikes_hidden: unidirectional
            modules on spike-train input, one point per mode and length.
        stream_modes, stream_cell_sizes: one cell step at batch 1, one point per mode and
            ``(size name, input, hidden)``.
        stream_seq_modes, stream_seq_len, stream_seq_size: a sequence at batch 1.
        sweep_mode, sweep_input, sweep_batch: the bidirectional module of both sweeps.
        sweep_seq_lens, sweep_hidden: time against ``T`` at ``sweep_hidden``.
        sweep_hiddens, sweep_seq_len: time against the hidden size at ``sweep_seq_len``.
        sweep_formats: the formats in the sweeps (``None``: all).
        rank: rank of every format (for KCP per Kronecker factor, library-chosen modes).
        gemm_size: ``n`` of the ``n x n`` float32 product whose time gives the GEMM peak.
    """

    speech_modes: tuple[str, ...] = ("LSTM", "GRU")
    speech_seq_len: int = 300
    speech_batch: int = 16
    speech_inputs: tuple[int, ...] = (40, 123)
    speech_hiddens: tuple[int, ...] = (256, 512)
    speech_layers: tuple[int, ...] = (1, 3)
    spikes_modes: tuple[str, ...] = ("LSTM", "GRU")
    spikes_input: int = 700
    spikes_seq_lens: tuple[int, ...] = (100, 250)
    spikes_batch: int = 32
    spikes_hidden: int = 256
    stream_modes: tuple[str, ...] = ("LSTM", "GRU", "RNN")
    stream_cell_sizes: tuple[tuple[str, int, int], ...] = (
        ("video", 57600, 256),
        ("speech", 40, 512),
    )
    stream_seq_modes: tuple[str, ...] = ("LSTM", "GRU", "RNN")
    stream_seq_len: int = 1000
    stream_seq_size: tuple[int, int] = (40, 512)
    sweep_mode: str = "LSTM"
    sweep_input: int = 40
    sweep_batch: int = 16
    sweep_seq_lens: tuple[int, ...] = (25, 50, 100, 200, 300)
    sweep_hidden: int = 256
    sweep_hiddens: tuple[int, ...] = (128, 256, 512, 1024)
    sweep_seq_len: int = 100
    sweep_formats: tuple[str, ...] | None = None
    rank: int = 4
    gemm_size: int = 2048


def override_regimes(sizes: RegimeSizes, items: Sequence[str]) -> RegimeSizes:
    """``sizes`` with ``KEY=VALUE`` overrides: an int, a string, or a comma-separated list of
    ints or of strings (``speech_seq_len=300``, ``speech_modes=LSTM``, ``sweep_hiddens=128,256``,
    ``sweep_formats=kcp,tt``). Fields of nested tuples (``stream_cell_sizes``) cannot be set."""
    names = {f.name for f in fields(RegimeSizes)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(
                f"regime override {item!r}: expected KEY=VALUE with KEY in {sorted(names)}"
            )
        default = getattr(sizes, key)
        if isinstance(default, int):
            changes[key] = int(value)
        elif isinstance(default, str):
            changes[key] = value
        elif default is None or isinstance(default, tuple):
            example = default[0] if default else ""
            if isinstance(example, tuple):
                raise ValueError(f"regime override {item!r}: {key} holds nested tuples")
            parts = [v.strip() for v in value.split(",") if v.strip()]
            changes[key] = (
                tuple(int(v) for v in parts) if isinstance(example, int) else tuple(parts)
            )
        else:
            raise ValueError(f"regime override {item!r}: cannot set {key}")
    return replace(sizes, **changes)


_QUICK_REGIMES = RegimeSizes(
    speech_seq_len=30,
    speech_inputs=(40,),
    speech_hiddens=(512,),
    speech_layers=(1,),
    spikes_modes=("LSTM",),
    spikes_seq_lens=(25,),
    stream_seq_modes=("LSTM",),
    stream_seq_len=100,
    sweep_seq_lens=(10, 30, 90),
    sweep_hiddens=(128, 512),
    sweep_seq_len=30,
    sweep_formats=("kcp", "tt"),
    gemm_size=1024,
)

_TINY_REGIMES = RegimeSizes(
    speech_modes=("LSTM", "GRU"),
    speech_seq_len=3,
    speech_batch=2,
    speech_inputs=(6,),
    speech_hiddens=(16,),
    speech_layers=(2,),
    spikes_modes=("RNN",),
    spikes_input=12,
    spikes_seq_lens=(3,),
    spikes_batch=2,
    spikes_hidden=16,
    stream_modes=("LSTM", "GRU", "RNN"),
    stream_cell_sizes=(("video", 64, 16), ("speech", 6, 16)),
    stream_seq_modes=("GRU",),
    stream_seq_len=4,
    stream_seq_size=(6, 16),
    sweep_input=6,
    sweep_batch=2,
    sweep_seq_lens=(2, 4),
    sweep_hidden=16,
    sweep_hiddens=(16, 32),
    sweep_seq_len=2,
    sweep_formats=("kcp",),
    rank=2,
    gemm_size=64,
)


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
        regimes: sizes of the recurrent regimes.
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
    regimes: RegimeSizes = RegimeSizes()


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
        regimes=_QUICK_REGIMES,
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
        regimes=_TINY_REGIMES,
    ),
}
"""``ucf11``: the full run; ``quick``: fewer sweep points and rounds; ``tiny``: for tests."""
