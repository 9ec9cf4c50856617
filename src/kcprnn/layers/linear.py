"""``FactorizedLinear``: ``nn.Linear`` whose weight is stored in a tensor format."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..formats import FORMATS, FactorizedMatrix, make_matrix

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


class FactorizedLinear(nn.Module):
    r"""Applies :math:`y = x W^T + b` with ``W`` stored in a tensor format.

    Drop-in for ``torch.nn.Linear``: same argument order, same ``bias`` handling and the same
    default initialization variance (``W`` is initialized through its reconstruction).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer has no additive bias. Default: ``True``.
        format: the weight format, a key of :data:`kcprnn.FORMATS`
            (``"dense"``, ``"kcp"``, ``"cp"``, ``"tucker"``, ``"tt"``, ``"tr"``, ``"bt"``,
            ``"ht"``).
        device, dtype: factory arguments, as in ``torch.nn``.
        **format_options: passed to the format class (``in_modes``, ``out_modes``, ``rank``, ...).

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.

    Attributes:
        weight: the :class:`~kcprnn.formats.FactorizedMatrix`.
        bias: ``(out_features,)`` or ``None``.

    Example:
        >>> layer = FactorizedLinear(64, 16, format="dense")
        >>> layer(torch.randn(3, 64)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str = "kcp",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **format_options,
    ) -> None:
        super().__init__()
        weight = make_matrix(
            format, in_features, out_features, device=device, dtype=dtype, **format_options
        )
        self._setup(weight, bias)

    def _setup(self, weight: FactorizedMatrix, bias: bool) -> None:
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.weight = weight
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **weight.factory_kwargs))
            self.reset_bias()
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_matrix(cls, weight: FactorizedMatrix, bias: bool = True) -> FactorizedLinear:
        """Wrap an existing format module as a linear layer."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(weight, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "kcp", **options) -> FactorizedLinear:
        """Compress a trained ``nn.Linear``: its weight through the format's ``from_dense``,
        its bias copied."""
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {sorted(FORMATS)}")
        weight = FORMATS[format].from_dense(linear.weight.detach(), **options)
        layer = cls.from_matrix(weight, bias=linear.bias is not None)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def format(self) -> str:
        return self.weight.format_name

    def reset_bias(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.bias.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        self.weight.reset_parameters()
        if self.bias is not None:
            self.reset_bias()

    def forward(self, x: Tensor) -> Tensor:
        return self.weight(x, self.bias)  # (..., j)

    def to_dense(self) -> Tensor:
        """The reconstructed weight, ``(out_features, in_features)``."""
        return self.weight.to_dense()

    @property
    def num_params(self) -> int:
        """Factor parameters of the weight (bias excluded)."""
        return self.weight.num_params

    @property
    def compression_ratio(self) -> float:
        return self.weight.compression_ratio

    def macs(self, rows: int, *, training: bool = False) -> int:
        """Multiply-accumulates of the weight product for ``rows`` rows (bias adds excluded), as
        planned in training or inference mode."""
        return self.weight.macs(rows, training=training)

    def flops(self, rows: int, *, training: bool = False) -> int:
        """Alias of :meth:`macs`."""
        return self.macs(rows, training=training)

    def extra_repr(self) -> str:
        return f"format={self.format!r}, bias={self.bias is not None}"


def _fixed_format(name: str, cls_name: str) -> type[FactorizedLinear]:
    def __init__(self, in_features, out_features, bias=True, *, device=None, dtype=None, **options):
        FactorizedLinear.__init__(
            self,
            in_features,
            out_features,
            bias,
            format=name,
            device=device,
            dtype=dtype,
            **options,
        )

    doc = f"``FactorizedLinear(..., format={name!r})`` as its own class."
    return type(cls_name, (FactorizedLinear,), {"__init__": __init__, "__doc__": doc})


DenseLinear = _fixed_format("dense", "DenseLinear")
KCPLinear = _fixed_format("kcp", "KCPLinear")
CPLinear = _fixed_format("cp", "CPLinear")
TuckerLinear = _fixed_format("tucker", "TuckerLinear")
TTLinear = _fixed_format("tt", "TTLinear")
TRLinear = _fixed_format("tr", "TRLinear")
BTLinear = _fixed_format("bt", "BTLinear")
HTLinear = _fixed_format("ht", "HTLinear")
