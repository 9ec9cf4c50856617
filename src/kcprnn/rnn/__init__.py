"""Recurrent modules with compressed weights: drop-ins for ``torch.nn``'s LSTM, GRU, RNN and
their cells."""

from .cells import GRUCell, LSTMCell, RNNCell
from .recurrent import GRU, LSTM, RNN
from .summary import LayerSummary, ModelSummary, summary

__all__ = [
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LayerSummary",
    "ModelSummary",
    "RNN",
    "RNNCell",
    "summary",
]
