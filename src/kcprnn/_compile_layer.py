"""One opaque ``torch.compile`` operator for a whole direction of a recurrent layer.

``kcprnn::layer(x, bias, params, h0, c0, bias_hh, weight, key, ...)`` is the product and the
recurrence of :mod:`kcprnn._compile` in one operator, for a fused direction whose ``W_ih`` is
factorized (:func:`compiled_layer`): the input product over all steps' rows, their reordering to
time-major and the fused sequence. Its backward ``kcprnn::layer_backward`` differentiates the
kept graph once and returns only the gradients that are needed. One operator instead of two
saves a dispatch, a nested ``autograd.grad`` and the graph's kernels between them in each
direction. The graph is kept and recomputed the way :mod:`kcprnn._compile` does for its
operators.

Where ``W_ih`` is a KCP matrix whose product runs the sequential walk (``P = 1``, ``N > 1``,
the walk planned for a static number of rows; :func:`_kcp_spec`), the direction is
``kcprnn::layer_kcp`` instead: the walk's small matrices are built from the factors in the
graph (:func:`kcp_step_matrices`: plain operators, which inductor fuses into a kernel and AOT
autograd differentiates), and the operator calls the walk's and the fused recurrence's own
forward code directly, without autograd (:func:`_kcp_forward`); what their hand-written
backwards need is kept under a token for ``kcprnn::layer_kcp_backward``, which calls them
(:func:`_kcp_backward`; recomputed where none is kept). No fresh leaves, no autograd graph, no
nested ``autograd.grad``. Both operators are registered on a plain ``torch.library.Library``
(their wrappers cost less per call than ``torch.library.custom_op``'s); they are in
:mod:`kcprnn._compile_kcp`, and the LSTM recurrence they run in :mod:`kcprnn._compile_lstm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._compile import (
    _autograd,
    _fresh,
    _keep,
    _module,
    _no_token,
    _parameters,
    _run_fused,
    _same,
    _storages,
    _take,
    module_key,
)
from ._compile_kcp import (
    _input_grads,
    _kcp_spec,
    _layer_wrt,
    _output_grads,
    kcp_step_matrices,
)

if TYPE_CHECKING:
    from .rnn.cells import RNNCellBase

__all__ = ["compiled_layer", "fuses_layer"]


_LAYER_SLOTS = 7  # x, bias, params, h0, c0, bias_hh, weight: the order of ``needs``


def _layer_graph(
    matrix: Any,
    x: Tensor,
    bias: Tensor | None,
    params: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    needs: Sequence[bool],
) -> tuple[list[Tensor], list[Tensor]]:
    """The input product ``matrix(x, bias)`` (rows in batch-major order where ``batch_major``,
    put in time-major order) and the fused sequence over it, under autograd from fresh leaves:
    the outputs ``(out, h_n[, c_n])`` and the leaves ``(x[, bias], *params, h0[, c0][, bias_hh],
    weight)`` (``x`` only where ``needs[0]``), each requiring a gradient where ``needs`` says
    (:data:`_LAYER_SLOTS` order; the parameters all or none)."""
    need_x, need_bias, need_params, need_h0, need_c0, need_bias_hh, need_weight = needs
    with _autograd():
        x_leaf = x.detach().requires_grad_(need_x)
        b_leaf = None if bias is None else bias.detach().requires_grad_(need_bias)
        own = list(matrix.parameters())
        if need_params and all(
            a.requires_grad and _same(a, b) for a, b in zip(own, params, strict=True)
        ):  # the module's own parameters: differentiated where they are (no swap)
            leaves, gates = own, matrix(x_leaf, b_leaf)  # (n, g)
        else:
            leaves = [p.detach().requires_grad_(need_params) for p in params]
            with _parameters(matrix, leaves, swap=True) as m:
                gates = m(x_leaf, b_leaf)  # (n, g)
        if batch_major:  # (b, t, g) rows -> (t, b, g), as the recurrence reads them
            g = gates.shape[1]
            gates = gates.view(h0.shape[0], -1, g).transpose(0, 1).reshape(-1, g)  # (n, g)
        h_leaf = h0.detach().requires_grad_(need_h0)
        c_leaf = None if c0 is None else c0.detach().requires_grad_(need_c0)
        bh_leaf = None if bias_hh is None else bias_hh.detach().requires_grad_(need_bias_hh)
        w_leaf = weight.detach().requires_grad_(need_weight)
        out, final = _run_fused(gates, h_leaf, c_leaf, bh_leaf, w_leaf, mode, reverse, relu)
    wrt = [x_leaf] if need_x else []
    wrt += [t for t in (b_leaf,) if t is not None] + list(leaves) + [h_leaf]
    wrt += [t for t in (c_leaf, bh_leaf) if t is not None] + [w_leaf]
    return [out, *final], wrt


@torch.library.custom_op("kcprnn::layer", mutates_args=())
def _layer(
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    matrix = _module(key)
    if any(needs):
        outs, wrt = _layer_graph(
            matrix,
            x,
            bias,
            params,
            h0,
            c0,
            bias_hh,
            weight,
            mode,
            reverse,
            relu,
            batch_major,
            needs,
        )
        token = _keep(outs, wrt)
        # copies: the kept graph saves the sequence's outputs, which the caller may change
        out, h = (t.detach().clone(memory_format=torch.contiguous_format) for t in outs[:2])
        c = (
            outs[2].detach().clone(memory_format=torch.contiguous_format)
            if c0 is not None
            else h0.new_empty(0)
        )
        return out, h, c, token
    with torch.no_grad(), _parameters(matrix, params) as m:
        gates = m(x, bias)  # (n, g)
        if batch_major:
            g = gates.shape[1]
            gates = gates.view(h0.shape[0], -1, g).transpose(0, 1).reshape(-1, g)  # (n, g)
        out, final = _run_fused(gates, h0, c0, bias_hh, weight, mode, reverse, relu)
    out = _fresh(out, [x, h0, c0, bias, bias_hh, weight, *params])
    c = final[1].clone() if c0 is not None else h0.new_empty(0)
    return out, final[0].clone(), c, _no_token()


@_layer.register_fake
def _layer_fake(
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = x.new_empty(x.shape[0], h0.shape[1])
    c = torch.empty_like(c0) if c0 is not None else h0.new_empty(0)
    return out, torch.empty_like(h0), c, h0.new_empty((), dtype=torch.int64)


@torch.library.custom_op("kcprnn::layer_backward", mutates_args=())
def _layer_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    needs: list[bool],
) -> list[Tensor]:
    kept = _take(token)
    if kept is None:  # no graph kept: run the layer again under autograd
        kept = _layer_graph(
            _module(key),
            x,
            bias,
            params,
            h0,
            c0,
            bias_hh,
            weight,
            mode,
            reverse,
            relu,
            batch_major,
            needs,
        )
    outs, wrt = kept
    grads = [grad_out, grad_h] + ([grad_c] if grad_c is not None else [])
    chosen = [w for w in wrt if w.requires_grad]  # the leaves ``needs`` marks, in order
    with _autograd():
        found = torch.autograd.grad(outs[: len(grads)], chosen, grads, allow_unused=True)
    storages = _storages([grad_out, grad_h, grad_c, x, bias, h0, c0, bias_hh, weight, *params])
    return [
        torch.zeros_like(w) if g is None else _fresh(g, storages)
        for g, w in zip(found, chosen, strict=True)
    ]


@_layer_backward.register_fake
def _layer_backward_fake(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    h0: Tensor,
    c0: Tensor | None,
    bias_hh: Tensor | None,
    weight: Tensor,
    key: int,
    mode: str,
    reverse: bool,
    relu: bool,
    batch_major: bool,
    needs: list[bool],
) -> list[Tensor]:
    wrt = _layer_wrt(x, bias, params, h0, c0, bias_hh, weight, needs)
    return [torch.empty_like(t) for t in wrt]


def _layer_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, bias, params, h0, c0, bias_hh, weight, key, *options = inputs
    # the inputs are kept alive (and unchanged) for the backward: the kept graph reads them
    ctx.save_for_backward(x, bias, h0, c0, bias_hh, weight, output[3], *params)
    ctx.key, ctx.options = key, options


def _layer_grad(
    ctx: Any, grad_out: Tensor, grad_h: Tensor, grad_c: Tensor, _token_grad: Any
) -> tuple:
    x, bias, h0, c0, bias_hh, weight, token, *params = ctx.saved_tensors
    grads = _layer_backward(
        *_output_grads(x, h0, c0, grad_out, grad_h, grad_c),
        token,
        x,
        bias,
        params,
        h0,
        c0,
        bias_hh,
        weight,
        ctx.key,
        *ctx.options,
    )
    out = _input_grads(grads, (x, bias, params, h0, c0, bias_hh, weight), ctx.options[-1])
    return (*out, *(None,) * 6)


_layer.register_autograd(_layer_grad, setup_context=_layer_setup)


def fuses_layer(cell: RNNCellBase, route: str) -> bool:
    """Whether :func:`compiled_layer` runs a direction of a layer on ``route`` while compiled:
    the fused recurrence (``"dense"``) over a factorized input product (a dense ``W_ih`` stays
    a graph operator)."""
    return (
        route == "dense"
        and not torch.compiler.is_exporting()
        and cell.weight_ih.format_name != "dense"
    )


def compiled_layer(
    cell: RNNCellBase,
    layer_input: Tensor,
    bias: Tensor | None,
    state: tuple[Tensor, ...],
    reverse: bool,
    batch_major: bool,
    bias_included: bool,
    zero_state: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One direction of one layer as one ``kcprnn::layer`` node (under ``torch.compile``, where
    :func:`fuses_layer`): the input product ``cell.weight_ih(layer_input, bias)`` over all
    steps' rows and the fused recurrence over it, with ``W_hh`` rebuilt dense in the graph.

    ``layer_input`` is ``(t, b, i)``, ``(b, t, i)`` (``batch_major``) or ``(n, i)`` rows in
    time-major order; ``bias_included`` says that ``bias`` holds ``b_hh`` (as for
    :func:`~kcprnn.rnn.run_layer`); ``zero_state`` that ``state`` is zeros the module made (no
    initial state given). Returns ``(out (n, h), (h_n[, c_n]))``, ``out`` in time-major
    order."""
    from .rnn.kron import rebuild

    matrix = cell.weight_ih
    rows = layer_input.reshape(-1, matrix.in_features)  # (n, i)
    params = list(matrix.parameters())
    c0 = state[1] if cell.mode == "LSTM" else None
    bias_hh = None if bias_included and cell.mode != "GRU" else cell.bias_hh
    weight = rebuild(cell.weight_hh)  # (g, h)
    grad = torch.is_grad_enabled()
    needs = [
        grad and t is not None and t.requires_grad
        for t in (rows, bias, None, state[0], c0, bias_hh, weight)
    ]
    needs[2] = grad and any(p.requires_grad for p in params)
    relu = getattr(cell, "nonlinearity", "tanh") == "relu"
    key = module_key(matrix)
    spec: tuple[int, ...] = ()
    if isinstance(rows.shape[0], int):
        spec = _kcp_spec(matrix, rows.shape[0], needs[2], not torch.is_grad_enabled())
    if spec:  # a KCP walk: its matrices built in the graph, the rest by the eager code
        kcp: Any = matrix  # a KCPMatrix (_kcp_spec)
        # training: the walk's matrices built in the graph (AOT autograd differentiates them);
        # inference: the factors, the operator uses the matrices the KCP matrix keeps
        mats = kcp_step_matrices(kcp._factor_list(), spec) if any(needs) else params
        out, h, c, _ = torch.ops.kcprnn.layer_kcp.default(
            rows,
            bias,
            mats,
            state[0],
            c0,
            bias_hh,
            weight,
            key,
            list(spec),
            cell.mode,
            reverse,
            relu,
            batch_major,
            zero_state,
            needs,
        )
        return out, ((h, c) if cell.mode == "LSTM" else (h,))
    out, h, c, _ = _layer(
        rows,
        bias,
        params,
        state[0],
        c0,
        bias_hh,
        weight,
        key,
        cell.mode,
        reverse,
        relu,
        batch_major,
        needs,
    )
    return out, ((h, c) if cell.mode == "LSTM" else (h,))
