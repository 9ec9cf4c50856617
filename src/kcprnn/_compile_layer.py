"""A direction of a recurrent layer whose ``W_ih`` runs the KCP walk, compiled as one opaque
``torch.compile`` operator.

Under ``torch.compile`` a recurrent module is one ``kcprnn::rnn`` (:mod:`kcprnn._compile_module`)
unless eager runs every one of its layers as a KCP input product by its sequential walk into the
fused dense loop (``P = 1``, ``N > 1``, the walk planned for a static number of rows; the
paper's video layer). Then each direction is ``kcprnn::layer_kcp`` (:mod:`kcprnn._compile_kcp`):
the walk's small matrices are built from the factors in the graph (:func:`kcp_step_matrices`:
plain operators, which inductor fuses into a kernel and AOT autograd differentiates), and the
operator calls the walk's and the fused recurrence's own forward code directly, without
autograd; what their hand-written backwards need is kept under a token for
``kcprnn::layer_kcp_backward``, which calls them (recomputed where none is kept). No fresh
leaves, no autograd graph, no nested ``autograd.grad``. The LSTM recurrence it runs is in
:mod:`kcprnn._compile_lstm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._compile import module_key
from ._compile_kcp import _kcp_spec, kcp_step_matrices

if TYPE_CHECKING:
    from .rnn.cells import RNNCellBase

__all__ = ["compiled_layer", "fuses_layer"]


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
    """One direction of one layer as one ``kcprnn::layer_kcp`` node (under ``torch.compile``,
    in a module whose every layer eager runs so:
    :func:`~kcprnn._compile_module.walks_every_layer`): the input product
    ``cell.weight_ih(layer_input, bias)`` by the KCP walk over all steps' rows and the fused
    recurrence over it, with ``W_hh`` rebuilt dense in the graph.

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
    spec = _kcp_spec(matrix, rows.shape[0], needs[2], not torch.is_grad_enabled())
    if not spec:
        raise RuntimeError(
            f"compiled_layer: the {cell.mode} direction's W_ih does not run the KCP walk over "
            f"{rows.shape[0]} rows (kcprnn._compile_module.walks_every_layer decides)"
        )
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
