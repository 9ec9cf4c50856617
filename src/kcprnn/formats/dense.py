"""Dense baseline: the uncompressed matrix behind the same interface as every format."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import FactorizedMatrix, register

__all__ = ["DenseMatrix", "dense_linear", "dense_num_params"]


def dense_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T``. x: (b, i), weight: (j, i) -> (b, j)."""
    return F.linear(x, weight)  # (b, j)


def dense_num_params(in_features: int, out_features: int) -> int:
    return in_features * out_features


@register("dense")
class DenseMatrix(FactorizedMatrix):
    r"""A plain ``(out_features, in_features)`` parameter; ``forward`` is ``F.linear``.

    Accepts ``in_modes``/``out_modes``/``num_modes`` for interface symmetry (they only
    describe the tensorization); it has no rank.

    Example:
        >>> w = DenseMatrix(6, 4)
        >>> w(torch.ones(2, 6)).shape
        torch.Size([2, 4])
    """

    algorithms = ("factorized", "dense")

    def __init__(self, in_features: int, out_features: int, **options) -> None:
        super().__init__(in_features, out_features, **options)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **self.factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        std = self.default_std() if std is None else std
        bound = std * 3**0.5  # U(-a, a) has std a / sqrt(3)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def matmul(self, x: Tensor) -> Tensor:
        return dense_linear(x, self.weight)  # (b, j)

    def matmul_bias(self, x: Tensor, bias: Tensor) -> Tensor:
        return F.linear(x, self.weight, bias)  # (b, j)

    def to_dense(self) -> Tensor:
        return self.weight

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """``rows * in_features * out_features``, in training and inference alike."""
        return rows * self.in_features * self.out_features

    def reconstruction_macs(self) -> int:
        return 0

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> DenseMatrix:
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        with torch.no_grad():
            out.weight.copy_(weight)
        return out
