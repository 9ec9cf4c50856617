"""The KCP module: :class:`KCPMatrix`, its parameters, plan cache and inference cache."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..._cpu.cost import CostModel
from ...shapes import balanced_factors, validate_positive_int
from .._base import FactorizedMatrix, register
from .._chain import ChainPlan, ChainSpec
from .algebra import (
    Splits,
    kcp_from_dense,
    kcp_reconstruction_macs,
    kcp_to_dense,
    resolve_kcp_splits,
    validate_kcp_ranks,
)
from .layout import KCPPlan, Walk
from .parallel import kcp_linear_parallel, kcp_parallel_prepare
from .plan import kcp_plan, kcp_plan_macs
from .sequential import kcp_linear_sequential, kcp_sequential_prepare, sequential_run, walk_matrices
from .walk import sequential_setup

__all__ = ["KCP_INITS", "KCPMatrix"]

KCP_INITS = ("orthogonal", "variance")
"""The initializations of :class:`KCPMatrix` (its ``init`` option), the default first."""


@register("kcp")
class KCPMatrix(FactorizedMatrix):
    r"""A weight matrix in Kronecker CP form (Wang et al., TNNLS 2023).

    .. math::
        W[j, i] = \sum_{p=1}^{P} \prod_{n=1}^{N} \sum_{r=1}^{R_n} \prod_{d=1}^{D}
                  \mathrm{factors}[n][d][p, r, j_d^{(n)}, i_d^{(n)}]

    ``i`` is the row-major flattening of ``(i_1^(1), ..., i_1^(N), i_2^(1), ..., i_D^(N))``
    (mode-major, factor-minor), and ``j`` likewise: ``x.reshape(B, I_1^(1), ..., I_D^(N))`` is
    the input tensor. For a fixed term ``p`` each Kronecker factor ``n`` is a rank-``R_n`` CP
    tensor over the ``D`` merged modes; within a mode, factor 1 is the most significant index.

    Args:
        in_features: ``Π_d I_d``.
        out_features: ``Π_d J_d``.
        in_modes: ``D`` mode sizes (each split into ``num_factors`` balanced factors), or a nested
            list of ``D`` lists of the ``N`` factor sizes ``I_d^(1), ..., I_d^(N)``.
        out_modes: as ``in_modes``, for the output.
        num_modes: ``D`` when no mode list is given.
        num_factors: ``N`` (default 2); implied by nested mode lists.
        terms: ``P``, the number of Kronecker (KT) terms.
        rank: the CP rank ``R_n`` of every factor, an int or a list of ``N`` ints.
        init: how :meth:`reset_parameters` draws the factors so that ``W`` has the target std
            (``nn.Linear``'s by default): ``"orthogonal"`` (default; every small matrix
            ``F[n][d][p, r]`` a random semi-orthogonal matrix, one scale for all, so a single
            term is a Kronecker product of orthogonal matrices: a flat spectrum of full rank)
            or ``"variance"`` (entries ``±σ`` with random signs, ``σ`` set so the
            reconstruction's variance is exact; its factors of size 2 x 2 are singular half of
            the time and leave a low-rank ``W`` at small ranks, which costs 4-9 points of
            accuracy there: docs/accuracy.md).
        algorithm: ``"auto"`` (default, cost model :func:`~.plan.kcp_plan`), ``"sequential"``,
            ``"parallel"`` or ``"dense"`` (reconstruct ``W``, then ``F.linear``).
        device, dtype: factory arguments, as in ``torch.nn``.
        cost_model: the :class:`~kcprnn._cpu.cost.CostModel` that plans and routes the
            products (default :func:`~kcprnn._cpu.cost.default_cost_model`); applied as
            :meth:`planning_model` gives it for the parameters' device and dtype.

    Attributes:
        factors: ``factors[n][d]`` is the parameter of shape ``(P, R_n, J_d^(n), I_d^(n))``.
        in_splits, out_splits: ``D x N`` tuples of factor sizes.
        ranks: ``(R_1, ..., R_N)``.
        terms: ``P``.
        num_factors: ``N``.

    Example:
        >>> w = KCPMatrix(57600, 1024, in_modes=[[2, 4], [4, 5], [4, 5], [3, 6]],
        ...               out_modes=[[4, 4], [2, 2], [2, 2], [2, 2]])
        >>> w.num_params
        78
        >>> w(torch.randn(3, 57600)).shape
        torch.Size([3, 1024])
    """

    algorithms = ("auto", "sequential", "parallel", "dense")
    default_algorithm = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        in_modes: Sequence[int] | Sequence[Sequence[int]] | None = None,
        out_modes: Sequence[int] | Sequence[Sequence[int]] | None = None,
        num_modes: int | None = None,
        num_factors: int | None = None,
        terms: int = 1,
        rank: int | Sequence[int] = 1,
        init: str = KCP_INITS[0],
        algorithm: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        in_splits, out_splits, num_n = resolve_kcp_splits(
            in_features, out_features, in_modes, out_modes, num_factors
        )
        flat_in = [math.prod(s) for s in in_splits] if in_splits is not None else in_modes
        flat_out = [math.prod(s) for s in out_splits] if out_splits is not None else out_modes
        # (a side not given nested is a flat list of ints or None)
        super().__init__(
            in_features,
            out_features,
            in_modes=cast("Sequence[int] | None", flat_in),
            out_modes=cast("Sequence[int] | None", flat_out),
            num_modes=num_modes,
            algorithm=algorithm,
            device=device,
            dtype=dtype,
            cost_model=cost_model,
        )
        self.terms = validate_positive_int(terms, "terms")
        if init not in KCP_INITS:
            raise ValueError(f"unknown KCP init {init!r}; choose one of {list(KCP_INITS)}")
        self.init = init
        self.num_factors = num_n
        self.ranks = validate_kcp_ranks(rank, num_n)
        self.in_splits: Splits = tuple(
            map(tuple, in_splits or [balanced_factors(m, num_n) for m in self.in_modes])
        )
        self.out_splits: Splits = tuple(
            map(tuple, out_splits or [balanced_factors(m, num_n) for m in self.out_modes])
        )
        self.factors = nn.ModuleList(
            nn.ParameterList(
                nn.Parameter(torch.empty(self.terms, r, j[n], i[n], **self.factory_kwargs))
                for i, j in zip(self.in_splits, self.out_splits, strict=False)
            )
            for n, r in enumerate(self.ranks)
        )
        self._cache: tuple[tuple, Any] | None = None  # see _prepared
        self._plans: dict[tuple, KCPPlan] = {}  # see plan
        self.reset_parameters()

    def _factor_list(self) -> list[list[Tensor]]:
        # the ParameterLists' own storage: iterating them is ~10 us per call
        return [
            list(f._parameters.values())  # type: ignore[arg-type]
            for f in self.factors._modules.values()
        ]

    def planning_model(self) -> CostModel:
        """:attr:`cost_model` as it applies to the factors' device and dtype
        (:meth:`~kcprnn._cpu.cost.CostModel.for_device`)."""
        first = self._factor_list()[0][0]
        return self.cost_model.for_device(first.device, first.dtype)

    def _forward_setup(self) -> tuple[list[list[Tensor]], CostModel, bool, bool]:
        """What a forward call plans with: the factors, the model, whether it trains (autograd
        will differentiate the factors) and whether the small matrices are kept (``no_grad``)."""
        factors = self._factor_list()
        first = factors[0][0]
        model = self.cost_model.for_device(first.device, first.dtype)
        grad = torch.is_grad_enabled()
        training = grad and first.requires_grad
        return factors, model, training, not training and not grad

    def plan(self, rows: int, training: bool | None = None) -> KCPPlan:
        """The plan ``forward`` runs on ``rows`` rows with the current algorithm; ``training``
        (default: whether autograd will differentiate the factors now) prices the backward too.
        Under ``no_grad`` (and not training) the small matrices are kept between calls, so
        building them is not priced (:meth:`_prepared`)."""
        _, model, now, _ = self._forward_setup()
        training = now if training is None else training
        prepared = not training and not torch.is_grad_enabled()  # see _prepared
        return self._plan(rows, training, prepared, model)

    def _plan(self, rows: int, training: bool, prepared: bool, model: CostModel) -> KCPPlan:
        algorithm = "auto" if self.algorithm == "dense" else self.algorithm
        key = (rows, algorithm, training, prepared, model)
        plan = self._plans.get(key)
        if plan is None:
            plan = kcp_plan(
                rows,
                self.in_splits,
                self.out_splits,
                self.ranks,
                self.terms,
                algorithm,
                training,
                prepared,
                model,
            )
            if len(self._plans) < 64:  # row counts seen (the shapes never change)
                self._plans[key] = plan
        return plan

    def matmul(self, x: Tensor) -> Tensor:
        return self._matmul(x, None)  # (b, j)

    def matmul_bias(self, x: Tensor, bias: Tensor) -> Tensor:
        return self._matmul(x, bias)  # (b, j)

    def _matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        factors, model, training, prepared = self._forward_setup()
        plan = self._plan(x.shape[0], training, prepared, model)
        if plan.algorithm == "parallel":
            out = kcp_linear_parallel(x, factors, plan.split, self._prepared(plan, factors), model)
            return out if bias is None else torch.add(out, bias)  # (b, j)
        return self._sequential(plan, x, bias, model, factors)  # (b, j)

    def _sequential(
        self,
        plan: KCPPlan,
        x: Tensor,
        bias: Tensor | None,
        model: CostModel,
        factors: list[list[Tensor]],
    ) -> Tensor:
        if self.num_factors == 1:
            return kcp_linear_sequential(
                x,
                factors,
                plan.order,
                plan.inner,
                self._prepared(plan, factors),
                bias,
                cost_model=model,
            )  # (b, j)
        walk = sequential_setup(
            self.in_splits,
            self.out_splits,
            self.terms,
            plan.order,
            plan.inner,
            plan.inner_order,
            model,
        )
        mats = self._prepared(plan, factors, walk)
        if mats is None:
            dense = kcp_sequential_prepare(factors, plan.order, plan.inner, plan.inner_order)
            mats = walk_matrices(dense, walk.steps)
        return sequential_run(x, mats, walk, bias)  # (b, j)

    def _prepared(
        self, plan: KCPPlan, factors: list[list[Tensor]], walk: Walk | None = None
    ) -> Any:
        """The small matrices ``plan`` builds from the factors (laid out for ``walk``'s steps
        when given), kept between calls while autograd is off (inference) and the factors are
        unchanged (same tensors, same version counters: an optimizer step, ``load_state_dict``
        or ``.to()`` rebuilds them); ``None`` otherwise. Skips about ten small kernels per call."""
        if torch.is_grad_enabled():
            return None
        params = [p for f in factors for p in f]
        key = (
            plan.algorithm,
            plan.split,
            plan.order,
            plan.inner,
            plan.inner_order,
            walk,
            torch.is_inference_mode_enabled(),
            tuple([(id(p), p.data_ptr(), p._version) for p in params]),
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if plan.algorithm == "parallel":
            built: Any = kcp_parallel_prepare(factors, plan.split)
        else:
            built = kcp_sequential_prepare(factors, plan.order, plan.inner, plan.inner_order)
            if walk is not None:
                built = walk_matrices(built, walk.steps)
        self._cache = (key, built)
        return built

    def to_dense(self) -> Tensor:
        return kcp_to_dense(self._factor_list())

    def chain_spec(self) -> ChainSpec | None:
        # input and output modes split per Kronecker factor (i{d}_{n}, mode-major as the
        # flattening); factor (n, d) is (p, r{n}, j{d}_{n}, i{d}_{n}): the term is summed by the
        # last factor absorbed, each factor's rank by the last of its D tensors (with one mode a
        # factor sums its rank inside its one tensor: no chain)
        if len(self.in_splits) == 1:
            return None
        d, n = range(len(self.in_splits)), range(self.num_factors)
        return ChainSpec(
            in_labels=tuple(f"i{e}_{f}" for e in d for f in n),
            in_sizes=tuple(self.in_splits[e][f] for e in d for f in n),
            operands=tuple(
                (tuple(t.shape), ("p", f"r{f}", f"j{e}_{f}", f"i{e}_{f}"))
                for f, row in enumerate(self._factor_list())
                for e, t in enumerate(row)
            ),
            out_labels=tuple(f"j{e}_{f}" for e in d for f in n),
        )

    def chain_tensors(self) -> list[Tensor]:
        return [t for row in self._factor_list() for t in row]

    def chain_for(self, rows: int, training: bool | None = None) -> ChainPlan | None:
        """The chain's plan on ``rows`` rows in training (default: whether autograd will
        differentiate the factors now) where it costs fewer multiply-adds than :meth:`plan`'s
        (which builds the factor matrices at every call); never in inference, where the built
        matrices are kept between calls."""
        first = self._factor_list()[0][0]
        if training is None:
            training = torch.is_grad_enabled() and first.requires_grad
        if not training:
            return None
        key = (rows, self._algorithm, self.cost_model, first.device, first.dtype)
        chosen = self.__dict__.setdefault("_chain_choice", {})  # what the choice depends on
        if key not in chosen:
            plan = super().chain_for(rows)
            cheaper = plan is not None and plan.macs(rows) < self.matmul_macs(rows, training=True)
            chosen[key] = plan if cheaper else None
        return chosen[key]

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """Multiply-accumulates of the plan ``forward`` runs on ``rows`` rows in that mode:
        training (the factors differentiated) or inference (under ``no_grad``, the small
        matrices kept between calls), whatever the grad mode of the caller. Never builds the
        compiled kernels."""
        plan = self._plan(rows, training, not training, self.planning_model())
        return kcp_plan_macs(plan)

    def reconstruction_macs(self) -> int:
        return kcp_reconstruction_macs(self.in_splits, self.out_splits, self.ranks, self.terms)

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> KCPMatrix:
        """:func:`kcp_from_dense` of ``weight`` ``(out_features, in_features)``; the other
        options are the constructor's (modes, ``terms``, ``rank``, ...)."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        factors = kcp_from_dense(
            weight.detach(), out.in_splits, out.out_splits, out.ranks, out.terms
        )
        with torch.no_grad():
            for mine, new in zip(out._factor_list(), factors, strict=True):
                for p, u in zip(mine, new, strict=True):
                    p.copy_(u)
        return out

    def reset_parameters(self, std: float | None = None) -> None:
        """Draw the factors so that ``W``'s entries have standard deviation ``std`` (default
        :meth:`default_std`), the way :attr:`init` names."""
        std = self._target_std(std)
        with torch.no_grad():
            if self.init == "variance":
                self._variance_init(std)
            else:
                self._orthogonal_init(std)

    def _variance_init(self, std: float) -> None:
        # Var(W[j, i]) = P * prod_n R_n * sigma^(2 D N) for i.i.d. zero-mean entries of variance
        # sigma^2. Entries are +-sigma with random signs: a product of D*N of them has
        # the fixed magnitude sigma^(D N), so the second moment of the reconstruction is exact for
        # P * prod R_n = 1 and a sum of few equal-magnitude terms otherwise (products of normals
        # would be heavy-tailed and make the realized std of W erratic).
        count = self.terms * math.prod(self.ranks)
        exponent = len(self.in_splits) * self.num_factors
        sigma = (std**2 / count) ** (1.0 / (2 * exponent))
        for factor in self._factor_list():
            for p in factor:
                p.copy_(torch.randint_like(p, 2) * (2 * sigma) - sigma)

    def _orthogonal_init(self, std: float) -> None:
        # Every small matrix (J, I) is Haar semi-orthogonal: min(J, I) singular values of 1, a
        # squared Frobenius norm of min(J, I). A term's Kronecker product of them has
        # prod min(J, I) unit singular values; independent terms with random signs add their
        # squared norms in expectation, so one scale c per small matrix gives
        # E ||W||_F^2 = P prod_n R_n c^(2 D N) prod_{n,d} min(J, I) = std^2 * out * in.
        mass = math.prod(
            min(i, j)
            for i_s, j_s in zip(self.in_splits, self.out_splits, strict=True)
            for i, j in zip(i_s, j_s, strict=True)
        )
        count = self.terms * math.prod(self.ranks)
        exponent = len(self.in_splits) * self.num_factors
        target = std**2 * self.in_features * self.out_features
        scale = (target / (count * mass)) ** (1.0 / (2 * exponent))
        for factor in self._factor_list():
            for p in factor:
                p.copy_(_semi_orthogonal(p) * scale)

    def format_repr_items(self) -> list[str]:
        return [
            f"in_splits={[list(s) for s in self.in_splits]}",
            f"out_splits={[list(s) for s in self.out_splits]}",
            f"ranks={list(self.ranks)}",
            f"terms={self.terms}",
            f"num_factors={self.num_factors}",
            *([f"init={self.init!r}"] if self.init != KCP_INITS[0] else []),
        ]


def _semi_orthogonal(like: Tensor) -> Tensor:
    """Random matrices of ``like``'s shape ``(..., J, I)``, each Haar-distributed with
    orthonormal columns (``J >= I``) or rows (``J < I``): the sign-corrected QR of a Gaussian."""
    j, i = like.shape[-2:]
    g = torch.randn(like.shape, device=like.device, dtype=like.dtype)
    tall = g if j >= i else g.transpose(-2, -1)  # (..., max, min)
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q if j >= i else q.transpose(-2, -1)
