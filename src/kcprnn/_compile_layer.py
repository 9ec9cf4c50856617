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
(their wrappers cost less per call than ``torch.library.custom_op``'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ._compile import (
    _autograd,
    _fresh,
    _keep,
    _keep_state,
    _module,
    _no_token,
    _parameters,
    _run_fused,
    _same,
    _storages,
    _take,
    module_key,
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
    """The tensors :func:`_layer_backward` returns gradients for, in its order: those that
    ``needs`` marks (:data:`_LAYER_SLOTS` order) and are given."""
    slots: list[list[Tensor]] = [[t] if t is not None else [] for t in (x, bias)]
    slots += [list(params)] + [[t] if t is not None else [] for t in (h0, c0, bias_hh, weight)]
    return [t for group, need in zip(slots, needs, strict=True) if need for t in group]


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
    needs = ctx.options[-1]
    if grad_out is None:
        grad_out = h0.new_zeros(x.shape[0], h0.shape[1])
    grad_h = torch.zeros_like(h0) if grad_h is None else grad_h
    if c0 is not None:
        grad_c = torch.zeros_like(c0) if grad_c is None else grad_c
    grads = iter(
        _layer_backward(
            grad_out.contiguous(),
            grad_h.contiguous(),
            grad_c.contiguous() if c0 is not None else None,
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
    )
    out: list[Any] = []
    for t, need in zip((x, bias, params, h0, c0, bias_hh, weight), needs, strict=True):
        if isinstance(t, list):
            out.append([next(grads) for _ in t] if need else None)
        else:
            out.append(next(grads) if need and t is not None else None)
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
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One direction of one layer as one ``kcprnn::layer`` node (under ``torch.compile``, where
    :func:`fuses_layer`): the input product ``cell.weight_ih(layer_input, bias)`` over all
    steps' rows and the fused recurrence over it, with ``W_hh`` rebuilt dense in the graph.

    ``layer_input`` is ``(t, b, i)``, ``(b, t, i)`` (``batch_major``) or ``(n, i)`` rows in
    time-major order; ``bias_included`` says that ``bias`` holds ``b_hh`` (as for
    :func:`~kcprnn.rnn.run_layer`). Returns ``(out (n, h), (h_n[, c_n]))``, ``out`` in
    time-major order."""
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
        mats = kcp_step_matrices(kcp._factor_list(), spec)
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


# --- the KCP fast path: the eager product's and recurrence's own code, no autograd graph ----


class _Ctx:
    """What the fused recurrences' ``autograd.Function`` methods read and write of their
    context, for calling them directly (:func:`_kcp_forward`, :func:`_kcp_backward`)."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[Tensor, ...] = ()

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors


class _DenseProduct:
    """The dense recurrent products of :class:`~kcprnn.rnn._fused_base._Dense` (``add_``,
    ``back``) by :func:`~kcprnn._cpu.ops.linear_nt`'s own kernel choice, made once for the
    whole sequence instead of at every step."""

    def __init__(self, weight: Tensor) -> None:
        from ._cpu.ops import _ONEDNN_LINEAR, _onednn_fits

        self.weight, self.weight_t = weight, weight.t()  # (g, h), (h, g)
        self.onednn = _ONEDNN_LINEAR if _onednn_fits(weight[:, :1], weight) else None

    def add_(self, out: Tensor, h: Tensor) -> Tensor:
        """``out += h @ W.T`` in place; ``out`` ``(b, g)``."""
        if self.onednn is not None and h.shape[1] > 0:
            return out.add_(self.onednn(h, self.weight, None, "none", [], ""))
        return out.add_(h.mm(self.weight_t))

    def back(self, d: Tensor) -> Tensor:
        """``d @ W``: ``(b, g) -> (b, h)``."""
        if self.onednn is not None and d.shape[1] > 0:
            return self.onednn(d, self.weight_t, None, "none", [], "")
        return d.mm(self.weight)


def _lstm_steps(
    gates: Tensor, h: Tensor, c: Tensor, prod: Any, order: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~kcprnn.rnn.fused._lstm_forward`'s operations in its order (the same numbers),
    with every step's views of the buffers taken once for the whole sequence (``unbind``)
    instead of indexed at each step."""
    from .rnn._fused_base import _is_zero

    steps, b, four_h = gates.shape
    hidden = four_h // 4
    hs = gates.new_empty(steps, b, hidden)  # (t, b, h)
    cs, tcs = torch.empty_like(hs), torch.empty_like(hs)  # (t, b, h): c, tanh(c)
    rows = gates.unbind(0)  # t x (b, 4h)
    i_f = gates[..., : 2 * hidden].unbind(0)
    i_g, f_g, g_g, o_g = (gates[..., k * hidden : (k + 1) * hidden].unbind(0) for k in range(4))
    h_t, c_t, tc_t = hs.unbind(0), cs.unbind(0), tcs.unbind(0)
    skip = _is_zero(h)  # the usual zero initial state: no first recurrent product
    for t in order:
        if not skip:
            prod.add_(rows[t], h)
        skip = False
        i_f[t].sigmoid_()
        g_g[t].tanh_()
        o_g[t].sigmoid_()
        c = torch.mul(f_g[t], c, out=c_t[t]).addcmul_(i_g[t], g_g[t])  # (b, h)
        h = torch.mul(o_g[t], torch.tanh(c, out=tc_t[t]), out=h_t[t])  # (b, h)
    return hs, cs, tcs, gates


def _lstm_backward_steps(
    acts: Tensor,
    cs: Tensor,
    tc: Tensor,
    c0: Tensor,
    grad_hs: Tensor,
    grad_hn: Tensor,
    grad_cn: Tensor,
    prod: Any,
    reverse: bool,
    need_h0: bool,
    dgates: Tensor,
) -> tuple[Tensor, Tensor]:
    """The torch-op backward through time of :class:`~kcprnn.rnn.fused._LSTMSequence`
    (its operations in its order: the same numbers) from what :func:`_lstm_steps` kept and the
    outputs' gradients (``grad_hs`` ``(t, b, h)``, ``grad_hn``, ``grad_cn`` ``(b, h)``), with
    every step's views taken once (``unbind``): writes the pre-activation gradients into the
    contiguous ``dgates`` ``(t, b, 4h)`` and returns the gradients of ``h0`` (when
    ``need_h0``) and ``c0``."""
    from .rnn._fused_base import _previous

    steps, b, four_h = acts.shape
    hidden = four_h // 4
    c_prev = _previous(cs, c0, reverse)  # (t, b, h)
    i, f, gg, o = acts.chunk(4, dim=2)  # 4 x (t, b, h)
    o_dtc = torch.addcmul(o, o * tc, tc, value=-1)  # (t, b, h): d c / d h via o tanh(c)
    by_dc = torch.stack([gg, c_prev, i], dim=2)  # (t, b, 3, h)
    deriv = torch.addcmul(acts, acts, acts, value=-1)  # (t, b, 4h): sigmoid'
    torch.mul(gg, gg, out=deriv[..., 2 * hidden : 3 * hidden]).neg_().add_(1)  # tanh'
    dh, dc = grad_hn.clone(), grad_cn.clone()  # (b, h)
    d_t = dgates.unbind(0)  # t x (b, 4h)
    d_o = dgates[..., 3 * hidden :].unbind(0)
    d_ifg = dgates[..., : 3 * hidden].view(steps, b, 3, hidden).unbind(0)
    g_hs, odtc_t, tc_t = grad_hs.unbind(0), o_dtc.unbind(0), tc.unbind(0)
    by_t, deriv_t, f_t = by_dc.unbind(0), deriv.unbind(0), f.unbind(0)
    dc_col = dc[:, None]  # (b, 1, h): dc, updated in place
    order = range(steps) if reverse else range(steps - 1, -1, -1)
    for t in order:
        dh += g_hs[t]
        dc.addcmul_(dh, odtc_t[t])
        torch.mul(dh, tc_t[t], out=d_o[t])  # d o
        torch.mul(dc_col, by_t[t], out=d_ifg[t])  # d i, d f, d g
        d_t[t].mul_(deriv_t[t])  # pre-activation gradients
        dc.mul_(f_t[t])
        if t != order[-1] or need_h0:  # the first step's only for h0
            dh = prod.back(d_t[t])  # (b, h)
    return dh, dc


class _LSTMRun:
    """The dense-``W_hh`` LSTM recurrence of :func:`_kcp_forward` and its backward, the same
    operations as :class:`~kcprnn.rnn.fused._LSTMSequence` (equal results) without the
    ``autograd.Function``: the walk's output becomes the loop's activation buffer in one
    step (batch-major rows: one time-major copy with ``b_hh`` added; time-major rows: in place
    where the walk's output is fresh, where the ``autograd.Function`` reorders and then copies
    again), the products' kernel is chosen once (:class:`_DenseProduct`) and each step's views
    are taken once for the sequence (:func:`_lstm_steps`, :func:`_lstm_backward_steps`)."""

    def __init__(
        self,
        gates: Tensor,
        h0: Tensor,
        c0: Tensor,
        bias_hh: Tensor | None,
        weight: Tensor,
        reverse: bool,
        batch_major: bool,
        fresh: bool,
    ) -> None:
        b = h0.shape[0]
        g = gates.shape[1]
        if batch_major:  # (b, t, 4h) rows -> (t, b, 4h), one copy with the bias added
            rows = gates.view(b, -1, g).transpose(0, 1)
            view = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
            view = view.copy_(rows) if bias_hh is None else torch.add(rows, bias_hh, out=view)
        else:  # (t, b, 4h), in place where the walk's output is fresh
            view = gates.view(-1, b, g)
            if bias_hh is not None:
                view = view.add_(bias_hh) if fresh else view + bias_hh
            elif not fresh:
                view = view.clone()
        steps = view.shape[0]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        self.prod = cast(Any, _DenseProduct(weight))  # as a _Dense: its add_ and back
        self.hs, self.cs, self.tcs, self.acts = _lstm_steps(view, h0, c0, self.prod, order)
        self.h0, self.c0, self.reverse, self.batch_major = h0, c0, reverse, batch_major
        self.has_bias = bias_hh is not None
        self.h_n = self.hs[order[-1]].clone()  # (b, h)
        self.c_n = self.cs[order[-1]].clone()  # (b, h)

    def backward(
        self, grad_out: Tensor, grad_h: Tensor, grad_c: Tensor, needs: Sequence[bool]
    ) -> list[Any]:
        """``[dgates (n, 4h) in the rows' order, dh0, dc0, d bias_hh, d W_hh]`` (``None``
        for those ``needs`` leaves out)."""
        from .rnn._fused_base import _previous, _recurrent_weight_grad

        steps, b, g = self.acts.shape
        hidden = self.hs.shape[2]
        n = steps * b
        dgates = torch.empty_like(self.acts)  # (t, b, 4h)
        dh, dc = _lstm_backward_steps(
            self.acts,
            self.cs,
            self.tcs,
            self.c0,
            grad_out.view(steps, b, hidden),
            grad_h,
            grad_c,
            self.prod,
            self.reverse,
            needs[3],
            dgates,
        )
        flat = dgates.view(n, g)  # (n, 4h), time-major
        grad_w = None
        if needs[6]:
            h_prev = _previous(self.hs, self.h0, self.reverse)  # (t, b, h)
            grad_w = _recurrent_weight_grad(flat, h_prev.view(n, hidden))
        grad_bias = flat.sum(0) if self.has_bias and needs[5] else None
        if self.batch_major:  # the rows' order
            flat = dgates.transpose(0, 1).reshape(n, g)
        return [flat, dh if needs[3] else None, dc, grad_bias, grad_w]


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
        return (gates, h0, c0, bias_hh, reverse, None, weight)
    if mode == "GRU":
        return (gates, h0, bias_hh, reverse, None, weight)
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
    needs: Sequence[bool],
) -> tuple[Tensor, tuple[Tensor, ...], Any]:
    """The walk over the rows of ``x`` and the fused recurrence over its output, by their
    eager forwards without autograd: ``(out, final state, kept)``, ``kept`` what
    :func:`_kcp_backward` needs."""
    from .formats.kcp.backward import unflatten_matrices
    from .formats.kcp.sequential import run_walk
    from .formats.kcp.walk import chunk_rows

    walk = _WALKS.get((key, *spec))
    if walk is None:
        walk = _kcp_walk(_module(key), spec)
    flat: list[Tensor | None] = list(mats)
    if walk.inner and len(flat) == len(walk.steps):
        flat.append(None)  # an inner product cut at axis 0: no prefix
    steps = unflatten_matrices(walk, flat)
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
            found = ctx.backward(grad_out, grad_h, grad_c, needs)
            dgates = found[0]  # (n, g), in the rows' order
        else:
            found = _recurrence_function(mode).backward(ctx, *grads)
            dgates = found[0]  # (n, g), time-major
            if batch_major:
                g = dgates.shape[1]
                dgates = dgates.view(-1, h0.shape[0], g).transpose(0, 1).reshape(-1, g)
            dgates = dgates.contiguous()
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
        out.append(dgates.sum(0))
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
    "bool[] needs"
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
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, final, kept = _kcp_forward(
        x, bias, mats, h0, c0, bias_hh, weight, key, spec, mode, reverse, relu, batch_major, needs
    )
    if not any(needs):
        return out, final[0], final[1] if c0 is not None else h0.new_empty(0), _no_token()
    token = _keep_state(kept)
    # a copy: the kept state holds the sequence's outputs, which the caller may change (the
    # compiled graph's outputs do not share the version counter that would catch it)
    out = out.clone()
    return out, final[0], final[1] if c0 is not None else h0.new_empty(0), token


def _layer_kcp_fake(
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
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = x.new_empty(x.shape[0], h0.shape[1])
    c = torch.empty_like(c0) if c0 is not None else h0.new_empty(0)
    return out, torch.empty_like(h0), c, h0.new_empty((), dtype=torch.int64)


def _layer_kcp_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
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
    needs: list[bool],
) -> list[Tensor]:
    kept = _take(token)
    if kept is None:  # none kept: run the forward again
        kept = _kcp_forward(
            x,
            bias,
            mats,
            h0,
            c0,
            bias_hh,
            weight,
            key,
            spec,
            mode,
            reverse,
            relu,
            batch_major,
            needs,
        )[2]
    return _kcp_backward(kept, grad_out, grad_h, grad_c, h0, mode, batch_major, needs)


def _layer_kcp_backward_fake(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
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
    needs: list[bool],
) -> list[Tensor]:
    wrt = _layer_wrt(x, bias, mats, h0, c0, bias_hh, weight, needs)
    return [torch.empty_like(t) for t in wrt]


class _LayerKCP(torch.autograd.Function):
    """``kcprnn::layer_kcp`` under autograd (its autograd kernel): the operator below
    autograd, its gradients by ``kcprnn::layer_kcp_backward``. Arguments: the tensors, the
    options ``(key, spec, mode, reverse, relu, batch_major, needs)``, then the matrices."""

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
        needs = ctx.options[-1]
        if grad_out is None:
            grad_out = h0.new_zeros(x.shape[0], h0.shape[1])
        grad_h = torch.zeros_like(h0) if grad_h is None else grad_h
        if c0 is not None:
            grad_c = torch.zeros_like(c0) if grad_c is None else grad_c
        grads = iter(
            torch.ops.kcprnn.layer_kcp_backward.default(
                grad_out.contiguous(),
                grad_h.contiguous(),
                grad_c.contiguous() if c0 is not None else None,
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
        )
        single = [
            next(grads) if need and t is not None else None
            for t, need in zip((x, bias), needs[:2], strict=True)
        ]
        grad_mats = [next(grads) for _ in mats] if needs[2] else [None] * len(mats)
        rest = [
            next(grads) if need and t is not None else None
            for t, need in zip((h0, c0, bias_hh, weight), needs[3:], strict=True)
        ]
        return (*single, *rest, None, *grad_mats)


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
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.kcprnn.layer_kcp.default(x, bias, mats, h0, c0, bias_hh, weight, *options)


_LIB.impl("layer_kcp", _layer_kcp, "CompositeExplicitAutograd")
_LIB.impl("layer_kcp", _layer_kcp_autograd, "Autograd")
_LIB.impl("layer_kcp_backward", _layer_kcp_backward, "CompositeExplicitAutograd")
torch.library.register_fake("kcprnn::layer_kcp", _layer_kcp_fake, lib=_LIB)
torch.library.register_fake("kcprnn::layer_kcp_backward", _layer_kcp_backward_fake, lib=_LIB)
