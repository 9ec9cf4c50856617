"""``kcprnn::layer_kcp``: one opaque ``torch.compile`` operator for a direction of a layer
whose ``W_ih`` is a KCP matrix running the sequential walk (``P = 1``, ``N > 1``, planned for a
static number of rows: :func:`_kcp_spec`). The walk's small matrices are built from the factors
in the graph (:func:`kcp_step_matrices`: plain operators, fused by inductor and differentiated
by AOT autograd); the operator calls the walk's and the recurrence's own forward code without
autograd (:func:`_kcp_forward`) and keeps what their hand-written backwards need under a token
for ``kcprnn::layer_kcp_backward`` (:func:`_kcp_backward`; recomputed where none is kept).
Used by :func:`kcprnn._compile_layer.compiled_layer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._compile import _keep_state, _module, _no_token, _parameters, _take, module_key
from ._compile_lstm import _Ctx, _LSTMRun

__all__ = ["kcp_step_matrices"]


def _layer_wrt(
    x: Tensor,
    bias: Tensor | None,
    params: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    needs: Sequence[bool],
) -> list[Tensor]:
    """The tensors a layer operator's backward returns gradients for, in its order: those that
    ``needs`` marks (in the order ``x, bias, params, h0, c0, bias_hh, weight``) and are
    given."""
    slots: list[list[Tensor]] = [[t] if t is not None else [] for t in (x, bias)]
    slots += [list(params)] + [[t] if t is not None else [] for t in (h0, c0, bias_hh, weight)]
    return [t for group, need in zip(slots, needs, strict=True) if need for t in group]


def _output_grads(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    grad_out: Tensor | None,
    grad_h: Tensor | None,
    grad_c: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The gradients of a layer operator's outputs ``(out, h_n[, c_n])`` as its backward
    operator takes them: zeros where autograd gives none, contiguous."""
    if grad_out is None:
        grad_out = h0.new_zeros(x.shape[0], h0.shape[1])
    grad_h = torch.zeros_like(h0) if grad_h is None else grad_h
    if c0 is None:
        return grad_out.contiguous(), grad_h.contiguous(), None
    grad_c = torch.zeros_like(c0) if grad_c is None else grad_c
    return grad_out.contiguous(), grad_h.contiguous(), grad_c.contiguous()


def _input_grads(
    grads: Sequence[Tensor], inputs: Sequence[Any], needs: Sequence[bool]
) -> list[Any]:
    """A backward operator's ``grads`` (:func:`_layer_wrt` order) put back per input
    ``(x, bias, params, h0, c0, bias_hh, weight)``: a list for the parameters, ``None`` where
    ``needs`` says none or the input is absent."""
    it = iter(grads)
    out: list[Any] = []
    for t, need in zip(inputs, needs, strict=True):
        if isinstance(t, (list, tuple)):
            out.append([next(it) for _ in t] if need else None)
        else:
            out.append(next(it) if need and t is not None else None)
    return out


def _recurrence_function(mode: str) -> Any:
    from .rnn._fused_gru import _GRUSequence, _RNNSequence
    from .rnn.fused import _LSTMSequence

    return {"LSTM": _LSTMSequence, "GRU": _GRUSequence, "RNN": _RNNSequence}[mode]


def _recurrence_args(
    gates: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
) -> tuple[Any, ...]:
    """The arguments :func:`~kcprnn.rnn.fused_sequence` passes to ``mode``'s function for a
    dense recurrent ``weight``."""
    if mode == "LSTM":
        return (gates, h0, c0, bias_hh, reverse, None, True, weight)
    if mode == "GRU":
        return (gates, h0, bias_hh, reverse, None, True, weight)
    return (gates, h0, bias_hh, reverse, relu, None, weight)


@torch.compiler.assume_constant_result
def _kcp_spec(matrix: Any, rows: int, training: bool, prepared: bool) -> tuple[int, ...]:
    """How :func:`compiled_layer` runs a KCP input product over ``rows`` rows by its
    sequential walk, the plan eager runs (``training``: the factors take gradients;
    ``prepared``: autograd is off, :meth:`~kcprnn.formats.KCPMatrix.plan`):
    ``(N, *order, inner, *inner_order)`` (``inner`` -1 for none), or ``()`` where the walk
    does not apply (another format or algorithm, ``P > 1``, ``N = 1``). Evaluated once while
    tracing."""
    from .formats.kcp import KCPMatrix

    if (
        not isinstance(matrix, KCPMatrix)
        or matrix.algorithm == "dense"
        or matrix.terms != 1
        or matrix.num_factors < 2
    ):
        return ()
    plan = matrix._plan(rows, training, prepared, matrix.planning_model())
    if plan.algorithm != "sequential":
        return ()
    inner = -1 if plan.inner is None else plan.inner
    spec = (len(plan.order), *plan.order, inner, *plan.inner_order)
    walk = _kcp_walk(matrix, spec)
    if tuple(step.factor for step in walk.steps) != tuple(plan.order):
        return ()
    if len(_WALKS) >= 256:
        _WALKS.clear()
    _WALKS[(module_key(matrix), *spec)] = walk  # the walk the graph's matrices are built for
    return spec


_WALKS: dict[tuple[int, ...], Any] = {}
"""The walks :func:`_kcp_spec` planned, by module key and spec."""


def _kcp_walk(matrix: Any, spec: Sequence[int]) -> Any:
    """The :class:`~kcprnn.formats.kcp.layout.Walk` that ``spec`` (:func:`_kcp_spec`) names."""
    from .formats.kcp.walk import sequential_setup

    num_n = spec[0]
    order = tuple(spec[1 : 1 + num_n])
    inner = None if spec[1 + num_n] < 0 else spec[1 + num_n]
    inner_order = tuple(spec[2 + num_n :])
    return sequential_setup(
        matrix.in_splits,
        matrix.out_splits,
        matrix.terms,
        order,
        inner,
        inner_order,
        matrix.planning_model(),
    )


def kcp_step_matrices(factors: Sequence[Sequence[Tensor]], spec: Sequence[int]) -> list[Tensor]:
    """The matrices of the sequential walk that ``spec`` (:func:`_kcp_spec`) names, built from
    the factors in plain operators (traced: inductor fuses them), in the walk's step order:
    a factor's dense ``(g, f)`` matrix (``P = 1``), or for the inner last factor its suffix
    ``(k, o, c)`` and, where the cut is not at axis 0, its prefix ``(m, a k)``."""
    from .formats.kcp.sequential import ParallelChunks, kcp_sequential_prepare

    num_n = spec[0]
    order = tuple(spec[1 : 1 + num_n])
    inner = None if spec[1 + num_n] < 0 else spec[1 + num_n]
    dense = kcp_sequential_prepare(factors, order, inner, tuple(spec[2 + num_n :]))
    flat: list[Tensor] = []
    for n in order:
        a = dense[n]
        if isinstance(a, ParallelChunks):
            flat += [a.suffix] if a.prefix is None else [a.suffix, a.prefix]
        else:
            flat.append(a.reshape(-1, a.shape[-1]))  # (g, f): P = 1
    return flat


def _inference_matrices(
    key: int, spec: Sequence[int], factors: Sequence[Tensor], walk: Any, rows: int
) -> Any:
    """The walk's matrices for inference from ``factors`` (in ``parameters()`` order), kept on
    the KCP matrix by spec between calls while the same factor tensors are unchanged (same
    objects, same version counters: an optimizer step or ``load_state_dict`` rebuilds them);
    built by the matrix's own inference cache, so that eager and compiled calls share them."""
    module = _module(key)
    kept_by_spec = module.__dict__.setdefault("_compiled_inference", {})
    kept = kept_by_spec.get(tuple(spec))
    if (
        kept is not None
        and len(kept[0]) == len(factors)
        and all(a is b for a, b in zip(kept[0], factors, strict=True))
        and all(a._version == v for a, v in zip(factors, kept[1], strict=True))
    ):
        return kept[2]
    with _parameters(module, factors) as swapped:
        matrix: Any = swapped  # a KCPMatrix (the key's)
        nested, model, _, _ = matrix._forward_setup()
        plan = matrix._plan(rows, False, True, model)
        steps = matrix._prepared(plan, nested, walk)
    kept_by_spec[tuple(spec)] = (list(factors), [f._version for f in factors], steps)
    return steps


def _kcp_forward(
    x: Tensor,
    bias: Tensor | None,
    mats: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    spec: Sequence[int],
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    zero_state: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """The walk over the rows of ``x`` and the fused recurrence over its output, by their
    eager forwards without autograd: ``(out, final state, kept)``, ``kept`` what
    :func:`_kcp_backward` needs. ``zero_state``: the initial state is zero (the module made
    it), so the LSTM loop need not look."""
    from .formats.kcp.backward import unflatten_matrices
    from .formats.kcp.sequential import run_walk
    from .formats.kcp.walk import chunk_rows

    walk = _WALKS.get((key, *spec))
    if walk is None:
        walk = _kcp_walk(_module(key), spec)
    if any(needs):
        flat: list[Tensor | None] = list(mats)
        if walk.inner and len(flat) == len(walk.steps):
            flat.append(None)  # an inner product cut at axis 0: no prefix
        steps = unflatten_matrices(walk, flat)
    else:  # inference: ``mats`` are the factors
        steps = _inference_matrices(key, spec, mats, walk, x.shape[0])
    b = x.shape[0]
    chunk = chunk_rows(b, x.shape[1], walk.steps, walk.model)
    parts = x.split(chunk) if chunk < b else (x,)
    saved: list[list[Any]] = []
    with torch.no_grad():
        outs = []
        for part in parts:
            saved.append([])
            # without gradients nothing is saved (the walk then reuses its buffers)
            outs.append(run_walk(part, steps, walk, bias, saved[-1] if any(needs) else None))
        if mode == "LSTM" and c0 is not None and x.shape[0] > 0:
            # the walk's output (fresh where it added a bias or was concatenated) is the
            # recurrence's own activation buffer, read time-major through a strided view
            fresh = len(outs) > 1 or (bias is not None and any(needs))
            lstm = _LSTMRun(
                outs[0] if len(outs) == 1 else torch.cat(outs),
                h0,
                c0,
                bias_hh,
                weight,
                reverse,
                batch_major,
                fresh,
                zero_state or None,
            )
            out, h_n, c_n = lstm.hs.view(x.shape[0], -1), lstm.h_n, lstm.c_n
            return out, (h_n, c_n), (walk, steps, [p.shape[0] for p in parts], saved, lstm)
        gates = outs[0] if len(outs) == 1 else torch.cat(outs)  # (n, g)
        if batch_major:  # (b, t, g) rows -> (t, b, g), as the recurrence reads them
            g = gates.shape[1]
            gates = gates.view(h0.shape[0], -1, g).transpose(0, 1).reshape(-1, g)  # (n, g)
        args = _recurrence_args(gates, h0, c0, bias_hh, weight, mode, reverse, relu)
        wanted = {"gates": True, "h0": needs[3], "c0": needs[4], "bias": needs[5]}
        grads_needed = [
            wanted["gates"],
            wanted["h0"],
            *([wanted["c0"]] if mode == "LSTM" else []),
            bias_hh is not None and wanted["bias"],
        ]
        ctx = _Ctx((*grads_needed, *(False,) * (len(args) - len(grads_needed) - 1), needs[6]))
        out, *final = _recurrence_function(mode).forward(ctx, *args)
    return out, tuple(final), (walk, steps, [p.shape[0] for p in parts], saved, ctx)


def _kcp_backward(
    kept: Any,
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    h0: Tensor,
    mode: str,
    batch_major: bool,
    needs: Sequence[bool],
) -> list[Tensor]:
    """The gradients of :func:`_kcp_forward` by the recurrence's and the walk's hand-written
    backwards, for the tensors ``needs`` marks (:func:`_layer_wrt` order)."""
    from .formats.kcp.backward import walk_backward
    from .formats.kcp.sequential import ParallelChunks

    walk, steps, sizes, saved, ctx = kept
    grads = [grad_out, grad_h] + ([grad_c] if grad_c is not None else [])
    with torch.no_grad():
        if isinstance(ctx, _LSTMRun):
            assert grad_c is not None
            found = ctx.backward(grad_out, grad_h, grad_c, needs, row_sum=needs[1])
            dgates = found[0]  # (n, g), in the rows' order
            bias_grad = found.pop()  # the walk's bias: the sum over the rows
        else:
            found = _recurrence_function(mode).backward(ctx, *grads)
            dgates = found[0]  # (n, g), time-major
            if batch_major:
                g = dgates.shape[1]
                dgates = dgates.view(-1, h0.shape[0], g).transpose(0, 1).reshape(-1, g)
            dgates = dgates.contiguous()
            bias_grad = dgates.sum(0) if needs[1] else None
        need_x, need_params = needs[0], needs[2]
        grad_x: list[Tensor] = []
        step_grads: list[Any] = [None] * len(steps)
        offset = 0
        for rows, kept_steps in zip(sizes, saved, strict=True):
            part = dgates[offset : offset + rows]
            offset += rows
            gx, gs = walk_backward(
                part, steps, walk, kept_steps, need_x, [need_params] * len(steps)
            )
            if gx is not None:
                grad_x.append(gx)
            if need_params:
                for t, g_t in enumerate(gs):
                    if step_grads[t] is None:
                        step_grads[t] = g_t
                    elif isinstance(g_t, tuple):
                        step_grads[t] = tuple(
                            None if a is None else a + b_
                            for a, b_ in zip(step_grads[t], g_t, strict=True)
                        )
                    else:
                        step_grads[t] = step_grads[t] + g_t
    out: list[Tensor] = []
    if need_x:
        out.append(grad_x[0] if len(grad_x) == 1 else torch.cat(grad_x))
    if needs[1]:
        out.append(bias_grad)
    if need_params:
        for mat, g_t in zip(steps, step_grads, strict=True):
            if isinstance(mat, ParallelChunks):
                out.append(g_t[0])
                if mat.prefix is not None:
                    out.append(g_t[1])
            else:
                out.append(g_t)
    lstm = mode == "LSTM"
    if needs[3]:
        out.append(found[1])
    if lstm and needs[4]:
        out.append(found[2])
    if needs[5]:
        out.append(found[3 if lstm else 2])
    if needs[6]:
        out.append(found[-1])
    return out


# ``kcprnn::layer_kcp`` and its backward are registered on a plain ``torch.library.Library``
# (a schema, a kernel, a fake kernel, an autograd kernel) rather than through
# ``torch.library.custom_op``, whose wrappers (argument trees, aliasing checks, a dynamo guard
# around the kernel) run at every call of the compiled graph.

_LIB = torch.library.Library("kcprnn", "FRAGMENT")
_KCP_ARGS = (
    "Tensor x, Tensor? bias, Tensor[] mats, Tensor h0, Tensor? c0, Tensor? bias_hh, "
    "Tensor weight, int key, int[] spec, str mode, bool reverse, bool relu, bool batch_major, "
    "bool zero_state, bool[] needs"
)
_LIB.define(f"layer_kcp({_KCP_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define(
    f"layer_kcp_backward(Tensor grad_out, Tensor grad_h, Tensor? grad_c, Tensor token, "
    f"{_KCP_ARGS}) -> Tensor[]"
)


def _layer_kcp(
    x: Tensor,
    bias: Tensor | None,
    mats: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    spec: list[int],
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    zero_state: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, final, kept = _kcp_forward(
        x, bias, mats, h0, c0, bias_hh, weight, key, spec, mode, reverse, relu, batch_major,
        zero_state, needs,
    )  # fmt: skip
    if not any(needs):
        return out, final[0], final[1] if c0 is not None else h0.new_empty(0), _no_token()
    token = _keep_state(kept)
    # a copy: the kept state holds the sequence's outputs, which the caller may change (the
    # compiled graph's outputs do not share the version counter that would catch it)
    out = out.clone()
    return out, final[0], final[1] if c0 is not None else h0.new_empty(0), token


# The fake and backward kernels take the schema's arguments positionally (``args``: ``x`` to
# ``needs``, the order of ``_KCP_ARGS``) and forward them; only the fakes read a few of them.


def _layer_kcp_fake(
    x: Tensor, bias: Any, mats: Any, h0: Tensor, c0: Tensor | None, *args: Any
) -> Any:
    out = x.new_empty(x.shape[0], h0.shape[1])
    c = torch.empty_like(c0) if c0 is not None else h0.new_empty(0)
    return out, torch.empty_like(h0), c, h0.new_empty((), dtype=torch.int64)


def _layer_kcp_backward(
    grad_out: Tensor, grad_h: Tensor, grad_c: Tensor | None, token: Tensor, *args: Any
) -> list[Tensor]:
    kept = _take(token)
    if kept is None:  # none kept: run the forward again
        kept = _kcp_forward(*args)[2]
    h0, mode, batch_major, needs = args[3], args[9], args[12], args[-1]
    return _kcp_backward(kept, grad_out, grad_h, grad_c, h0, mode, batch_major, needs)


def _layer_kcp_backward_fake(
    grad_out: Tensor, grad_h: Tensor, grad_c: Tensor | None, token: Tensor, *args: Any
) -> list[Tensor]:
    x, bias, mats, h0, c0, bias_hh, weight = args[:7]
    wrt = _layer_wrt(x, bias, mats, h0, c0, bias_hh, weight, args[-1])
    return [torch.empty_like(t) for t in wrt]


class _LayerKCP(torch.autograd.Function):
    """``kcprnn::layer_kcp`` under autograd (its autograd kernel): the operator below
    autograd, its gradients by ``kcprnn::layer_kcp_backward``. Arguments: the tensors, the
    options ``(key, spec, mode, reverse, relu, batch_major, zero_state, needs)``, then the
    matrices."""

    @staticmethod
    def forward(ctx, x, bias, h0, c0, bias_hh, weight, options, *mats):
        with torch._C._AutoDispatchBelowAutograd():
            out, h, c, token = torch.ops.kcprnn.layer_kcp.default(
                x, bias, list(mats), h0, c0, bias_hh, weight, *options
            )
        ctx.save_for_backward(x, bias, h0, c0, bias_hh, weight, token, *mats)
        ctx.options = options
        ctx.mark_non_differentiable(token)
        return out, h, c, token

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c, _token_grad):
        x, bias, h0, c0, bias_hh, weight, token, *mats = ctx.saved_tensors
        grads = torch.ops.kcprnn.layer_kcp_backward.default(
            *_output_grads(x, h0, c0, grad_out, grad_h, grad_c),
            token,
            x,
            bias,
            mats,
            h0,
            c0,
            bias_hh,
            weight,
            *ctx.options,
        )
        g = _input_grads(grads, (x, bias, mats, h0, c0, bias_hh, weight), ctx.options[-1])
        grad_mats = g[2] if g[2] is not None else [None] * len(mats)
        return (g[0], g[1], *g[3:], None, *grad_mats)


def _layer_kcp_autograd(
    x: Tensor,
    bias: Tensor | None,
    mats: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    *options: Any,
) -> Any:
    if torch.is_grad_enabled() and torch._C._any_requires_grad(
        x, bias, h0, c0, bias_hh, weight, *mats
    ):
        return _LayerKCP.apply(x, bias, h0, c0, bias_hh, weight, options, *mats)
    if type(x) is Tensor and not any(options[-1]):
        # plain tensors (not traced) that nothing differentiates: the kernel itself, without a
        # second dispatch
        return _layer_kcp(x, bias, mats, h0, c0, bias_hh, weight, *options)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.kcprnn.layer_kcp.default(x, bias, mats, h0, c0, bias_hh, weight, *options)


_LIB.impl("layer_kcp", _layer_kcp, "CompositeExplicitAutograd")
_LIB.impl("layer_kcp", _layer_kcp_autograd, "Autograd")
_LIB.impl("layer_kcp_backward", _layer_kcp_backward, "CompositeExplicitAutograd")
torch.library.register_fake("kcprnn::layer_kcp", _layer_kcp_fake, lib=_LIB)
torch.library.register_fake("kcprnn::layer_kcp_backward", _layer_kcp_backward_fake, lib=_LIB)
