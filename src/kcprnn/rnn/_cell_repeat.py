"""What lets a cell's next call repeat its last step's route without the full step's checks
and planning: the dense weights of a step on torch's fused cell (:func:`remember_dense`,
:func:`repeated_dense`) or the node of a compiled training step (:func:`remember_step`,
:func:`repeated_step`), kept with everything the route depended on (the tensors' shapes,
dtypes, devices and gradient flags, the matrices, their algorithms and cost models, every
parameter's storage and version, the kind of training step). A stream of steps, or the steps
of a sequence in training, then costs about what ``torch.nn``'s cell costs around its
kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _cell_train
from ._cell_step import (
    _grad_key,
    _matrices,
    _mode_key,
    _sharing,
    autocasting,
    dense_weights,
    marks,
)
from .steps import State

if TYPE_CHECKING:
    from .cells import RNNCellBase

__all__ = ["remember_dense", "remember_step", "repeated_dense", "repeated_step"]


def _signature(cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor]) -> tuple[Any, ...]:
    """What a step's route and checks depend on besides the weights' values: the shapes, dtype
    and device of its tensors, the matrices themselves, their algorithms and cost models, and
    whether autocast is on."""
    ih, hh = _matrices(cell)
    shapes = tuple([t.shape for t in hx])
    models = (ih._algorithm, hh._algorithm, ih._cost_model, hh._cost_model)
    cast = autocasting(input.device)
    return (input.shape, input.dtype, input.device, shapes, ih, hh, *models, cast)


def _step_signature(cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor]) -> tuple[Any, ...]:
    """:func:`_signature` and what else decides whether a step records a graph and runs the
    compiled training step: which tensors need gradients, the state's dtypes and devices."""
    flags = tuple([(t.dtype, t.device, t.requires_grad) for t in hx])
    return (_signature(cell, input, hx), input.requires_grad, flags)


def remember_step(cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor]) -> None:
    """Keep what lets the next call repeat this one's compiled training step
    (:func:`repeated_step`): called after a structured step on a batched ``input`` with a
    given state, whose checks passed; forgets it where this call took another way."""
    found = cell._kept.pop("stepped", None)
    if found is None:
        cell._kept.pop("repeat step", None)
    else:
        cell._kept["repeat step"] = (_step_signature(cell, input, hx), found)


def repeated_step(cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor] | None) -> State | None:
    """The compiled training step of the last call remembered (:func:`remember_step`) run
    again on ``input`` and ``hx``: tensors of the same shapes, dtypes, devices and gradient
    flags, the same matrices, algorithms and cost models, no parameter changed since (nor
    which need gradients) and a step of the same kind (:func:`marks`), so that the route, the
    checks and the operands are those of that call; ``None`` otherwise (the full step then
    checks, plans and runs)."""
    found = cell._kept.get("repeat step")
    if found is None or hx is None or not torch.is_grad_enabled() or not _sharing():
        return None
    signature, (key, (shared, ih_op, hh_op, mode)) = found
    steps = marks(cell)
    if steps["pending"] != shared or signature != _step_signature(cell, input, hx):
        return None
    if key != _grad_key(cell):
        return None
    bias = cell._parameters
    out = _cell_train.step(mode, ih_op, hh_op, input, hx, bias["bias_ih"], bias["bias_hh"], steps)
    steps["pending"] = True  # until the step's backward runs
    return out


def remember_dense(
    cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor], alone: bool = False
) -> None:
    """Keep what lets the next call repeat this one's step on the dense weights
    (:func:`repeated_dense`): called after such a step on a batched ``input`` with a given
    state, whose checks passed; ``alone``: a step under autograd whose predecessor's
    backward has run may take another route (:func:`marks`), so such a step is not repeated."""
    key = _mode_key(cell)
    if key is None:
        cell._repeat = None
        return
    cell._repeat = (_signature(cell, input, hx), key, dense_weights(cell), alone)


def repeated_dense(
    cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor] | None
) -> tuple[Tensor, Tensor] | None:
    """The dense weights for a step that repeats the last one remembered
    (:func:`remember_dense`): tensors of the same shapes, dtype and device, the same matrices,
    algorithms and cost models, the same autograd mode, and no parameter changed since (nor,
    under autograd, which need gradients); ``None`` otherwise (the full step then checks, plans
    and runs). A step on a stream of inputs, or the steps of a sequence in training, then cost
    about what ``torch.nn``'s cell costs. A cell whose matrices are both dense steps on its
    parameters once its batched tensors pass the checks (:func:`_plain_dense`)."""
    if torch.compiler.is_compiling() or hx is None:
        return None  # compiling: before reading what the eager steps keep (no guards on it)
    plain = _plain_dense(cell, input, hx)
    if plain is not None:
        return plain
    found = cell._repeat
    if found is None or found[0] != _signature(cell, input, hx) or found[1] != _mode_key(cell):
        return None
    if found[1][0]:  # under autograd
        steps = marks(cell)
        if found[3] and not steps["pending"]:
            return None  # a lone step, whose route may differ: the full step chooses it
        steps["pending"] = True
    return found[2]


def _plain_dense(
    cell: RNNCellBase, input: Tensor, hx: Sequence[Tensor]
) -> tuple[Tensor, Tensor] | None:
    """The parameters of ``cell``'s two dense matrices where a step on ``input`` and ``hx``
    needs none of the full step's work: batched tensors of the cell's sizes and dtype, no
    projection, weights that are plain parameters (not reparametrized or pruned); ``None``
    otherwise (the full step checks and reports)."""
    ih, hh = _matrices(cell)
    if ih.format_name != "dense" or hh.format_name != "dense" or input.dim() != 2:
        return None
    w_ih, w_hh = ih._parameters.get("weight"), hh._parameters.get("weight")
    sizes = cell.state_sizes()
    if (
        w_ih is None
        or w_hh is None
        or input.shape[1] != w_ih.shape[1]
        or input.dtype != w_ih.dtype
        or len(hx) != len(sizes)
        or cell.weight_hr is not None
    ):
        return None
    b = input.shape[0]
    for t, s in zip(hx, sizes, strict=True):
        if t.shape != (b, s):
            return None
    return w_ih, w_hh
