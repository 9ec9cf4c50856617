"""The interface every weight format implements, and the registry of formats by name.

A *format* stores an ``(out_features, in_features)`` matrix ``W`` as a set of small factors and
multiplies inputs by it without rebuilding ``W``. Subclasses implement the math through the
hooks marked "subclass hooks" below; everything else (input checks, leading batch dims, the
``"dense"`` algorithm, counting, ``extra_repr``) lives here once.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, TypedDict, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compile import compiled_product, exported_product
from .._cpu import CostModel, default_cost_model
from ..shapes import resolve_modes
from ._chain import ChainPlan, ChainSpec, best_plan, chain_linear

__all__ = [
    "FORMATS",
    "FactorizedMatrix",
    "FactoryKwargs",
    "listed",
    "make_matrix",
    "orthonormal_",
    "register",
    "resolve_dtype",
]

CHAIN_ROWS = 4
"""Up to this many rows ``forward`` runs a format's chain (:meth:`FactorizedMatrix.chain_spec`)
in the compiled kernel instead of its own product: one autograd node and one call each way,
where the products pay their operator launches. At 1-4 rows the chain measured faster on
every format and shape of ``benchmarks/bench_chain.py`` (rank 4; 40 x 512 to 512 x 2,048),
at 8 rows not on all (``benchmarks/results/recurrence/chain/``)."""

FORMATS: dict[str, type[FactorizedMatrix]] = {}
"""Format name -> class. Filled by :func:`register`; iterate ``sorted(FORMATS)``."""

_M = TypeVar("_M", bound="type[FactorizedMatrix]")


def register(name: str) -> Callable[[_M], _M]:
    """Class decorator that registers a :class:`FactorizedMatrix` subclass under ``name``."""

    def wrap(cls: _M) -> _M:
        if name in FORMATS and FORMATS[name] is not cls:
            raise ValueError(f"format {name!r} is already registered by {FORMATS[name].__name__}")
        cls.format_name = name
        FORMATS[name] = cls
        return cls

    return wrap


def listed(parameters: nn.ParameterList) -> list[Tensor]:
    """A ``ParameterList``'s parameters in order, without its per-index lookups (a cell step's
    chain reads its tensors at every call)."""
    return list(parameters._parameters.values())  # type: ignore[arg-type]


def make_matrix(format: str, in_features: int, out_features: int, **options) -> FactorizedMatrix:
    """Build the registered format ``format`` (see :data:`FORMATS`) with its options.

    A float ``rank`` in ``(0, 1]`` is a parameter budget, the share of the dense matrix's
    parameters: it is solved into the format's own options (:mod:`kcprnn.budget`)."""
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {sorted(FORMATS)}")
    from ..budget import budget_options, is_budget

    if is_budget(options.get("rank")):
        options = budget_options(format, in_features, out_features, options)
    cls = FORMATS[format]
    try:
        return cls(in_features, out_features, **options)
    except TypeError as err:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if bad is None or bad.group(1) not in options:
            raise
        takes = dict.fromkeys(  # the named arguments of every __init__ along the MRO, in order
            name
            for klass in cls.__mro__
            if "__init__" in vars(klass)
            for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and name not in ("self", "in_features", "out_features")
        )
        raise TypeError(
            f"format {format!r} ({cls.__name__}) takes no option {bad.group(1)!r}; its options: "
            f"{', '.join(takes)}"
        ) from err


class FactoryKwargs(TypedDict):
    """The ``device`` and ``dtype`` factory arguments every format creates its parameters with
    (``torch.empty(..., **self.factory_kwargs)``)."""

    device: torch.device | str | None
    dtype: torch.dtype


def resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` or torch's default; a clear ``TypeError`` for a non-floating dtype."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"factorized weights need a real floating dtype, got dtype={dtype}")
    return dtype


class FactorizedMatrix(nn.Module):
    r"""Base class: an ``(out_features, in_features)`` matrix stored in a tensor format.

    ``forward(x)`` returns ``x @ W.T`` for ``x`` of shape ``(..., in_features)``, computed from
    the factors (never by rebuilding ``W``) unless ``algorithm="dense"`` is asked for.

    Args:
        in_features: size of each input row, ``I_1 ⋯ I_D``.
        out_features: size of each output row, ``J_1 ⋯ J_D``.
        in_modes: the ``D`` input mode sizes; balanced from ``in_features`` when omitted.
        out_modes: the ``D`` output mode sizes; balanced from ``out_features`` when omitted.
        num_modes: ``D`` when neither mode list is given (default: 4 where the sizes allow).
        algorithm: how ``forward`` multiplies, one of the class's :attr:`algorithms`.
        device, dtype: factory arguments for the parameters, as in ``torch.nn``.
        cost_model: the machine's :class:`~kcprnn._cpu.CostModel` that planning and chunking
            use (default: :func:`~kcprnn._cpu.default_cost_model`).

    Attributes:
        in_modes, out_modes: tuples of mode sizes.
        num_params: number of factor parameters.
        compression_ratio: ``in_features * out_features / num_params``.
    """

    format_name: ClassVar[str] = ""
    algorithms: ClassVar[tuple[str, ...]] = ("factorized", "dense")
    default_algorithm: ClassVar[str] = "factorized"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_modes: int | None = None,
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        super().__init__()
        self.cost_model = cost_model
        self.in_modes, self.out_modes = resolve_modes(
            in_features, out_features, in_modes, out_modes, num_modes
        )
        self.in_features = in_features
        self.out_features = out_features
        self.algorithm = self.default_algorithm if algorithm is None else algorithm
        self.factory_kwargs: FactoryKwargs = {"device": device, "dtype": resolve_dtype(dtype)}

    # --- public API ---

    @property
    def algorithm(self) -> str:
        """The multiplication used by ``forward``; settable."""
        return self._algorithm

    @algorithm.setter
    def algorithm(self, value: str) -> None:
        if value not in self.algorithms:
            raise ValueError(
                f"algorithm must be one of {list(self.algorithms)} for format "
                f"{self.format_name!r}, got algorithm={value!r}"
            )
        self._algorithm = value

    @property
    def cost_model(self) -> CostModel:
        """The cost model this matrix plans with; settable (``None``: the default)."""
        return default_cost_model() if self._cost_model is None else self._cost_model

    @cost_model.setter
    def cost_model(self, value: CostModel | None) -> None:
        if value is not None and not isinstance(value, CostModel):
            raise TypeError(f"cost_model must be a CostModel or None, got {type(value).__name__}")
        self._cost_model = value

    def planning_model(self) -> CostModel:
        """:attr:`cost_model` as it applies to this matrix's parameters' device and dtype
        (:meth:`CostModel.for_device`)."""
        p = next(self.parameters(), None)
        return self.cost_model.for_device(
            None if p is None else p.device, None if p is None else p.dtype
        )

    @property
    def num_modes(self) -> int:
        return len(self.in_modes)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x @ W.T`` (``+ bias``). Shape: ``(..., in_features) -> (..., out_features)``."""
        if x.dim() == 2 and x.shape[1] == self.in_features and not torch.compiler.is_compiling():
            # a few rows through the chain, which checks its dtypes itself; anything else
            # (more rows, another dtype) goes on to the checks below
            out = self._chain_product(x, bias)
            if out is not None:
                return out  # (b, j)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with last dimension "
                f"in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        p = next(iter(self.parameters()), None)
        if p is not None and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{type(self).__name__}: input must have the type {p.dtype}, got type {x.dtype}"
            )
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (b, i)
        if torch.compiler.is_compiling() and self.format_name != "dense":
            # one opaque node under torch.compile, plain operators under torch.export
            traced = exported_product if torch.compiler.is_exporting() else compiled_product
            return traced(self, rows, bias).reshape(*lead, self.out_features)
        chained = self._chain_product(rows, bias) if x.dim() != 2 else None
        if self.algorithm == "dense":
            out = F.linear(rows, self.to_dense(), bias)  # (b, j)
        elif chained is not None:
            out = chained  # (b, j)
        elif bias is not None:
            out = self.matmul_bias(rows, bias)  # (b, j)
        else:
            out = self.matmul(rows)  # (b, j)
        return out.reshape(*lead, self.out_features)

    @property
    def num_params(self) -> int:
        """Number of factor parameters (what the format stores)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        """Dense entries per stored parameter: ``in_features * out_features / num_params``."""
        return self.in_features * self.out_features / self.num_params

    def macs(self, rows: int, *, training: bool = False) -> int:
        """Multiply-accumulates of ``forward`` on ``rows`` rows with the current algorithm, as
        planned in training (autograd recording) or inference mode. Planning never builds the
        compiled kernels, and the count does not depend on whether they can be built. It counts
        the format's own product; on at most :data:`CHAIN_ROWS` rows ``forward`` runs the chain
        instead (:func:`~kcprnn.formats._chain.chain_macs`)."""
        if self.algorithm == "dense":
            return self.reconstruction_macs() + rows * self.in_features * self.out_features
        return self.matmul_macs(rows, training=training)

    def flops(self, rows: int, *, training: bool = False) -> int:
        """Alias of :meth:`macs` (kept for older code: the count is of multiply-accumulates)."""
        return self.macs(rows, training=training)

    def extra_repr(self) -> str:
        items = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"in_modes={list(self.in_modes)}",
            f"out_modes={list(self.out_modes)}",
            *self.format_repr_items(),
        ]
        if self.algorithm != self.default_algorithm:
            items.append(f"algorithm={self.algorithm!r}")
        items.append(f"params={self.num_params:,}")
        items.append(f"compression={self.compression_ratio:,.1f}x")
        return ", ".join(items)

    def default_std(self) -> float:
        """Std of ``W`` that :meth:`reset_parameters` targets by default: ``nn.Linear``'s,
        ``U(-1/sqrt(in), 1/sqrt(in))``, i.e. ``1 / sqrt(3 * in_features)``."""
        return 1.0 / math.sqrt(3 * self.in_features)

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> FactorizedMatrix:
        """Decompose a dense ``(out_features, in_features)`` matrix into this format."""
        raise NotImplementedError(
            f"format {cls.format_name!r} has no decomposition of a dense matrix yet; "
            f"formats with one: {sorted(n for n, c in FORMATS.items() if c.has_from_dense())}"
        )

    @classmethod
    def has_from_dense(cls) -> bool:
        return cls.from_dense.__func__ is not FactorizedMatrix.from_dense.__func__  # type: ignore[attr-defined]

    # --- subclass hooks ---

    def matmul(self, x: Tensor) -> Tensor:
        """Factorized product on a 2-D batch: ``(b, in_features) -> (b, out_features)``."""
        raise NotImplementedError

    def matmul_bias(self, x: Tensor, bias: Tensor) -> Tensor:
        """:meth:`matmul` plus ``bias`` ``(out_features,)``; formats may fuse the addition."""
        return torch.add(self.matmul(x), bias)  # (b, j)

    def to_dense(self) -> Tensor:
        """Reconstruct ``W``, shape ``(out_features, in_features)``."""
        raise NotImplementedError

    def chain_spec(self) -> ChainSpec | None:
        """The product as a chain of labelled contractions over :meth:`chain_tensors`
        (:mod:`kcprnn.formats._chain`), which ``forward`` runs on at most :data:`CHAIN_ROWS`
        rows; ``None`` where the format has none."""
        return None

    def chain_tensors(self) -> list[Tensor]:
        """The tensors of :meth:`chain_spec`'s operands, in its order."""
        raise NotImplementedError

    def _chain_product(self, rows: Tensor, bias: Tensor | None) -> Tensor | None:
        """``rows @ W.T`` (``+ bias``) through the chain's kernel on at most
        :data:`CHAIN_ROWS` rows; ``None`` where it does not run (more rows, the dense
        algorithm, no chain, no kernel, another dtype: the checks of ``forward`` then run)."""
        if (plan := self.chain_for(rows.shape[0])) is None:
            return None
        if torch.is_autocast_enabled(rows.device.type):
            return None  # the products' own casts apply
        return chain_linear(rows, plan, self.chain_tensors(), bias)  # (b, j)

    def chain_for(self, rows: int, training: bool | None = None) -> ChainPlan | None:
        """The chain's plan where a product on ``rows`` rows runs it: at most
        :data:`CHAIN_ROWS` rows, not on the dense algorithm, a format with a chain; else
        ``None``. (The kernel's own checks, dtypes and devices, come at the call.) ``training``
        (default: the current grad mode) matters to formats whose own product differs between
        training and inference (KCP)."""
        if rows > CHAIN_ROWS or self._algorithm == "dense":
            return None
        return self._chain_plan()

    def _chain_plan(self) -> ChainPlan | None:
        """:meth:`chain_spec`'s plan, made once (the shapes are fixed at construction)."""
        if "_chain_cache" not in self.__dict__:
            spec = self.chain_spec()
            self.__dict__["_chain_cache"] = None if spec is None else best_plan(spec)
        return self.__dict__["_chain_cache"]

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """Multiply-accumulates of :meth:`matmul` on ``rows`` rows, in training or inference."""
        raise NotImplementedError

    def reconstruction_macs(self) -> int:
        """Multiply-accumulates of :meth:`to_dense`."""
        raise NotImplementedError

    def matmul_flops(self, rows: int) -> int:
        """Alias of :meth:`matmul_macs` in inference mode."""
        return self.matmul_macs(rows)

    def reconstruction_flops(self) -> int:
        """Alias of :meth:`reconstruction_macs`."""
        return self.reconstruction_macs()

    def reset_parameters(self, std: float | None = None) -> None:
        """Re-initialize so that the reconstructed ``W`` has std ``std`` (default
        :meth:`default_std`)."""
        raise NotImplementedError

    def _target_std(self, std: float | None) -> float:
        """``std`` for :meth:`reset_parameters`: :meth:`default_std` where ``None``; a
        ``ValueError`` naming it unless positive."""
        std = self.default_std() if std is None else std
        if not std > 0:
            raise ValueError(f"std must be positive, got std={std}")
        return std

    def format_repr_items(self) -> list[str]:
        """Format-specific ``extra_repr`` entries (ranks, terms, ...)."""
        return []


def orthonormal_(param: Tensor, rows: int) -> None:
    """Fill ``param`` (viewed as ``(rows, cols)``) with a random matrix whose map ``v -> M v``
    preserves squared norms: orthonormal columns when ``cols <= rows`` (exact), otherwise
    orthonormal rows scaled by ``sqrt(cols / rows)`` (exact in expectation over isotropic ``v``).

    Gram-Schmidt (each vector orthogonalized twice) on a Gaussian draw gives the Haar
    distribution; it is used instead of ``torch.linalg.qr`` because these matrices are tiny and a
    multithreaded LAPACK call on them costs far more than the arithmetic on a busy machine.
    """
    cols = param.numel() // rows
    dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.randn(max(rows, cols), min(rows, cols), device=param.device, dtype=dtype)
    for k in range(g.shape[1]):
        v = g[:, k]  # (m,)
        for _ in range(2):
            v = v - g[:, :k] @ (g[:, :k].T @ v)  # (m,)
        g[:, k] = v / v.norm()
    m = g if cols <= rows else g.T * math.sqrt(cols / rows)  # (rows, cols)
    param.copy_(m.reshape(param.shape))
