"""Weight formats. Each module holds one format: pure functions on top, one module class below.

Importing this package registers every format in :data:`FORMATS`.
"""

from . import bt, cp, dense, ht, kcp, tr, tt, tucker  # noqa: F401  (each registers its format)
from ._base import FORMATS, FactorizedMatrix, make_matrix, register, resolve_dtype
from .dense import DenseMatrix

__all__ = ["FORMATS", "DenseMatrix", "FactorizedMatrix", "make_matrix", "register", "resolve_dtype"]
