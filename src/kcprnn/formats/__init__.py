"""Weight formats. Each module holds one format: pure functions on top, one module class below.

Importing this package registers every format in :data:`FORMATS`.
"""

from . import bt, cp, dense, ht, kcp, tr, tt, tucker  # noqa: F401  (each registers its format)
from ._base import FORMATS, FactorizedMatrix, make_matrix, register, resolve_dtype
from .bt import BTMatrix
from .cp import CPMatrix
from .dense import DenseMatrix
from .ht import HTMatrix
from .kcp import KCPMatrix
from .tr import TRMatrix
from .tt import TTMatrix
from .tucker import TuckerMatrix

__all__ = [
    "FORMATS",
    "BTMatrix",
    "CPMatrix",
    "DenseMatrix",
    "FactorizedMatrix",
    "HTMatrix",
    "KCPMatrix",
    "TRMatrix",
    "TTMatrix",
    "TuckerMatrix",
    "make_matrix",
    "register",
    "resolve_dtype",
]
