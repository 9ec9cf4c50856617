"""The paper's video classifier: a (compressed) LSTM or GRU over the frames, whose last hidden
state goes to a linear classifier. The input-to-hidden matrix is stored in the chosen format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..rnn import GRU, LSTM

__all__ = ["VideoClassifier"]


class VideoClassifier(nn.Module):
    r"""Frames ``(batch, time, input_size)`` -> class logits ``(batch, num_classes)``.

    Args:
        input_size: features per frame (57,600 for 160x120 RGB).
        hidden_size: recurrent state size (256 in the paper).
        num_classes: number of classes.
        cell: ``"lstm"`` or ``"gru"``.
        format: input-to-hidden format, a key of :data:`kcprnn.FORMATS`.
        hidden_modes: modes of the hidden size; the gates fold into the first output mode.
        format_options: the format's options (``in_modes``, ``rank``, ...).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        *,
        cell: str = "lstm",
        format: str = "kcp",
        hidden_modes: Sequence[Any] | None = None,
        format_options: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got cell={cell!r}")
        rnn_class = LSTM if cell == "lstm" else GRU
        self.rnn = rnn_class(
            input_size,
            hidden_size,
            batch_first=True,
            device=device,
            format=format,
            hidden_modes=hidden_modes,
            **(format_options or {}),
        )
        self.classifier = nn.Linear(hidden_size, num_classes, device=device)

    @property
    def weight_ih(self) -> nn.Module:
        """The input-to-hidden :class:`~kcprnn.formats.FactorizedMatrix` (the compressed one)."""
        return self.rnn.cell(0).weight_ih

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (b, t, h)
        return self.classifier(out[:, -1])  # (b, c)
