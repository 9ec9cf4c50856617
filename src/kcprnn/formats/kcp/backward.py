"""The hand-written backward of KCP's sequential walk: the whole walk as one autograd node."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..._cpu.ops import weight_grad
from .layout import GatherMode, Walk, inverse
from .parallel import ParallelChunks
from .sequential import (
    ParallelSaved,
    StepMatrix,
    StepSaved,
    final_index,
    flatten_matrices,
    run_walk,
)

__all__ = ["SequentialProduct", "flatten_matrices", "unflatten_matrices", "walk_backward"]

StepGrad = Tensor | tuple[Tensor | None, Tensor | None] | None
"""The gradient of one step's matrix: a tensor, a ``(suffix, prefix)`` pair for an inner CP
product, or ``None`` where it is not needed."""


def unflatten_matrices(walk: Walk, flat: Sequence[Tensor | None]) -> list[StepMatrix]:
    """Inverse of :func:`~.sequential.flatten_matrices` for ``walk``'s steps (the last one an inner
    product's chunks where ``walk.inner``)."""
    mats: list[StepMatrix] = []
    num = len(walk.steps)
    plain = num - 1 if walk.inner else num
    for t in flat[:plain]:
        assert t is not None
        mats.append(t)
    if walk.inner:
        suffix, prefix = flat[plain], flat[plain + 1]
        assert suffix is not None and len(flat) == num + 1
        mats.append(ParallelChunks(suffix, prefix))
    return mats


def walk_backward(
    grad: Tensor,
    mats: Sequence[StepMatrix],
    walk: Walk,
    saved: Sequence[StepSaved],
    need_x: bool,
    need: Sequence[bool],
) -> tuple[Tensor | None, list[StepGrad]]:
    """Gradients of :func:`~.sequential.run_walk` (no ``PBATCHED`` step) for the output
    gradient ``grad`` ``(b, j)``: ``(grad_x or None, per-step gradients of mats)`` (``None``
    where ``need`` is false, a pair for the inner product)."""
    model = walk.model
    b = grad.shape[0]
    steps = walk.steps
    g = grad
    last = [a.size for a in steps[-1].axes]
    if walk.gathers:
        g = torch.index_select(g, 1, final_index(tuple(last), walk.final, g.device, True))
    elif walk.final:
        g = g.reshape(b, *[last[q] for q in walk.final]).permute(
            0, *[q + 1 for q in inverse(walk.final)]
        )  # (b, *last axes)
    grads: list[StepGrad] = [None] * len(steps)
    for t in range(len(steps) - 1, -1, -1):
        step, mat, kept = steps[t], mats[t], saved[t]
        wanted = t > 0 or need_x
        rows = b * step.pre
        g_in: Tensor | None
        if isinstance(mat, ParallelChunks):
            assert isinstance(kept, ParallelSaved)
            suffix, prefix = mat
            k, o, c = suffix.shape
            g_prefix: Tensor | None
            if prefix is None:
                gz = g.reshape(rows, 1, o).expand(rows, k, o).reshape(rows, k * o)  # (b e, k o)
                g_prefix = None
            else:
                m, ak = prefix.shape
                if kept.zt is not None:  # narrow: y (b e o, m) = zt @ prefix.T
                    gy = g.reshape(rows * o, m)  # (b e o, m)
                    g_prefix = weight_grad(gy, kept.zt, model) if need[t] else None  # (m, a k)
                    gz = (
                        gy.mm(prefix).reshape(rows, o, ak).transpose(1, 2).reshape(-1, k * o)
                    )  # (b e a, k o)
                else:  # wide: y (b e, m, o) = prefix @ z
                    gy = g.reshape(rows, m, o)  # (b e, m, o)
                    zz = kept.z.reshape(rows, ak, o)  # (b e, a k, o)
                    g_prefix = torch.einsum("nmo,nko->mk", gy, zz) if need[t] else None
                    gz = torch.matmul(prefix.t(), gy).reshape(-1, k * o)  # (b e a, k o)
            flat_in = kept.x.reshape(-1, c)  # (b e a, c)
            g_suffix = (
                weight_grad(gz, flat_in, model).reshape(k, o, c) if need[t] else None
            )  # (k, o, c)
            grads[t] = (g_suffix, g_prefix)
            g_in = gz.mm(suffix.reshape(k * o, c)) if wanted else None  # (b e a, c)
        else:
            assert isinstance(kept, Tensor)
            if step.post == 1:
                g2 = g.reshape(rows, step.g)  # (b e, g)
                grads[t] = weight_grad(g2, kept, model) if need[t] else None  # (g, f)
                g_in = g2.mm(mat) if wanted else None  # (b e, f)
            else:
                g3 = g.reshape(rows, step.g, step.post)  # (b e, g, post)
                grads[t] = torch.einsum("ngq,nfq->gf", g3, kept) if need[t] else None  # (g, f)
                g_in = torch.matmul(mat.t(), g3) if wanted else None  # (b e, f, post)
        if g_in is None:
            break
        before = steps[t - 1].axes if t > 0 else walk.in_axes
        sizes = [a.size for a in before]
        if step.gather is GatherMode.SWAPS:
            g = g_in
            for pre, m_, k_, post in reversed(step.swaps):
                g = g.reshape(b * pre, k_, m_, post).transpose(1, 2)  # (b pre, m, k, post)
        elif step.gather in (GatherMode.PERMUTE, GatherMode.NATIVE):
            moved = [sizes[q] for q in step.perm]
            g = g_in.reshape(b, *moved).permute(0, *[q + 1 for q in inverse(step.perm)])
        else:
            g = g_in
    grad_x = g.reshape(b, -1) if need_x else None  # (b, i)
    return grad_x, grads


class SequentialProduct(torch.autograd.Function):
    """:func:`~.sequential.run_walk` as one autograd node with :func:`walk_backward` (first
    order). Arguments: ``(x, bias, walk, *flatten_matrices(mats))``."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, walk: Walk, *flat: Tensor | None) -> Tensor:
        mats = unflatten_matrices(walk, flat)
        saved: list[StepSaved] = []
        out = run_walk(x, mats, walk, bias, saved)
        ctx.walk, ctx.mats, ctx.saved_steps = walk, mats, saved
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        walk, mats = ctx.walk, ctx.mats
        needs = ctx.needs_input_grad
        need = []
        q = 3
        for m in mats:
            width = 2 if isinstance(m, ParallelChunks) else 1
            need.append(any(needs[q : q + width]))
            q += width
        grad = grad.contiguous()
        grad_x, grads = walk_backward(grad, mats, walk, ctx.saved_steps, needs[0], need)
        flat: list[Tensor | None] = []
        for m, gm in zip(mats, grads, strict=True):
            if isinstance(m, ParallelChunks):
                pair = gm if isinstance(gm, tuple) else (None, None)
                flat += [pair[0], pair[1] if m.prefix is not None else None]
            else:
                assert not isinstance(gm, tuple)
                flat.append(gm)
        grad_bias = grad.sum(0) if ctx.has_bias and needs[1] else None  # (j,)
        return (grad_x, grad_bias, None, *flat)
