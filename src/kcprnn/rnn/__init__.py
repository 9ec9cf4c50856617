"""Recurrent modules with compressed weights: drop-ins for ``torch.nn``'s LSTM, GRU, RNN and
their cells.

Modules: ``steps`` (one time step as a pure function), ``fused`` (whole LSTM, GRU and Elman
layers with a hand-written backward through time, ``W_hh`` dense or a Kronecker sum), ``kron``
(KCP and CP matrices as Kronecker sums: products, factor gradients, fast rebuilds), ``plan``
(the routes a layer can run and their prices under the cost model), ``cells`` (the cell modules),
``layer`` (one layer over time), ``recurrent`` (the multi-layer modules), ``summary`` (parameter
and MAC counts); ``_options`` holds the argument checks and matrix options they share.
"""

from ._options import fold_gates, hidden_matrix_options, input_matrix_options
from .cells import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .fused import fused_sequence, gru_sequence, lstm_sequence, rnn_sequence
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
    "fused_sequence",
    "gru_sequence",
    "gru_step",
    "hidden_matrix_options",
    "input_matrix_options",
    "lstm_sequence",
    "lstm_step",
    "rnn_sequence",
    "rnn_step",
    "run_layer",
    "scan",
    "summary",
]
