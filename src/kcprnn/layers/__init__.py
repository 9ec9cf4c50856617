"""Layers built on the weight formats."""

from .linear import (
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

__all__ = [
    "BTLinear",
    "CPLinear",
    "DenseLinear",
    "FactorizedLinear",
    "HTLinear",
    "KCPLinear",
    "TRLinear",
    "TTLinear",
    "TuckerLinear",
]
