"""kcprnn: compressed recurrent networks with tensor decompositions.

Formats: Kronecker CP (``"kcp"``, Wang et al., TNNLS 2023) with its two fast multiplications,
and the baselines CP, Tucker, TT, TR, BT and HT, all behind :class:`FactorizedLinear`.
"""

from .formats import FORMATS, DenseMatrix, FactorizedMatrix, make_matrix
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
from .shapes import balanced_factors

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "BTLinear",
    "CPLinear",
    "DenseLinear",
    "DenseMatrix",
    "FactorizedLinear",
    "FactorizedMatrix",
    "HTLinear",
    "KCPLinear",
    "TRLinear",
    "TTLinear",
    "TuckerLinear",
    "balanced_factors",
    "make_matrix",
    "__version__",
]
