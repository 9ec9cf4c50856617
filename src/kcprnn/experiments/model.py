"""The paper's sequence classifiers: a (compressed) LSTM or GRU over the frames (video frames or
binned spikes), read out into a linear classifier. The input-to-hidden matrix is stored in
``format``, the hidden-to-hidden one in ``hidden_format``.

Readouts (``readout``):

- ``"last"``: the hidden state after the last step (the paper's choice for video); with
  ``bidirectional=True``, the forward direction's last state next to the backward direction's
  state after it has read the whole sequence back to step 0.
- ``"mean"``: the hidden states averaged over all steps (both directions), which suits spike
  frames padded with empty bins after the utterance ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import GRU, LSTM, FactorizedMatrix

__all__ = ["READOUTS", "SequenceClassifier", "VideoClassifier", "make_rnn"]

READOUTS = ("last", "mean")


def make_rnn(
    cell: str,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int,
    bidirectional: bool,
    format: str,
    format_options: dict[str, Any] | None,
    hidden_format: str,
    hidden_options: dict[str, Any] | None,
    hidden_modes: Sequence[Any] | None,
    device: torch.device | str | None,
    dropout: float = 0.0,
    layer_options: Sequence[dict[str, Any]] | None = None,
) -> LSTM | GRU:
    """The batch-first ``kcprnn.LSTM`` or ``GRU`` (``cell``) the experiment models run;
    ``dropout`` applies between stacked layers (as ``torch.nn.LSTM``'s), ``layer_options`` are
    the modules' per-layer input-to-hidden options."""
    if cell not in ("lstm", "gru"):
        raise ValueError(f"cell must be 'lstm' or 'gru', got cell={cell!r}")
    rnn_class = LSTM if cell == "lstm" else GRU
    return rnn_class(
        input_size,
        hidden_size,
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        dropout=dropout if num_layers > 1 else 0.0,
        device=device,
        format=format,
        hidden_format=hidden_format,
        hidden_modes=hidden_modes,
        hidden_options=dict(hidden_options or {}),
        layer_options=[dict(o) for o in layer_options] if layer_options else None,
        **(format_options or {}),
    )


class SequenceClassifier(nn.Module):
    r"""Frames ``(batch, time, input_size)`` -> class logits ``(batch, num_classes)``.

    Args:
        input_size: features per frame (57,600 for 160x120 RGB; 700 spike channels for SHD).
        hidden_size: recurrent state size (256 in the paper).
        num_classes: number of classes.
        cell: ``"lstm"`` or ``"gru"``.
        format: input-to-hidden format, a key of :data:`kcprnn.FORMATS`.
        hidden_modes: modes of the hidden size; the gates fold into the first output mode.
        format_options: the input-to-hidden format's options (``in_modes``, ``rank``, ...).
        hidden_format: hidden-to-hidden format, a key of :data:`kcprnn.FORMATS`.
        hidden_options: the hidden-to-hidden format's options.
        bidirectional: run a second direction backwards over the frames.
        readout: ``"last"`` or ``"mean"`` (see the module docstring).
        dropout: dropout probability on the recurrent layer's output before the classifier
            (training only; 0 = none).
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
        hidden_format: str = "dense",
        hidden_options: dict[str, Any] | None = None,
        bidirectional: bool = False,
        readout: str = "last",
        dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got dropout={dropout}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got readout={readout!r}")
        self.rnn = make_rnn(
            cell,
            input_size,
            hidden_size,
            num_layers=1,
            bidirectional=bidirectional,
            format=format,
            format_options=format_options,
            hidden_format=hidden_format,
            hidden_options=hidden_options,
            hidden_modes=hidden_modes,
            device=device,
        )
        self.readout = readout
        self.hidden_size = hidden_size
        self.dropout = nn.Dropout(dropout)
        directions = 2 if bidirectional else 1
        self.classifier = nn.Linear(directions * hidden_size, num_classes, device=device)

    @property
    def weight_ih(self) -> FactorizedMatrix:
        """The first input-to-hidden :class:`~kcprnn.formats.FactorizedMatrix`."""
        return self.rnn.cell(0).weight_ih

    @property
    def weight_hh(self) -> FactorizedMatrix:
        """The first hidden-to-hidden :class:`~kcprnn.formats.FactorizedMatrix`."""
        return self.rnn.cell(0).weight_hh

    def extra_repr(self) -> str:
        return f"readout={self.readout!r}"

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (b, t, d*h)
        out = self.dropout(out)
        if self.readout == "mean":
            return self.classifier(out.mean(dim=1))  # (b, c)
        h = self.hidden_size
        if out.shape[-1] == h:
            return self.classifier(out[:, -1])  # (b, c)
        # backward direction: its final state is its output at step 0
        last = torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=-1)  # (b, 2h)
        return self.classifier(last)  # (b, c)


VideoClassifier = SequenceClassifier
"""The video experiments' name for :class:`SequenceClassifier`."""
