"""One direction of one recurrent layer over time, on input projections computed beforehand.

:func:`scan` steps any cell through time in packed layout (sequences of different lengths);
:func:`run_layer` picks the fused :func:`~kcprnn.rnn.lstm_sequence` /
:func:`~kcprnn.rnn.gru_sequence` where they apply and :func:`scan` elsewhere.

Shape comments: ``n`` rows of all steps (``t*b`` or the packed total), ``b`` batch, ``g`` gate
rows (``G*h``), ``p`` output size (``proj_size`` or ``h``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..formats import DenseMatrix
from .cells import GRUCell, LSTMCell, RNNCellBase
from .fused import gru_sequence, lstm_sequence
from .steps import State

__all__ = ["check_batch_sizes", "run_layer", "scan"]


def scan(
    step: Callable[[Tensor, State], State],
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """Run ``step`` over time on precomputed input projections, in packed layout.

    Args:
        step: ``(gates_x_t (b_t, g), state) -> state``; ``state[0]`` is the step's output.
        gates_x: input projections of all steps, time-major packed rows ``(n, g)``: the
            ``batch_sizes[0]`` rows of step 0, then the ``batch_sizes[1]`` rows of step 1, ...
        batch_sizes: non-increasing active batch sizes per step (all equal for padded input).
        state: initial state, tensors of ``batch_sizes[0]`` rows.
        reverse: run from the last step to the first (backward direction); each sequence then
            starts from its own last step.

    Returns:
        ``(outputs, final)``: ``state[0]`` of every step in the same packed layout ``(n, p)``,
        and the final state of every sequence (after its own last step), ``batch_sizes[0]`` rows.
    """
    outputs: list[Tensor] = []
    if not reverse:
        finished: list[State] = []
        offset = 0
        for b in batch_sizes:
            if b < state[0].shape[0]:  # the sequences at rows >= b have ended
                finished.append(tuple(s[b:] for s in state))
                state = tuple(s[:b] for s in state)  # (b, .)
            state = step(gates_x[offset : offset + b], state)  # (b, .)
            outputs.append(state[0])
            offset += b
        finished.append(state)
        final = tuple(
            torch.cat(parts[::-1], dim=0) for parts in zip(*finished, strict=True)
        )  # (b0, .)
        return torch.cat(outputs, dim=0), final  # (n, p)
    initial = state
    offset = gates_x.shape[0]
    state = tuple(s[: batch_sizes[-1]] for s in initial)
    for b in reversed(batch_sizes):
        have = state[0].shape[0]
        if b > have:  # sequences at rows have..b start here, from their initial state
            state = tuple(
                torch.cat([s, s0[have:b]], dim=0) for s, s0 in zip(state, initial, strict=True)
            )  # (b, .)
        offset -= b
        state = step(gates_x[offset : offset + b], state)  # (b, .)
        outputs.append(state[0])
    return torch.cat(outputs[::-1], dim=0), state  # (n, p)


def run_layer(
    cell: RNNCellBase,
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """One direction of one layer over precomputed input projections, as :func:`scan`.

    An LSTM layer (no projection) or GRU layer with a dense recurrent weight and sequences of
    equal length runs as :func:`~kcprnn.rnn.lstm_sequence` / :func:`~kcprnn.rnn.gru_sequence`
    (fused steps, a hand-written backward through time), except under ``torch.compile``;
    everything else steps through :func:`scan` with autograd.
    """
    hh = cell.weight_hh
    if (
        isinstance(hh, DenseMatrix)
        and len(set(batch_sizes)) == 1
        and not torch.compiler.is_compiling()  # compiled graphs fuse the steps themselves
    ):
        if isinstance(cell, LSTMCell) and cell.weight_hr is None:
            out, h, c = lstm_sequence(gates_x, state[0], state[1], hh.weight, cell.bias_hh, reverse)
            return out, (h, c)  # (n, h)
        if isinstance(cell, GRUCell):
            out, h = gru_sequence(gates_x, state[0], hh.weight, cell.bias_hh, reverse)
            return out, (h,)  # (n, h)
    return scan(cell.step, gates_x, batch_sizes, state, reverse=reverse)


def check_batch_sizes(batch_sizes: Tensor, rows: int) -> list[int]:
    """The ``batch_sizes`` of a ``PackedSequence`` of ``rows`` rows as ints, checked to suit
    :func:`scan`: positive, non-increasing, summing to ``rows``."""
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(
            f"PackedSequence batch_sizes must be a non-empty 1-D tensor, got shape "
            f"{tuple(batch_sizes.shape)}"
        )
    sizes = [int(b) for b in batch_sizes.tolist()]
    if any(b <= 0 for b in sizes) or any(a < b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(
            "PackedSequence batch_sizes must be positive and non-increasing (sequences sorted by "
            "decreasing length, as pack_padded_sequence(..., enforce_sorted=True) requires of "
            f"its lengths; pass enforce_sorted=False to sort them), got batch_sizes={sizes}"
        )
    if sum(sizes) != rows:
        raise ValueError(
            f"PackedSequence data has {rows} rows but its batch_sizes sum to {sum(sizes)}"
        )
    return sizes
