"""The LSTM recurrence that ``kcprnn::layer_kcp`` (:mod:`kcprnn._compile_kcp`) runs inside its
operator, the same numbers as :func:`~kcprnn.rnn.fused_sequence` with a dense ``W_hh``, called
directly without autograd: in float32 on the CPU the same compiled steps
(:mod:`kcprnn._cpu.native_dense`), elsewhere the fused recurrence's torch operations in its
order with every step's views taken once per sequence and the dense recurrent product's kernel
chosen once per sequence; plus the context object through which the other recurrences'
``autograd.Function`` methods are called directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ._cpu import native_rnn
from .rnn import _fused_base
from .rnn._fused_base import _Dense, _fresh, _is_zero
from .rnn.fused import lstm_compiled

__all__: list[str] = []


def _fresh_buffer(like: Tensor, *shape: int) -> Tensor:
    return like.new_empty(shape)


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
    operations as :class:`~kcprnn.rnn.fused._LSTMSequence` (equal results: its compiled steps
    where they run, else its torch operations) without the ``autograd.Function``. The compiled
    steps read the walk's output where it is, batch-major rows through a transposed view, and add
    ``b_hh`` themselves (the ``autograd.Function`` gets the rows reordered by a copy). On torch
    operations the walk's output becomes the loop's activation buffer in one step (batch-major
    rows: one time-major copy with ``b_hh`` added; time-major rows: in place where the walk's
    output is fresh), the products' kernel is chosen once (:class:`_DenseProduct`) and each
    step's views are taken once for the sequence (:func:`_lstm_steps`,
    :func:`_lstm_backward_steps`)."""

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
        zero_h0: bool | None = None,
    ) -> None:
        b = h0.shape[0]
        g = gates.shape[1]
        # (t, b, 4h): batch-major rows read through a transposed view
        rows = gates.view(b, -1, g).transpose(0, 1) if batch_major else gates.view(-1, b, g)
        steps = rows.shape[0]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        self.native = _fused_base._native_ok(weight, rows, h0, c0)
        # h0 zero (checked where the caller does not know): no first product, and no W_hh
        # gradient from h0
        self.zero_h0 = _is_zero(h0) if zero_h0 is None else zero_h0
        if self.native:  # the eager fused recurrence's compiled steps, reading the rows in place
            h0, c0 = h0.contiguous(), c0.contiguous()
            self.prod = _Dense([weight])
            self.acts, self.hs, self.cs, self.tcs, _ = lstm_compiled(
                rows, bias_hh, h0, c0, self.prod, reverse, new=_fresh_buffer, skip=self.zero_h0
            )
        else:  # torch operations activate the rows in place
            if batch_major:  # one time-major copy with the bias added
                view = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
                view = view.copy_(rows) if bias_hh is None else torch.add(rows, bias_hh, out=view)
            elif bias_hh is not None:  # in place where the walk's output is fresh
                view = rows.add_(bias_hh) if fresh else rows + bias_hh
            else:
                view = rows if fresh else rows.clone()
            self.prod = cast(Any, _DenseProduct(weight))  # as a _Dense: its add_ and back
            self.hs, self.cs, self.tcs, self.acts = _lstm_steps(view, h0, c0, self.prod, order)
        self.h0, self.c0, self.reverse, self.batch_major = h0, c0, reverse, batch_major
        self.has_bias = bias_hh is not None
        self.h_n = self.hs[order[-1]].clone()  # (b, h)
        self.c_n = self.cs[order[-1]].clone()  # (b, h)

    def backward(
        self,
        grad_out: Tensor,
        grad_h: Tensor,
        grad_c: Tensor,
        needs: Sequence[bool],
        row_sum: bool = False,
    ) -> list[Any]:
        """``[dgates (n, 4h) in the rows' order, dh0, dc0, d bias_hh, d W_hh, dgates summed
        over the rows]`` (``None`` for those ``needs`` leaves out; the sum where ``row_sum``:
        the gradient of a bias the walk added). On the compiled steps the sum accumulates in the
        step kernel, and the ``W_hh`` gradient from a zero ``h0`` skips the first step's rows
        instead of copying the states before every step."""
        from .rnn._fused_base import _previous, _recurrent_weight_grad

        steps, b, g = self.acts.shape
        hidden = self.hs.shape[2]
        n = steps * b
        dgates = torch.empty_like(self.acts)  # (t, b, 4h)
        grad_hs = grad_out.view(steps, b, hidden)
        want_sum = row_sum or (self.has_bias and needs[5])
        summed = None
        if self.native:
            dh, dc = _fresh(grad_h), _fresh(grad_c)  # (b, h)
            summed = dgates.new_zeros(g) if want_sum else None
            native_rnn.lstm_backward(
                self.acts, self.cs, self.tcs, self.c0, grad_hs.contiguous(), dh, dc, dgates,
                self.reverse, needs[3], self.prod.args_t(), None, summed,
            )  # fmt: skip
        else:
            dh, dc = _lstm_backward_steps(
                self.acts, self.cs, self.tcs, self.c0, grad_hs, grad_h, grad_c, self.prod,
                self.reverse, needs[3], dgates,
            )  # fmt: skip
        flat = dgates.view(n, g)  # (n, 4h), time-major
        if want_sum and summed is None:
            summed = flat.sum(0)
        grad_w = None
        if needs[6] and self.zero_h0 and steps > 1:  # the steps after the first, as they lie
            later, before = (flat[:-b], self.hs[1:]) if self.reverse else (flat[b:], self.hs[:-1])
            grad_w = _recurrent_weight_grad(later, before.reshape(-1, hidden))
        elif needs[6]:
            h_prev = _previous(self.hs, self.h0, self.reverse)  # (t, b, h)
            grad_w = _recurrent_weight_grad(flat, h_prev.view(n, hidden))
        grad_bias = summed if self.has_bias and needs[5] else None
        if self.batch_major:  # the rows' order
            flat = dgates.transpose(0, 1).reshape(n, g)
        return [flat, dh if needs[3] else None, dc, grad_bias, grad_w, summed if row_sum else None]
