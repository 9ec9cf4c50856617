r"""Tucker format on the merged modes, and sums of Tucker blocks (the BT format reuses it).

.. math::
    W[j, i] = \sum_{c=1}^{C} \sum_{r_1, \dots, r_D} G_c[r_1, \dots, r_D]
              \prod_{d=1}^{D} A_{c,d}[(j_d, i_d), r_d]

with ``j``, ``i`` flattened row-major and ``(j_d, i_d)`` merged as ``j_d I_d + i_d``: ``W`` is
viewed as a ``D``-way tensor whose mode ``d`` has size ``J_d I_d`` (see ``docs/formats.md``).
Plain Tucker has one block: factors ``A_d`` of shape ``(J_d I_d, R_d)`` and a
core of shape ``(R_1, ..., R_D)``. Every pure function here also accepts a leading block axis
``C`` (factors ``(C, J_d I_d, R_d)``, core ``(C, R_1, ..., R_D)``) and then sums the ``C`` Tucker
terms: that is the block-term (BT) format of :mod:`kcprnn.formats.bt`.

Legend for shape comments: c block, b batch rows, s ranks already produced (``R_D ... R_{e+1}``),
r current rank ``R_e``, m current output mode ``J_e``, n current input mode ``I_e``,
o output modes already produced, p input modes not yet contracted.

Multiplication (:func:`tucker_linear`) contracts the input modes from the last to the second,
each step one GEMM/BMM on a (transposed) view that puts ``(r, m)`` in front and contracts the
trailing axis: ``x (b p, n) -> (c r m, b p)``, then ``(c s, o b p, n) -> (c s, r m, o b p)``.
With ``R_D ... R_2`` gathered in front the core is applied in one BMM, ``(c, s, o b i_1) ->
(c, r_1, o b i_1)``, and the first factor last, ``(c r_1, o b, i_1) -> (c r_1, o b, j_1)``,
summed over blocks and ``r_1``. Only the first step reads the whole input; ``matmul_macs``
counts the MACs of exactly this order. The mode steps go through :func:`contract_trailing`, whose
backward keeps gradients in the layout of the forward tensors, and large inputs are processed in
cache-sized chunks of rows (:func:`map_row_chunks`, sized by the cost model's
``tucker_chunk_elements``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._cpu import CostModel, default_cost_model
from ..shapes import validate_ranks
from ._base import FactorizedMatrix, listed, register
from ._chain import ChainSpec, modes_spec
from ._halves import join_halves

__all__ = [
    "TuckerMatrix",
    "contract_trailing",
    "hosvd",
    "map_row_chunks",
    "matrix_to_merged",
    "merged_to_matrix",
    "tucker_chain_spec",
    "tucker_linear",
    "tucker_linear_flops",
    "tucker_num_params",
    "tucker_reconstruction_flops",
    "tucker_to_dense",
    "validate_tucker_ranks",
]


# --- pure functions ---


class _ContractTrailing(torch.autograd.Function):
    """``bmm(a, z^T)`` whose backward returns the gradient of ``z`` in ``z``'s own layout."""

    # forward(ctx, ...) rather than setup_context: with setup_context, every apply binds the
    # arguments through inspect.signature, a fixed cost per call
    @staticmethod
    def forward(ctx, a: Tensor, z: Tensor) -> Tensor:
        ctx.save_for_backward(a, z)
        return torch.bmm(a, z.transpose(1, 2))  # (B, K, M)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, z = ctx.saved_tensors
        grad_a = torch.bmm(grad, z) if ctx.needs_input_grad[0] else None  # (B, K, n)
        grad_z = None
        if ctx.needs_input_grad[1]:
            grad_z = torch.bmm(grad.transpose(1, 2), a)  # (B, M, n): z's layout
        return grad_a, grad_z


def map_row_chunks(
    fn: Callable[[Tensor], Tensor], x: Tensor, chunk_elements: int | None = None
) -> Tensor:
    """``fn(x)`` for a row-wise ``fn``, evaluated on about ``x.numel() / chunk_elements`` equal
    chunks of rows (at most one per row) and concatenated.

    The intermediates of a chunk then stay in cache, with the same MACs as one pass.
    ``chunk_elements`` defaults to the default cost model's ``tucker_chunk_elements``.
    """
    if chunk_elements is None:
        chunk_elements = default_cost_model().tucker_chunk_elements
    rows = x.shape[0]
    chunks = min(rows, math.ceil(x.numel() / chunk_elements))
    if chunks <= 1:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(math.ceil(rows / chunks))])


def contract_trailing(a: Tensor, z: Tensor) -> Tensor:
    """Contract the trailing axis of ``z`` ``(B, M, n)`` with ``a`` ``(B, K, n)``: ``(B, K, M)``.

    The same numbers as ``torch.bmm(a, z.transpose(1, 2))``, but the backward computes the
    gradient of ``z`` directly as ``(B, M, n)``; autograd's ``bmm`` backward would produce it
    transposed and the reshape before this step would then copy it (a full-size strided copy,
    which on large inputs costs more than the product itself).
    """
    if not (torch.is_grad_enabled() and (a.requires_grad or z.requires_grad)):
        return torch.bmm(a, z.transpose(1, 2))  # (B, K, M)
    return _ContractTrailing.apply(a, z)


def validate_tucker_ranks(rank: int | Sequence[int], num_modes: int) -> tuple[int, ...]:
    """Tucker ranks ``(R_1, ..., R_D)``: one positive int for all modes or a sequence of ``D``."""
    return validate_ranks(rank, num_modes, "rank")


def tucker_num_params(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], blocks: int = 1
) -> int:
    """``C (sum_d I_d J_d R_d + prod_d R_d)``."""
    factors = sum(i * j * r for i, j, r in zip(in_modes, out_modes, ranks, strict=True))
    return blocks * (factors + math.prod(ranks))


def _as_blocks(factors: Sequence[Tensor], core: Tensor) -> tuple[list[Tensor], Tensor]:
    """Add the block axis to a plain Tucker (factors ``(J_d I_d, R_d)``, core ``(R...)``)."""
    if core.dim() == len(factors):
        return [a.unsqueeze(0) for a in factors], core.unsqueeze(0)
    assert core.dim() == len(factors) + 1 and all(a.dim() == 3 for a in factors)
    return list(factors), core


def _mode_products(t: Tensor, mats: Sequence[Tensor]) -> Tensor:
    """Multiply every mode ``d`` of ``t`` ``(C, n_1, ..., n_D)`` by ``mats[d]`` ``(C, m_d, n_d)``:
    returns ``(C, m_1, ..., m_D)``."""
    c = t.shape[0]
    for mat in mats:
        t = t.reshape(c, mat.shape[2], -1)  # (c, n_d, rest)
        t = torch.bmm(mat, t)  # (c, m_d, rest)
        t = t.transpose(1, 2).reshape(c, -1, mat.shape[1])  # (c, rest, m_d): next mode in front
    return t.reshape(c, *(mat.shape[1] for mat in mats))  # (c, m_1, ..., m_D)


def merged_to_matrix(t: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
    """``(J_1 I_1, ..., J_D I_D)`` -> ``(J, I)``."""
    d = len(in_modes)
    pairs = zip(out_modes, in_modes, strict=True)
    t = t.reshape([s for pair in pairs for s in pair])  # (j_1, i_1, ..., j_D, i_D)
    t = t.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))  # (j_1, ..., j_D, i_1, ..., i_D)
    return t.reshape(math.prod(out_modes), math.prod(in_modes))  # (j, i)


def matrix_to_merged(w: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> Tensor:
    """``(J, I)`` -> ``(J_1 I_1, ..., J_D I_D)``."""
    d = len(in_modes)
    t = w.reshape(*out_modes, *in_modes)  # (j_1, ..., j_D, i_1, ..., i_D)
    t = t.permute([k for e in range(d) for k in (e, d + e)])  # (j_1, i_1, ..., j_D, i_D)
    merged = [j * i for j, i in zip(out_modes, in_modes, strict=True)]
    return t.reshape(merged)  # (j_1 i_1, ..., j_D i_D)


def tucker_to_dense(
    factors: Sequence[Tensor], core: Tensor, in_modes: Sequence[int], out_modes: Sequence[int]
) -> Tensor:
    """Reconstruct ``W`` (``(out_features, in_features)``); with a block axis, the sum of the
    blocks.

    The factors are applied from the last mode to the first, each step one (batched) GEMM over
    a single rank ``R_e`` that writes its result with the output modes already split into
    their row and column groups: after mode ``e`` the tensor is
    ``(c, R_1 .. R_{e-1}, J_e .. J_D, I_e .. I_D)``. The first factor comes last, joined to that
    tensor over the blocks and ``R_1`` together (:func:`~kcprnn.formats._halves.join_halves`:
    GEMMs over ``C R_1`` that write ``W`` in place, so the block sum costs nothing extra). The
    MACs are dominated by that join, ``C R_1 J I`` (:func:`tucker_reconstruction_flops`)."""
    factors, core = _as_blocks(factors, core)
    c, d = core.shape[0], len(factors)
    ranks = tuple(core.shape[1:])
    t = core  # (c, R_1 .. R_e, J_{>e}, I_{>e}) as (c, q, r, jr, ir)
    jr = ir = 1
    for e in range(d - 1, 0, -1):
        q = math.prod(ranks[:e])
        j, i, r = out_modes[e], in_modes[e], ranks[e]
        x = t.reshape(c, q, r, jr * ir)  # (c, q, r, jr ir)
        if jr * ir == 1:
            y = torch.bmm(x.reshape(c, q, r), factors[e].transpose(1, 2))  # (c, q, j i)
        else:
            y = torch.matmul(factors[e].unsqueeze(1), x)  # (c, q, j i, jr ir)
        y = y.reshape(c * q, j, i, jr, ir).transpose(2, 3)  # (c q, j, jr, i, ir)
        t = y.reshape(c * q, j * jr, i * ir)  # (c q, j jr, i ir)
        jr, ir = j * jr, i * ir
    j, i, r = out_modes[0], in_modes[0], ranks[0]
    first = factors[0].transpose(1, 2).reshape(c * r, j, i)  # (c r, j, i)
    return join_halves(first, t.reshape(c * r, jr, ir))  # (J, I)


def tucker_chain_spec(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], blocks: int | None
) -> ChainSpec:
    """The Tucker product as a chain (:mod:`kcprnn.formats._chain`) over the tensors
    ``[A_1, G, A_2, ..., A_D]``: the first factor, the core, the other factors (the core
    early keeps the intermediates at the input's size). With ``blocks`` (BT) every tensor
    has the block axis, a batch axis of every step until the last factor sums it."""
    d = len(in_modes)
    c = () if blocks is None else ("c",)
    lead = () if blocks is None else (blocks,)
    factors = [
        ((*lead, out_modes[e], in_modes[e], ranks[e]), (*c, f"j{e}", f"i{e}", f"s{e}"))
        for e in range(d)
    ]
    core = ((*lead, *ranks), (*c, *(f"s{e}" for e in range(d))))
    return modes_spec(in_modes, (factors[0], core, *factors[1:]))


def tucker_linear(
    x: Tensor,
    factors: Sequence[Tensor],
    core: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` without forming ``W``. x: ``(b, in_features)`` -> ``(b, out_features)``.

    Contraction order and layouts as in the module docstring; blocks are a batch axis of every
    BMM and are summed once at the end. ``cost_model`` sets the chunks of rows
    (:func:`map_row_chunks`; default: :func:`~kcprnn._cpu.default_cost_model`).
    """
    factors, core = _as_blocks(factors, core)
    c, d = core.shape[0], len(in_modes)
    ranks = tuple(core.shape[1:])
    r1, i1, j1 = ranks[0], in_modes[0], out_modes[0]
    # the parameters rearranged once per call (small copies): factors as (c, r m, n), the core as
    # g[c, r_1, s] with s = (R_D, ..., R_2), the first factor as (c r_1, i_1, j_1)
    mats = [
        a.reshape(c, j, i, r).permute(0, 3, 1, 2).reshape(c, r * j, i)
        for a, i, j, r in zip(factors, in_modes, out_modes, ranks, strict=True)
    ]
    g = core.permute(0, 1, *range(d, 1, -1)).reshape(c, r1, -1)  # (c, r_1, s)
    a1 = factors[0].reshape(c, j1, i1, r1).permute(0, 3, 2, 1).reshape(c * r1, i1, j1)

    def rows(x: Tensor) -> Tensor:
        batch = x.shape[0]
        z = x.reshape(1, 1, -1)  # (c=1, s=1, b p)
        if d > 1:
            n = in_modes[-1]
            z = mats[-1].reshape(-1, n) @ x.reshape(-1, n).T  # (c r m, b p): no copy of x
            z = z.reshape(c, ranks[-1], -1)  # (c, s, m b p)
            for e in range(d - 2, 0, -1):
                n, s = in_modes[e], z.shape[1]
                a = mats[e].unsqueeze(1).expand(c, s, -1, n).reshape(c * s, -1, n)  # (c s, r m, n)
                z = contract_trailing(a, z.reshape(c * s, -1, n))  # (c s, r m, o b p)
                z = z.reshape(c, s * ranks[e], -1)  # (c, s r, m o b p)
        z = torch.matmul(g, z)  # (c, r_1, o b i_1): the core
        z = torch.bmm(z.reshape(c * r1, -1, i1), a1)  # (c r_1, o b, j_1)
        z = z.sum(0).reshape(-1, batch, j1)  # (o, b, j_1) with o = (j_2, ..., j_D)
        return z.permute(1, 2, 0).reshape(batch, -1)  # (b, j)

    model = default_cost_model() if cost_model is None else cost_model
    return map_row_chunks(rows, x, model.tucker_chunk_elements)  # (b, j)


def tucker_linear_flops(
    rows: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    blocks: int = 1,
) -> int:
    """MACs of :func:`tucker_linear`: mode step ``e >= 2`` costs
    ``C b prod_{f>=e}(R_f J_f) prod_{f<=e} I_f``, the core ``C b J_2..J_D I_1 R_1..R_D`` and the
    first factor ``C b J_2..J_D I_1 R_1 J_1``; the final sum over blocks and ``R_1``
    (``(C R_1 - 1) b J`` additions) is not counted. Chunking the rows does not change it."""
    d = len(in_modes)
    carried = [r * j for r, j in zip(ranks, out_modes, strict=True)]  # R_f J_f
    steps = sum(math.prod(carried[e:]) * math.prod(in_modes[: e + 1]) for e in range(1, d))
    outer = math.prod(out_modes[1:]) * in_modes[0] * ranks[0]
    return blocks * rows * (steps + outer * math.prod(ranks[1:]) + outer * out_modes[0])


def tucker_reconstruction_flops(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], blocks: int = 1
) -> int:
    """MACs of :func:`tucker_to_dense`: mode ``e >= 2`` costs
    ``C prod_{f<e} R_f * J_e I_e R_e * prod_{f>e} J_f I_f``, the first mode ``C R_1 J I``."""
    merged = [i * j for i, j in zip(in_modes, out_modes, strict=True)]
    steps = sum(
        math.prod(ranks[:e]) * merged[e] * ranks[e] * math.prod(merged[e + 1 :])
        for e in range(1, len(merged))
    )
    return blocks * (steps + ranks[0] * math.prod(merged))


def hosvd(
    weight: Tensor, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> tuple[list[Tensor], Tensor]:
    """Truncated higher-order SVD of ``weight`` ``(J, I)`` on the merged modes.

    ``A_d`` holds the ``R_d`` leading left singular vectors of the mode-``d`` unfolding and the
    core is ``W`` multiplied by every ``A_d^T``. Exact when every ``R_d`` is the rank of its
    unfolding (e.g. ``R_d = J_d I_d``).

    Returns:
        ``(factors, core)``: factors ``(J_d I_d, R_d)``, core ``(R_1, ..., R_D)``.
    """
    t = matrix_to_merged(weight, in_modes, out_modes)  # (j_1 i_1, ..., j_D i_D)
    factors = []
    for d, r in enumerate(ranks):
        limit = min(t.shape[d], t.numel() // t.shape[d])
        if r > limit:
            raise ValueError(
                f"hosvd needs rank[{d}] <= min(J_d I_d, product of the other merged modes) = "
                f"{limit}, got rank[{d}]={r}"
            )
        unfolding = t.movedim(d, 0).reshape(t.shape[d], -1)  # (m n, rest)
        u = torch.linalg.svd(unfolding, full_matrices=False).U  # (m n, k)
        factors.append(u[:, :r])  # (m n, r)
    core = _mode_products(t.unsqueeze(0), [a.T.unsqueeze(0) for a in factors])[0]  # (r_1, ...)
    return factors, core


# --- module ---


@register("tucker")
class TuckerMatrix(FactorizedMatrix):
    r"""A weight matrix in Tucker form over the merged modes ``(J_d, I_d)``.

    .. math::
        W[j, i] = \sum_{r} G[r_1, \dots, r_D] \prod_d A_d[(j_d, i_d), r_d]

    Args:
        in_features, out_features, in_modes, out_modes, num_modes, algorithm, device, dtype,
        cost_model: as in :class:`~kcprnn.formats.FactorizedMatrix`.
        rank: Tucker ranks ``R_d``: an int for every mode or a sequence of ``D`` ints.
            Default: 4, the rank of the UCF11 baselines.

    Attributes:
        ranks: tuple ``(R_1, ..., R_D)``.
        factors: ``nn.ParameterList`` of ``D`` tensors ``A_d`` of shape ``(J_d I_d, R_d)``.
        core: parameter of shape ``(R_1, ..., R_D)``.

    Example:
        >>> w = TuckerMatrix(24, 10, in_modes=(3, 4, 2), out_modes=(2, 1, 5), rank=2)
        >>> w.num_params, w(torch.ones(2, 24)).shape
        (48, torch.Size([2, 10]))
    """

    def __init__(
        self, in_features: int, out_features: int, *, rank: int | Sequence[int] = 4, **options
    ) -> None:
        super().__init__(in_features, out_features, **options)
        self.ranks = validate_tucker_ranks(rank, self.num_modes)
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(j * i, r, **self.factory_kwargs))
            for i, j, r in zip(self.in_modes, self.out_modes, self.ranks, strict=True)
        )
        self.core = nn.Parameter(torch.empty(self.ranks, **self.factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        # All entries (factors and core) i.i.d. with mean 0 and variance s^2: W[j, i] is a sum of
        # prod_d R_d independent products of D + 1 entries, so Var(W) = prod(R) s^(2(D + 1)),
        # hence s = (std^2 / prod(R))^(1 / (2(D + 1))). Uniform entries keep the sampled std of W
        # close to std (lighter tails than Gaussian).
        std = self.default_std() if std is None else std
        s = (std**2 / math.prod(self.ranks)) ** (1 / (2 * (self.num_modes + 1)))
        bound = s * math.sqrt(3)  # U(-a, a) has std a / sqrt(3)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def matmul(self, x: Tensor) -> Tensor:
        return tucker_linear(
            x,
            list(self.factors),
            self.core,
            self.in_modes,
            self.out_modes,
            cost_model=self.cost_model,
        )  # (b, j)

    def to_dense(self) -> Tensor:
        return tucker_to_dense(list(self.factors), self.core, self.in_modes, self.out_modes)

    def chain_spec(self) -> ChainSpec | None:
        return tucker_chain_spec(self.in_modes, self.out_modes, self.ranks, None)

    def chain_tensors(self) -> list[Tensor]:
        factors = listed(self.factors)
        return [factors[0], self.core, *factors[1:]]

    def matmul_macs(self, rows: int, *, training: bool = False) -> int:
        """MACs of :meth:`matmul` (:func:`tucker_linear_flops`). The contraction order is fixed,
        so training and inference count the same."""
        return tucker_linear_flops(rows, self.in_modes, self.out_modes, self.ranks)

    def reconstruction_macs(self) -> int:
        return tucker_reconstruction_flops(self.in_modes, self.out_modes, self.ranks)

    def format_repr_items(self) -> list[str]:
        return [f"rank={list(self.ranks)}"]

    @classmethod
    def from_dense(cls, weight: Tensor, **options) -> TuckerMatrix:
        """Truncated HOSVD (:func:`hosvd`) of ``weight`` ``(out_features, in_features)``; the other
        options are the constructor's. Exact when ``rank`` is the full multilinear rank."""
        if weight.dim() != 2:
            raise ValueError(f"from_dense expects a 2-D weight, got shape {tuple(weight.shape)}")
        options.setdefault("dtype", weight.dtype)
        options.setdefault("device", weight.device)
        out = cls(weight.shape[1], weight.shape[0], **options)
        factors, core = hosvd(weight.detach(), out.in_modes, out.out_modes, out.ranks)
        with torch.no_grad():
            for p, a in zip(out.factors, factors, strict=True):
                p.copy_(a)
            out.core.copy_(core)
        return out
