"""KCP's sequential product: factor by factor, each factor's rank summed first in its small
dense matrix, the factor's input axes gathered as its :class:`~.layout.Walk` says."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cpu import native as _native
from ..._cpu.buffers import pooled_empty
from ..._cpu.cost import CostModel, default_cost_model
from ..._cpu.ops import scratch, tall_forward_transposed, tall_linear
from .algebra import Splits, factor_dense
from .layout import AxisKind, GatherMode, SeqStep, Walk
from .parallel import ParallelChunks, kcp_parallel_prepare, parallel_rows
from .walk import chunk_rows, sequential_setup

__all__ = [
    "ParallelSaved",
    "StepMatrix",
    "StepSaved",
    "final_index",
    "flatten_matrices",
    "kcp_linear_sequential",
    "kcp_sequential_prepare",
    "run_walk",
    "sequential_run",
    "walk_matrices",
]

StepMatrix = Tensor | ParallelChunks
"""A step's matrix: ``(g, f)`` laid out for its GEMM, the ``(p, g, f)`` factor of a
``PBATCHED`` step, or the last factor's own CP product (``Walk.inner``)."""


@dataclass
class ParallelSaved:
    """What the backward of an inner CP product step needs: its input ``x`` ``(b e, f)`` and
    step 1's output ``z`` and transpose ``zt`` (:class:`~.parallel.ParallelRows`)."""

    x: Tensor
    z: Tensor
    zt: Tensor | None


StepSaved = Tensor | ParallelSaved
"""What the backward needs of one step: its GEMM input, or an inner product's tensors."""


def group_matrix(a_n: Tensor, step: SeqStep, first: bool) -> Tensor:
    """Factor ``n``'s small matrix ``(p, g, f)`` laid out for ``step``'s GEMM: ``(p g, f)`` when
    the first factor opens ``p``, else ``(g, f')`` with the columns in the layout order of the
    group (``p`` among the factor's axes when the last factor sums over it)."""
    p, g, f = a_n.shape
    if first or p == 1:
        return a_n.reshape(p * g, f)  # (p g, f)
    own = [a.size for a in step.group if a.kind is not AxisKind.TERM]
    q = next(k for k, a in enumerate(step.group) if a.kind is AxisKind.TERM)
    dims = [2 + k for k in range(len(own))]
    dims.insert(q, 0)
    return a_n.reshape(p, g, *own).permute(1, *dims).reshape(g, p * f)  # (g, group)


def kcp_sequential_prepare(
    factors: Sequence[Sequence[Tensor]],
    order: Sequence[int],
    inner: int | None = None,
    inner_order: Sequence[int] = (),
) -> list[StepMatrix]:
    """What :func:`kcp_linear_sequential` builds from the factors before touching the input,
    per factor: its dense ``(p, g, f)`` matrix, or for the last factor with ``inner`` set its
    two chunks (:func:`~.parallel.kcp_parallel_prepare`, its modes in ``inner_order``)."""
    out: list[StepMatrix] = []
    for n, f in enumerate(factors):
        if inner is not None and n == order[-1]:
            modes = tuple(inner_order) or range(len(f))
            out.append(kcp_parallel_prepare([[f[d] for d in modes]], inner))
        else:
            out.append(factor_dense(f))
    return out


def kcp_linear_sequential(
    x: Tensor,
    factors: Sequence[Sequence[Tensor]],
    order: Sequence[int] | None = None,
    inner: int | None = None,
    prepared: Sequence[StepMatrix] | None = None,
    bias: Tensor | None = None,
    splits: tuple[Splits, Splits] | None = None,
    inner_order: Sequence[int] = (),
    cost_model: CostModel | None = None,
) -> Tensor:
    """``x @ W.T`` factor by factor (sequential).

    Factor ``n`` is applied as its small dense matrix ``A_p^(n) = Σ_r ⊗_d F^(n,d)[p, r]`` (the
    rank is summed before moving on) to its input axes ``(i_1^(n), ..., i_D^(n))``. Axes of size 1
    are dropped; when the factor's axes already form one block of the current layout (a factor
    that owns whole trailing or leading modes, e.g. ``in_modes=[[8, 1], [20, 1], [1, 20],
    [1, 18]]``) the GEMM runs on a view, with no copy of the input. Otherwise they are gathered
    by the cheapest of a few block transposes, one permute or one pass of the compiled gather
    (:func:`~.walk.sequential_walk`, priced by ``cost_model``, default
    :func:`~kcprnn._cpu.cost.default_cost_model`). ``order`` lists the factors in the order
    they are applied (default ``0, ..., N-1``). ``inner`` (``P = 1`` only) applies the last
    factor as its own rank-``R_n`` CP product, the parallel product cut at mode ``inner``,
    instead of through its dense matrix: far fewer MACs when that matrix is large and the data
    left by the other factors is small. ``inner_order`` takes that product's modes in another
    order (:func:`~.layout.inner_orders`: modes with one input index moved into the prefix).
    ``prepared`` passes in :func:`kcp_sequential_prepare` of the same factors, order, inner and
    inner_order. ``bias`` ``(out_features,)`` is added in the final reordering of the output
    axes. ``splits`` = ``(in_splits, out_splits)`` saves reading them from the factors' shapes.
    x: ``(b, in_features)`` -> ``(b, out_features)``.
    """
    num_n, num_d = len(factors), len(factors[0])
    order = tuple(range(num_n)) if order is None else tuple(order)
    if sorted(order) != list(range(num_n)):
        raise ValueError(f"order must be a permutation of range({num_n}), got order={list(order)}")
    if num_n == 1:  # a CP over the merged modes
        first = prepared[0] if prepared is not None else factor_dense(factors[0])  # (p, g, f)
        assert isinstance(first, Tensor)
        return F.linear(x, first.sum(0), bias)  # (b, j)
    terms = factors[0][0].shape[0]
    if splits is None:
        splits = (
            tuple(tuple(factors[n][d].shape[3] for n in range(num_n)) for d in range(num_d)),
            tuple(tuple(factors[n][d].shape[2] for n in range(num_n)) for d in range(num_d)),
        )
    walk = sequential_setup(
        tuple(map(tuple, splits[0])),
        tuple(map(tuple, splits[1])),
        terms,
        order,
        inner,
        tuple(inner_order),
        default_cost_model() if cost_model is None else cost_model,
    )
    dense = (
        prepared
        if prepared is not None
        else kcp_sequential_prepare(factors, order, inner, inner_order)
    )
    return sequential_run(x, walk_matrices(dense, walk.steps), walk, bias)  # (b, j)


def flatten_matrices(mats: Sequence[StepMatrix]) -> list[Tensor | None]:
    """The steps' matrices as one list of tensors (an inner product gives its two chunks)."""
    flat: list[Tensor | None] = []
    for m in mats:
        if isinstance(m, ParallelChunks):
            flat += [m.suffix, m.prefix]
        else:
            flat.append(m)
    return flat


def walk_matrices(dense: Sequence[StepMatrix], steps: Sequence[SeqStep]) -> list[StepMatrix]:
    """Each step's matrix for :func:`run_walk`, from :func:`kcp_sequential_prepare`'s output."""
    mats: list[StepMatrix] = []
    for t, step in enumerate(steps):
        a_n = dense[step.factor]  # (p, g, f), or the inner product's two chunks
        if isinstance(a_n, ParallelChunks) or step.gather is GatherMode.PBATCHED:
            mats.append(a_n)
        else:
            mats.append(group_matrix(a_n, step, t == 0))  # (g, f)
    return mats


def sequential_run(
    x: Tensor, mats: Sequence[StepMatrix], walk: Walk, bias: Tensor | None
) -> Tensor:
    """:func:`run_walk` in chunks of rows (:func:`~.walk.chunk_rows`). When autograd needs
    gradients and no step is batched over terms, each chunk is one autograd node
    (:class:`~.backward.SequentialProduct`) with a hand-written backward: a GEMM pair per step
    and the inverse gathers, instead of a graph of some thirty small nodes."""
    flat = flatten_matrices(mats)
    fused = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, bias, *flat))
        and all(step.gather is not GatherMode.PBATCHED for step in walk.steps)
    )

    b = x.shape[0]
    chunk = chunk_rows(b, x.shape[1], walk.steps, walk.model)
    parts = x.split(chunk) if chunk < b else (x,)  # chunks: the gathered copies stay under
    # the allocator's mmap threshold
    if fused:
        product = _sequential_product()
        outs = [product.apply(part, bias, walk, *flat) for part in parts]
    else:
        outs = [run_walk(part, mats, walk, bias) for part in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # (b, j)


_PRODUCT: list[Any] = []


def _sequential_product() -> Any:
    """:class:`~.backward.SequentialProduct` (imported on first use: it imports this module)."""
    if not _PRODUCT:
        from .backward import SequentialProduct

        _PRODUCT.append(SequentialProduct)
    return _PRODUCT[0]


def run_walk(
    x: Tensor,
    mats: Sequence[StepMatrix],
    walk: Walk,
    bias: Tensor | None,
    saved: list[StepSaved] | None = None,
) -> Tensor:
    """The forward of the sequential walk; ``mats[t]`` is step ``t``'s matrix. ``saved``
    collects, per step, what :func:`~.backward.walk_backward` needs (the GEMM inputs)."""
    b = x.shape[0]
    model = walk.model
    sizes = [a.size for a in walk.in_axes]
    z = x
    swapped = False  # the previous GEMM wrote its output already in the next step's first swap
    # gathering copies go to reused buffers (scratch: no fresh pages at every call) unless
    # autograd records the walk; the copy a step's GEMM takes stays fresh when ``saved`` keeps it
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for m in (x, *mats)
        for t in (m if isinstance(m, ParallelChunks) else (m,))
    )
    for t, (step, mat) in enumerate(zip(walk.steps, mats, strict=True)):
        skip_swap, swapped = swapped, False
        if step.gather is GatherMode.PBATCHED:  # P > 1 between the first and the last factor
            assert isinstance(mat, Tensor)
            perm = [step.perm[0] + 1, 0, *[q + 1 for q in step.perm[1:]]]
            zz = z.reshape(b, *sizes).permute(*perm).reshape(walk.terms, b * step.pre, step.f)
            y = torch.bmm(zz, mat.transpose(1, 2))  # (p, b e, g)
            z = y.reshape(walk.terms, b, -1).transpose(0, 1)  # (b, p, e g)
            sizes = [a.size for a in step.axes]
            continue
        if step.gather is GatherMode.SWAPS:
            swaps = step.swaps[1:] if skip_swap else step.swaps
            for u, (pre, m, k, post) in enumerate(swaps):
                z = z.reshape(b * pre, m, k, post).transpose(1, 2)  # (b pre, k, m, post)
                if not recording and (saved is None or u < len(swaps) - 1):
                    z = _reuse_copy(z, u % 2, model)
        elif step.gather in (GatherMode.PERMUTE, GatherMode.NATIVE):
            z = z.reshape(b, *sizes).permute(0, *[q + 1 for q in step.perm])  # (b, e, f)
            if step.gather is GatherMode.NATIVE and not recording:
                z = _native_gather(z, saved is None, model)
            else:
                z = _reuse_copy(z, 0, model) if not recording and saved is None else z
        if isinstance(mat, ParallelChunks):  # the last factor as its own CP product, its
            # output modes laid out as the walk's last step says
            if saved is None and not recording and t == len(walk.steps) - 1:
                out = _inner_native(z.reshape(b, step.pre, step.f), mat, walk, bias)
                if out is not None:
                    return out  # (b, j)
            zin = z.reshape(b * step.pre, step.f)  # (b e, f)
            rows = parallel_rows(zin, mat.suffix, mat.prefix, model)  # y (b e, m, o)
            z = rows.y.reshape(b, step.pre * step.g)  # (b, e g)
            if saved is not None:
                saved.append(ParallelSaved(zin, rows.z, rows.zt))
        elif step.post == 1:
            zin = z.reshape(b * step.pre, step.f)  # (b e, f)
            nxt = walk.steps[t + 1] if t + 1 < len(walk.steps) else None
            z_t = None
            if (
                nxt is not None
                and nxt.gather is GatherMode.SWAPS
                and nxt.swaps[0] == (1, step.pre, step.g, 1)
            ):  # the next step starts by transposing (e, g): the compiled kernel writes
                # (b, g, e) directly
                z_t = tall_forward_transposed(zin.reshape(b, step.pre, step.f), mat, model)
            swapped = z_t is not None
            if z_t is not None:
                z = z_t  # (b, g, e)
            else:
                z = tall_linear(zin, mat, model)  # (b e, g)
            if saved is not None:
                saved.append(zin)
        else:
            zin = z.reshape(b * step.pre, step.f, step.post)  # (b e, f, post)
            z = torch.matmul(mat, zin)  # (b e, g, post)
            if saved is not None:
                saved.append(zin)
        sizes = [a.size for a in step.axes]
    if walk.gathers:  # the output numbers of each row picked in order by one flat index
        index = final_index(tuple(sizes), walk.final, z.device, False)
        flat = z.reshape(b, walk.out_features)  # (b, j) in the walk's order
        if torch.is_grad_enabled() and flat.requires_grad:
            z = torch.index_select(flat, 1, index)  # (b, j)
        else:  # into warm memory: a pooled buffer, free again once the caller drops it
            out = pooled_empty((b, walk.out_features), z.dtype, z.device)
            z = torch.index_select(flat, 1, index, out=out)  # (b, j)
        return z if bias is None else z.add_(bias)  # (b, j)
    if walk.final:
        z = z.reshape(b, *sizes).permute(0, *[q + 1 for q in walk.final])
        if bias is not None:  # bias first: the sum comes out contiguous, in output order
            return (bias.view(z.shape[1:]) + z).reshape(b, walk.out_features)  # (b, j)
    z = z.reshape(b, walk.out_features)  # (b, j)
    return z if bias is None else z + bias  # (b, j)


@lru_cache(maxsize=64)
def final_index(
    sizes: tuple[int, ...], perm: tuple[int, ...], device: torch.device, inverse: bool
) -> Tensor:
    """The flat ``index_select`` index of the final reordering (:func:`~.layout.final_gathers`):
    output number ``t`` of a row is number ``index[t]`` of the row in ``sizes`` layout; with
    ``inverse``, the other way round (the backward). Made outside inference mode, so that
    autograd may save it."""
    with torch.inference_mode(False):
        idx = torch.arange(math.prod(sizes), device=device).view(sizes).permute(perm).reshape(-1)
        return torch.argsort(idx) if inverse else idx  # (j,)


def _inner_native(z: Tensor, mat: ParallelChunks, walk: Walk, bias: Tensor | None) -> Tensor | None:
    """The walk's last step, the last factor's two-chunk CP product, with the final reordering
    and the bias, in one pass of the compiled kernel (:func:`~kcprnn._cpu.native.inner_rows`)
    over ``z`` ``(b, e, f)``; ``None`` where the kernel does not run it (a suffix-only product,
    autograd, not float32 on CPU, kernels not planned for, or none built)."""
    suffix, prefix = mat
    if prefix is None or not walk.model.kernels:
        return None
    if not _native.fits(z, suffix, prefix, *(() if bias is None else (bias,))):
        return None
    k, o, c = suffix.shape
    m = prefix.shape[0]
    offsets, runs = _inner_offsets(walk, o, m, _native.width())
    # the chunks laid out for the kernel, kept on the suffix: inference keeps the chunks
    # between calls (KCPMatrix's cache), and new factors give new chunks (never modified)
    kept = getattr(suffix, "_kcprnn_inner", None)
    if kept is None or kept[0] is not prefix:
        kept = (
            prefix,
            suffix.permute(2, 0, 1).reshape(c, k * o).contiguous(),  # (c, k o)
            prefix.t().contiguous(),
        )  # (a k, m)
        suffix._kcprnn_inner = kept  # type: ignore[attr-defined]
    st, pt = kept[1], kept[2]
    out = z.new_empty(z.shape[0], walk.out_features)  # (b, j)
    return _native.inner_rows(
        z, st, k, pt, out, offsets, runs, None if bias is None else bias.contiguous()
    )  # (b, j)


@lru_cache(maxsize=64)
def _inner_offsets(
    walk: Walk, o: int, m: int, width: int
) -> tuple[tuple[Tensor, Tensor, Tensor], bool]:
    """Where output ``(e, o, m)`` of a row of the walk's last step (an inner product with
    ``o`` suffix and ``m`` prefix outputs) lands in the final layout: ``(off_e, off_o, off_m)``,
    whose sum is the flat output index (each is a product of whole axes, so the final
    permutation splits), and whether ``off_m`` is contiguous within every vector of ``width``.
    The torch path lays a row out ``(e, o, m)`` for a narrow suffix, else ``(e, m, o)``."""
    sizes = tuple(a.size for a in walk.steps[-1].axes)
    total = math.prod(sizes)
    e = total // (o * m)
    with torch.inference_mode(False):
        pos = (
            final_index(sizes, walk.final, torch.device("cpu"), True)
            if walk.final
            else torch.arange(total)
        )  # (j,): output index of each number of the row
        narrow = o < walk.model.narrow
        cube = pos.view(e, o, m) if narrow else pos.view(e, m, o).transpose(1, 2)
        off_e, off_o, off_m = cube[:, 0, 0], cube[0, :, 0], cube[0, 0, :]  # (e,), (o,), (m,)
        if not torch.equal(cube, off_e[:, None, None] + off_o[None, :, None] + off_m):
            raise AssertionError("the final reordering does not split over (e, o, m)")
        lane = torch.arange(m) % width
        runs = bool(torch.equal(off_m - off_m[torch.arange(m) - lane], lane))
        return (off_e.contiguous(), off_o.contiguous(), off_m.contiguous()), runs


def _native_gather(z: Tensor, reuse: bool, model: CostModel) -> Tensor:
    """The permuted view ``z`` copied contiguous by the compiled gather where it runs (float32
    on CPU, kernel built), into scratch buffer 0 where ``reuse`` and one is kept, else into
    fresh memory; on torch otherwise (lazily where not ``reuse``, as :func:`_reuse_copy`)."""
    if not (z.dtype == torch.float32 and z.device.type == "cpu" and _native.available()):
        return _reuse_copy(z, 0, model) if reuse else z
    buf = scratch(0, tuple(z.shape), z, model) if reuse else None
    if buf is None:
        buf = torch.empty(z.shape, dtype=z.dtype)
    return _native.gather(z, buf)


def _reuse_copy(z: Tensor, slot: int, model: CostModel) -> Tensor:
    """``z`` copied into scratch buffer ``slot`` (:func:`~kcprnn._cpu.ops.scratch`), or ``z``
    itself (copied lazily by the next reshape) where no buffer is kept."""
    buf = scratch(slot, tuple(z.shape), z, model)
    return z if buf is None else buf.copy_(z)
