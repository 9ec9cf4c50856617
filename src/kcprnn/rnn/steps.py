"""One time step of the LSTM, GRU and Elman recurrences, as pure functions.

Each takes the input projection of its step already computed (``gates_x = W_ih x + b_ih``), so
that a multi-step caller can do the input-to-hidden product of all time steps at once and keep
only the hidden-to-hidden work in its time loop. Gate order is ``torch.nn``'s: LSTM
``(i, f, g, o)``, GRU ``(r, z, n)``, stacked on the output rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["State", "gru_step", "lstm_step", "rnn_step"]

State = tuple[Tensor, ...]
"""A recurrent state: ``(h,)``, or ``(h, c)`` for an LSTM."""


def lstm_step(
    gates_x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
    weight_hr: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the precomputed input projection.

    Args:
        gates_x: ``W_ih x + b_ih``, shape ``(b, 4h)``, gates ``(i, f, g, o)``.
        h: previous hidden state ``(b, p)`` (``p = proj_size`` or ``h``).
        c: previous cell state ``(b, h)``.
        weight_hh: ``(b, p) -> (b, 4h)``.
        bias_hh: ``(4h,)`` or ``None``.
        weight_hr: optional projection ``(b, h) -> (b, p)``.

    Returns:
        ``(h', c')`` of shapes ``(b, p)`` and ``(b, h)``.
    """
    gates = gates_x + weight_hh(h)  # (b, 4h)
    if bias_hh is not None:
        gates = gates + bias_hh  # (b, 4h)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (b, h)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (b, h)
    h = torch.sigmoid(o) * torch.tanh(c)  # (b, h)
    if weight_hr is not None:
        h = weight_hr(h)  # (b, p)
    return h, c


def gru_step(
    gates_x: Tensor,
    h: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
) -> Tensor:
    """One GRU step from the precomputed input projection ``gates_x = W_ih x + b_ih``
    ``(b, 3h)``, gates ``(r, z, n)``; ``b_hn`` stays inside the reset gate as in ``torch.nn``.
    Returns ``h'`` ``(b, h)``."""
    gates_h = weight_hh(h)  # (b, 3h)
    if bias_hh is not None:
        gates_h = gates_h + bias_hh  # (b, 3h)
    xr, xz, xn = gates_x.chunk(3, dim=1)  # 3 x (b, h)
    hr, hz, hn = gates_h.chunk(3, dim=1)  # 3 x (b, h)
    r = torch.sigmoid(xr + hr)  # (b, h)
    z = torch.sigmoid(xz + hz)  # (b, h)
    n = torch.tanh(xn + r * hn)  # (b, h)
    return n + z * (h - n)  # (b, h)


def rnn_step(
    gates_x: Tensor,
    h: Tensor,
    weight_hh: Callable[[Tensor], Tensor],
    bias_hh: Tensor | None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman step ``act(gates_x + W_hh h + b_hh)``; ``gates_x`` ``(b, h)`` -> ``(b, h)``."""
    pre = gates_x + weight_hh(h)  # (b, h)
    if bias_hh is not None:
        pre = pre + bias_hh  # (b, h)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)  # (b, h)
