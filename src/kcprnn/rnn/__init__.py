"""Recurrent modules with compressed weights: drop-ins for ``torch.nn``'s LSTM, GRU, RNN and
their cells.

Modules: ``steps`` (one time step as a pure function), ``fused`` (whole dense-recurrent LSTM and
GRU layers with a hand-written backward through time), ``cells`` (the cell modules), ``layer``
(one layer and direction over time), ``recurrent`` (the multi-layer modules), ``summary``
(parameter and MAC counts); ``_options`` holds the argument checks and matrix options they share.
"""

from ._options import fold_gates, hidden_matrix_options, input_matrix_options
from .cells import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .fused import gru_sequence, lstm_sequence
from .layer import run_layer, scan
from .recurrent import GRU, LSTM, RNN, RNNBase
from .steps import gru_step, lstm_step, rnn_step
from .summary import LayerSummary, ModelSummary, summary

__all__ = [
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LayerSummary",
    "ModelSummary",
    "RNN",
    "RNNBase",
    "RNNCell",
    "RNNCellBase",
    "fold_gates",
    "gru_sequence",
    "gru_step",
    "hidden_matrix_options",
    "input_matrix_options",
    "lstm_sequence",
    "lstm_step",
    "rnn_step",
    "run_layer",
    "scan",
    "summary",
]
