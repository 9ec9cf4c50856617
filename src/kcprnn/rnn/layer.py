"""One direction of one recurrent layer over time, on input projections computed beforehand.

:func:`scan` steps any cell through time in packed layout (sequences of different lengths);
:func:`run_layer` runs the fused :func:`~kcprnn.rnn.fused_sequence` (dense or structured
``W_hh``) where it applies and :func:`scan` elsewhere.

Shape comments: ``n`` rows of all steps (``t*b`` or the packed total), ``b`` batch, ``g`` gate
rows (``G*h``), ``p`` output size (``proj_size`` or ``h``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compile import compiled_recurrence
from ._cell_step import dense_weights
from .cells import RNNCellBase
from .fused import fused_sequence
from .kron import kron_terms, rebuild
from .plan import dense_weight, kron_layout_cached
from .steps import State, gru_step, lstm_step, rnn_step

__all__ = ["check_batch_sizes", "run_layer", "scan", "torch_layer"]


def scan(
    step: Callable[[Tensor, State], State],
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """Run ``step`` over time on precomputed input projections, in packed layout.

    Args:
        step: ``(gates_x_t (b_t, g), state) -> state``; ``state[0]`` is the step's output.
        gates_x: input projections of all steps, time-major packed rows ``(n, g)``: the
            ``batch_sizes[0]`` rows of step 0, then the ``batch_sizes[1]`` rows of step 1, ...
        batch_sizes: non-increasing active batch sizes per step (all equal for padded input).
        state: initial state, tensors of ``batch_sizes[0]`` rows.
        reverse: run from the last step to the first (backward direction); each sequence then
            starts from its own last step.

    Returns:
        ``(outputs, final)``: ``state[0]`` of every step in the same packed layout ``(n, p)``,
        and the final state of every sequence (after its own last step), ``batch_sizes[0]`` rows.
    """
    outputs: list[Tensor] = []
    if not reverse:
        finished: list[State] = []
        offset = 0
        for b in batch_sizes:
            if b < state[0].shape[0]:  # the sequences at rows >= b have ended
                finished.append(tuple(s[b:] for s in state))
                state = tuple(s[:b] for s in state)  # (b, .)
            state = step(gates_x[offset : offset + b], state)  # (b, .)
            outputs.append(state[0])
            offset += b
        finished.append(state)
        final = tuple(
            torch.cat(parts[::-1], dim=0) for parts in zip(*finished, strict=True)
        )  # (b0, .)
        return torch.cat(outputs, dim=0), final  # (n, p)
    initial = state
    offset = gates_x.shape[0]
    state = tuple(s[: batch_sizes[-1]] for s in initial)
    for b in reversed(batch_sizes):
        have = state[0].shape[0]
        if b > have:  # sequences at rows have..b start here, from their initial state
            state = tuple(
                torch.cat([s, s0[have:b]], dim=0) for s, s0 in zip(state, initial, strict=True)
            )  # (b, .)
        offset -= b
        state = step(gates_x[offset : offset + b], state)  # (b, .)
        outputs.append(state[0])
    return torch.cat(outputs[::-1], dim=0), state  # (n, p)


def run_layer(
    cell: RNNCellBase,
    gates_x: Tensor,
    batch_sizes: Sequence[int],
    state: State,
    reverse: bool = False,
    route: str = "dense",
    bias_included: bool = False,
    loop_bias: Tensor | None = None,
) -> tuple[Tensor, State]:
    """One direction of one layer over precomputed input projections, as :func:`scan`.

    With sequences of equal length and no LSTM projection, ``route`` ``"dense"`` runs
    :func:`~kcprnn.rnn.fused_sequence` with ``W_hh`` dense (rebuilt once if factorized),
    ``"structured"`` the same with ``W_hh`` multiplied as a Kronecker sum where it is one (KCP,
    CP; :mod:`kcprnn.rnn.kron`); both have a hand-written backward through time. Under
    ``torch.compile`` both run the fused loop with ``W_hh`` rebuilt dense as one opaque
    ``kcprnn::recurrence`` node (:mod:`kcprnn._compile`); under ``torch.export`` every layer
    steps through :func:`scan` in plain operators (unrolled over the example's steps).
    Everything else and ``route="steps"`` step through :func:`scan` with autograd.
    ``bias_included``: ``gates_x`` already holds ``b_hh`` (for a fused LSTM or Elman layer,
    which then adds none; an error where the layer would step through :func:`scan`).
    ``loop_bias``: the bias a fused LSTM or Elman loop adds instead of ``b_hh`` as it reads
    each step's projections (``b_ih + b_hh`` where ``gates_x`` holds neither: adding it there
    costs nothing, while a product with a bias first copies the bias into every gate row); the
    same error where the layer would step through :func:`scan`.
    """
    if torch.compiler.is_exporting():
        step = _exported_step(cell, bias_included)
        if len(set(batch_sizes)) == 1:  # any number of steps: one scan operator
            return _exported_scan(step, gates_x, state, reverse)
        return scan(step, gates_x, batch_sizes, state, reverse=reverse)
    hh = cell.weight_hh
    if route in ("dense", "structured") and len(set(batch_sizes)) == 1 and cell.weight_hr is None:
        nonlinearity = getattr(cell, "nonlinearity", "tanh")
        bias: Tensor | None = None if bias_included and cell.mode != "GRU" else cell.bias_hh
        if loop_bias is not None and cell.mode != "GRU":
            bias = loop_bias  # (g,)
        if torch.compiler.is_compiling():  # one opaque node, W_hh rebuilt in the graph
            return compiled_recurrence(
                cell.mode, gates_x, state, rebuild(hh), bias, reverse, nonlinearity
            )
        kron = kron_layout_cached(hh) if route == "structured" else None
        if kron is not None:
            # the factor matrices, kept between calls without gradients
            mats, layout = cell._kept_weight("kron_hh", kron_terms, hh, kron[0])  # type: ignore[misc]
            return fused_sequence(
                cell.mode, gates_x, state, mats, bias, reverse, layout, nonlinearity
            )
        # (g, p): the parameter itself for a dense matrix; kept without gradients
        weight = cell._kept_weight("dense_hh", dense_weight, hh)
        return fused_sequence(
            cell.mode, gates_x, state, [weight], bias, reverse, None, nonlinearity
        )
    if bias_included or loop_bias is not None:
        raise ValueError(
            f"run_layer: bias_included=True or a loop_bias needs a fused {cell.mode} layer "
            f"(equal lengths, no projection, route 'dense' or 'structured'), got route={route!r}"
        )
    return scan(cell.step, gates_x, batch_sizes, state, reverse=reverse)


def _exported_step(cell: RNNCellBase, bias_included: bool) -> Callable[[Tensor, State], State]:
    """``cell.step`` in plain operators for ``torch.export``: ``W_hh`` (and ``W_hr``) rebuilt
    once from the factors (``to_dense``: plain reshapes, so an exported program stores the
    factors), ``b_hh`` left out where ``gates_x`` already holds it."""
    mode = cell.mode
    bias = None if bias_included and mode != "GRU" else cell.bias_hh
    w_hh = cell.weight_hh.to_dense()  # (g, p)

    def hh(h: Tensor) -> Tensor:
        return F.linear(h, w_hh)  # (b, g)

    if mode == "LSTM":
        hr = None
        if cell.weight_hr is not None:
            w_hr = cell.weight_hr.to_dense()  # (p, h)

            def hr(h: Tensor) -> Tensor:
                return F.linear(h, w_hr)  # (b, p)

        return lambda g, s: lstm_step(g, s[0], s[1], hh, bias, hr)
    if mode == "GRU":
        return lambda g, s: (gru_step(g, s[0], hh, bias),)
    nonlinearity = getattr(cell, "nonlinearity", "tanh")
    return lambda g, s: (rnn_step(g, s[0], hh, bias, nonlinearity),)


def _exported_scan(
    step: Callable[[Tensor, State], State], gates_x: Tensor, state: State, reverse: bool
) -> tuple[Tensor, State]:
    """:func:`scan` over equal-length sequences as torch's ``scan`` operator (an ONNX
    ``Scan``), so that an exported program takes any number of steps."""
    from torch._higher_order_ops.scan import scan as scan_op

    b = state[0].shape[0]
    # a tensor of its own, not a view: torch compiles ``combine`` once per process and guards
    # on its input's base, and an export whose input is not a view then fails that guard's
    # check with an AttributeError instead of compiling anew (torch 2.13)
    xs = gates_x.reshape(-1, b, gates_x.shape[-1]).clone()  # (t, b, g)

    def combine(carry: list[Tensor], g: Tensor) -> tuple[list[Tensor], Tensor]:
        new = step(g, tuple(carry))
        return list(new), new[0].clone()

    final, outs = scan_op(combine, list(state), xs, reverse=reverse)  # outs (t, b, p)
    return outs.reshape(-1, outs.shape[-1]), tuple(final)  # (n, p)


def torch_layer(
    cells: Sequence[RNNCellBase],
    x: Tensor,
    batch_sizes: Tensor | None,
    state: State,
) -> tuple[Tensor, State]:
    """One layer, all its directions (``cells``: forward, then reverse), through torch's own
    fused recurrence (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``) on
    the weights rebuilt dense (:func:`~kcprnn.rnn.plan.dense_weight`: the parameters
    themselves for dense matrices; gradients reach the factors through the rebuild; without
    gradients the cells keep their rebuilt weights between calls until a parameter changes).

    Args:
        x: time-major input ``(t, b, i)``, or the rows of a packed sequence ``(n, i)`` with its
            ``batch_sizes``.
        state: initial state tensors ``(d, b, s)`` (``d`` directions).

    Returns:
        ``(output, final state)``: ``(t, b, d*p)`` or ``(n, d*p)``, and tensors ``(d, b, s)``.
    """
    cell = cells[0]
    params: list[Tensor] = []
    for c in cells:
        # rebuilt every call under autograd; without it kept until a parameter changes
        params += dense_weights(c)
        if c.bias_ih is not None and c.bias_hh is not None:
            params += [c.bias_ih, c.bias_hh]
        if c.weight_hr is not None:
            params.append(dense_weight(c.weight_hr))
    mode = cell.mode
    if mode == "RNN":
        mode = "RNN_RELU" if getattr(cell, "nonlinearity", "tanh") == "relu" else "RNN_TANH"
    kernel = _TORCH_KERNELS[mode]
    hx: Any = state if cell.mode == "LSTM" else state[0]
    bidirectional = len(cells) == 2
    if batch_sizes is None:
        args: tuple[Any, ...] = (x, hx, params, cell.bias, 1, 0.0, False, bidirectional, False)
    else:
        args = (x, batch_sizes, hx, params, cell.bias, 1, 0.0, False, bidirectional)
    if x.device.type != "cuda":
        res = kernel(*args)
    else:
        with warnings.catch_warnings():
            # cuDNN asks for one flat weight buffer; the rebuilt weights are fresh every call
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
            res = kernel(*args)
    return res[0], tuple(res[1:])


_TORCH_KERNELS: dict[str, Callable[..., Any]] = {
    "LSTM": torch.lstm,
    "GRU": torch.gru,
    "RNN_TANH": torch.rnn_tanh,
    "RNN_RELU": torch.rnn_relu,
}


def check_batch_sizes(batch_sizes: Tensor, rows: int) -> list[int]:
    """The ``batch_sizes`` of a ``PackedSequence`` of ``rows`` rows as ints, checked to suit
    :func:`scan`: positive, non-increasing, summing to ``rows``."""
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(
            f"PackedSequence batch_sizes must be a non-empty 1-D tensor, got shape "
            f"{tuple(batch_sizes.shape)}"
        )
    sizes = [int(b) for b in batch_sizes.tolist()]
    if any(b <= 0 for b in sizes) or any(a < b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(
            "PackedSequence batch_sizes must be positive and non-increasing (sequences sorted by "
            "decreasing length, as pack_padded_sequence(..., enforce_sorted=True) requires of "
            f"its lengths; pass enforce_sorted=False to sort them), got batch_sizes={sizes}"
        )
    if sum(sizes) != rows:
        raise ValueError(
            f"PackedSequence data has {rows} rows but its batch_sizes sum to {sum(sizes)}"
        )
    return sizes
