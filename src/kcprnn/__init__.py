"""kcprnn: compressed recurrent networks with tensor decompositions.

Formats: Kronecker CP (``"kcp"``, Wang et al., TNNLS 2023) with its two fast multiplications,
and the baselines CP, Tucker, TT, TR, BT and HT, all behind :class:`FactorizedLinear`, and
drop-ins for ``torch.nn``'s recurrent modules (:class:`LSTM`, :class:`GRU`, :class:`RNN` and their
cells) with compressed weights; :func:`summary` counts them. :class:`CostModel` holds the
machine-tuned costs the formats plan with (``kcprnn calibrate`` measures them). :func:`save` and
:func:`load` write and read a model with its configuration as one safetensors file (no pickle).
"""

from ._cpu import CostModel, default_cost_model
from .budget import Configuration, configurations
from .formats import (
    FORMATS,
    BTMatrix,
    CPMatrix,
    DenseMatrix,
    FactorizedMatrix,
    HTMatrix,
    KCPMatrix,
    TRMatrix,
    TTMatrix,
    TuckerMatrix,
    make_matrix,
)
from .io import load, save
from .layers import (
    BTLinear,
    CPLinear,
    DenseLinear,
    FactorizedLinear,
    HTLinear,
    KCPLinear,
    TRLinear,
    TTLinear,
    TuckerLinear,
)
from .optim import param_groups
from .rnn import GRU, LSTM, RNN, GRUCell, LayerSummary, LSTMCell, ModelSummary, RNNCell, summary
from .shapes import balanced_factors

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "BTLinear",
    "BTMatrix",
    "CPMatrix",
    "HTMatrix",
    "KCPMatrix",
    "TRMatrix",
    "TTMatrix",
    "TuckerMatrix",
    "CPLinear",
    "CostModel",
    "DenseLinear",
    "DenseMatrix",
    "FactorizedLinear",
    "FactorizedMatrix",
    "HTLinear",
    "KCPLinear",
    "TRLinear",
    "TTLinear",
    "TuckerLinear",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LayerSummary",
    "ModelSummary",
    "RNN",
    "RNNCell",
    "balanced_factors",
    "default_cost_model",
    "load",
    "make_matrix",
    "param_groups",
    "save",
    "summary",
    "__version__",
    # parameter budgets
    "Configuration",
    "configurations",
]
