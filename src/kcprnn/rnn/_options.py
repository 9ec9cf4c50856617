"""Arguments of the recurrent cells and modules: the one validator they share, and the options
of their weight matrices (the gates folded into the output modes).

An LSTM's input-to-hidden matrix ``W_ih`` stacks the ``G = 4`` gates ``(i, f, g, o)`` on its rows
(``G = 3`` for a GRU, 1 for an Elman RNN), so its output size is ``G * hidden_size``. Given the
modes ``J_1 ⋯ J_D`` of ``hidden_size``, the gates are folded into the first output mode,
``J_1 <- G * J_1``, so that the tensorized ``W_ih`` keeps one mode per hidden mode.

A matrix in a compressed format whose options give no ``rank`` gets a parameter budget by the
rule of :func:`default_budget_options`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..budget import (
    DEFAULT_BUDGET,
    DEFAULT_CAP,
    DEFAULT_WIDE_COUNT,
    DEFAULT_WIDE_FLOOR,
    SOLVED_FORMATS,
    budget_options,
    split_budget,
)
from ..formats import FORMATS

__all__ = [
    "check_arguments",
    "check_format",
    "check_input_dtype",
    "check_modes",
    "check_torch_module",
    "default_budget_options",
    "fold_gates",
    "hidden_matrix_options",
    "input_matrix_options",
]


def fold_gates(modes: Sequence[Any], num_gates: int) -> list[Any]:
    """Fold ``num_gates`` stacked blocks into the first mode: ``J_1 <- G * J_1``.

    For nested (Kronecker-factored) modes the first factor of the first mode is multiplied.

    Example:
        >>> fold_gates([4, 4, 4, 4], 4)
        [16, 4, 4, 4]
        >>> fold_gates([[2, 2], [2, 2]], 3)
        [[6, 2], [2, 2]]
    """
    first = modes[0]
    if isinstance(first, Sequence):
        first = [num_gates * first[0], *first[1:]]
    else:
        first = num_gates * first
    return [first, *(list(m) if isinstance(m, Sequence) else m for m in modes[1:])]


def input_matrix_options(
    options: dict[str, Any],
    num_gates: int,
    hidden_modes: Sequence[Any] | None,
) -> dict[str, Any]:
    """Options of an input-to-hidden matrix: ``options`` with ``out_modes`` derived from
    ``hidden_modes`` by :func:`fold_gates` unless ``out_modes`` is given explicitly."""
    opts = dict(options)
    if hidden_modes is not None and "out_modes" not in opts:
        opts["out_modes"] = fold_gates(hidden_modes, num_gates)
    return opts


def hidden_matrix_options(
    options: dict[str, Any],
    in_features: int,
    hidden_size: int,
    num_gates: int,
    hidden_modes: Sequence[Any] | None,
) -> dict[str, Any]:
    """Options of a hidden-to-hidden matrix ``(G*hidden, in_features)``.

    Flat ``hidden_modes`` tensorize it as ``in_modes=hidden_modes`` (when ``in_features`` is
    ``hidden_size``) and ``out_modes=fold_gates(hidden_modes)``; nested (Kronecker-factored)
    modes describe the input-to-hidden matrix only. ``options`` (``hidden_options``) win.
    """
    opts = dict(options)
    if hidden_modes is not None and not any(isinstance(m, Sequence) for m in hidden_modes):
        if in_features == hidden_size:
            opts.setdefault("in_modes", list(hidden_modes))
            opts.setdefault("out_modes", fold_gates(hidden_modes, num_gates))
    return opts


MatrixSpec = tuple[str, dict[str, Any], int, int]
"""A cell's matrix: ``(format, options, in_features, out_features)``."""


def default_budget_options(specs: dict[str, MatrixSpec]) -> dict[str, MatrixSpec]:
    """The default size of a cell's compressed matrices: ``specs`` (by role, ``"ih"``,
    ``"hh"``, ``"hr"``) with every matrix in a compressed format the budget solver knows
    (:data:`~kcprnn.budget.SOLVED_FORMATS`: not ``"dense"`` nor a format registered elsewhere)
    whose options give no ``rank`` solved for its share of one budget (:mod:`kcprnn.budget`).

    The rule: the compressed matrices together store :data:`~kcprnn.budget.DEFAULT_BUDGET` (1/32) of
    their dense parameters, each counted at most at :data:`~kcprnn.budget.DEFAULT_WIDE_COUNT` (2)
    times ``W_hh``'s dense size (a wide input raises the budget, by a bounded amount), split evenly
    between them in parameters, no matrix above :data:`~kcprnn.budget.DEFAULT_CAP` (1/4) of its own
    size, the remainder to the others (:func:`~kcprnn.budget.split_budget`); a matrix larger than
    ``W_hh`` then stores at least :data:`~kcprnn.budget.DEFAULT_WIDE_FLOOR` (12,288) parameters, or
    1/32 of itself where that is fewer. For an LSTM with 13 inputs and 256 hidden units in one
    format, ``W_ih`` (``1024 x 13``) gets 1/4 of itself and ``W_hh`` (``1024 x 256``) the rest,
    about 1/50: 32x smaller in all. With 57,600 inputs each matrix gets 12,288 parameters (3/64 of
    ``W_hh``, 1/4,800 of ``W_ih``); with 700 inputs and 128 hidden units, ``W_ih`` 11,200 (1/32 of
    itself) and ``W_hh`` 3,072 (3/64 of itself): 30x in all. The shares are counted over every
    compressed matrix, so a matrix given its own ``rank`` keeps it and the others keep the share
    they would get without it. Each share is solved into the format's options as a float ``rank``
    would be (the largest configuration not above it; the smallest one where none fits).
    """
    compressed = [role for role, spec in specs.items() if spec[0] in SOLVED_FORMATS]
    if not compressed:
        return specs
    sizes = [specs[role][2] * specs[role][3] for role in compressed]
    hidden = specs["hh"][2] * specs["hh"][3]
    base = sum(min(n, DEFAULT_WIDE_COUNT * hidden) for n in sizes)
    shares = split_budget(sizes, DEFAULT_BUDGET, DEFAULT_CAP, base=base)
    shares = [
        max(share, min(DEFAULT_WIDE_FLOOR / n, DEFAULT_BUDGET)) if n > hidden else share
        for share, n in zip(shares, sizes, strict=True)
    ]
    out = dict(specs)
    for role, share in zip(compressed, shares, strict=True):
        fmt, opts, n_in, n_out = specs[role]
        if opts.get("rank") is not None:
            continue
        solved = budget_options(fmt, n_in, n_out, {**opts, "rank": share}, warn=False)
        out[role] = (fmt, solved, n_in, n_out)
    return out


# --- checks ---------------------------------------------------------------------------------------


def check_format(format: object, name: str) -> str:
    """``format`` if it is a key of :data:`~kcprnn.FORMATS`, else a ``ValueError`` naming it."""
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown {name} {format!r}; choose one of {sorted(FORMATS)}")
    return format


def _flat_product(modes: Sequence[Any]) -> int:
    return math.prod(_flat_product(m) if isinstance(m, Sequence) else m for m in modes)


def check_modes(modes: object, size: int, name: str, size_name: str) -> list[Any]:
    """``modes`` (ints, or int sequences for Kronecker factors) as lists, checked to multiply to
    ``size``."""
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence) or len(modes) == 0:
        raise TypeError(
            f"{name} must be a non-empty sequence of ints (or of int sequences), got {modes!r}"
        )
    if _flat_product(modes) != size:
        raise ValueError(
            f"the product of {name} must equal {size_name}: {name}={list(modes)} multiply to "
            f"{_flat_product(modes)}, but {size_name}={size}"
        )
    return [list(m) if isinstance(m, Sequence) else m for m in modes]


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} should be of type int, got: {type(value).__name__} ({name}={value!r})"
        )
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {name}={value}")
    return value


def check_arguments(
    mode: str,
    input_size: object,
    hidden_size: object,
    *,
    bias: object,
    proj_size: object,
    nonlinearity: object,
    format: object,
    hidden_format: object,
    hidden_modes: object,
    cell: bool,
    num_layers: object = 1,
    dropout: object = 0.0,
    layer_options: object = None,
) -> list[Any] | None:
    """Check the constructor arguments of a recurrent cell (``cell=True``) or module of ``mode``
    (``"LSTM"``, ``"GRU"`` or ``"RNN"``); every error names the offending value, in the words of
    ``torch.nn`` where it has them. ``num_layers``, ``dropout`` and ``layer_options`` are the
    modules' only (a non-zero ``dropout`` with one layer warns, as in ``torch.nn``).

    Returns:
        ``hidden_modes`` as lists (``None`` if not given).
    """
    check_format(format, "format")
    check_format(hidden_format, "hidden_format")
    _check_size(input_size, "input_size")
    hidden = _check_size(hidden_size, "hidden_size")
    layers = _check_size(num_layers, "num_layers")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got bias={bias!r}")
    rate = float(dropout) if isinstance(dropout, numbers.Real) else math.nan
    if isinstance(dropout, bool) or not 0 <= rate <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got dropout={dropout!r}"
        )
    if rate > 0 and layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={layers}",
            stacklevel=4,  # the caller of the module's constructor
        )
    if proj_size and mode != "LSTM":
        raise ValueError(
            f"proj_size is only supported by LSTM cells, got proj_size={proj_size!r}"
            if cell
            else "proj_size argument is only supported for LSTM, not RNN or GRU "
            f"(got proj_size={proj_size!r})"
        )
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(f"proj_size should be a non-negative int, got proj_size={proj_size!r}")
    if proj_size >= hidden:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size}, "
            f"hidden_size={hidden}"
        )
    if mode == "RNN":
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or 'relu'."
            )
    elif nonlinearity != "tanh":
        raise ValueError(
            f"nonlinearity is only supported by RNN and RNNCell, got nonlinearity={nonlinearity!r}"
        )
    if layer_options is not None and (
        not isinstance(layer_options, Sequence)
        or isinstance(layer_options, str)
        or len(layer_options) != layers
        or not all(isinstance(o, dict) for o in layer_options)
    ):
        raise ValueError(
            f"layer_options must be a sequence of num_layers={layers} dicts, got {layer_options!r}"
        )
    if hidden_modes is None:
        return None
    return check_modes(hidden_modes, hidden, "hidden_modes", "hidden_size")


def check_input_dtype(name: str, x: Tensor, module: nn.Module) -> None:
    """A ``TypeError`` naming both dtypes unless ``x`` has the dtype of ``module``'s parameters
    (in the words of ``torch.nn``'s recurrent modules); autocast regions may mix them."""
    p = _first_parameter(module)
    if p is None or x.dtype == p.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"{name}: input must have the type {p.dtype}, got type {x.dtype}")


def _first_parameter(module: nn.Module) -> Tensor | None:
    """The first parameter in ``module.parameters()`` order, found without the generator's
    bookkeeping (a cell's bias is one dict lookup away): cheap enough for every step."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        found = None if child is None else _first_parameter(child)
        if found is not None:
            return found
    return None


def check_torch_module(owner: type, expected: type[nn.Module], module: object) -> None:
    """A ``TypeError`` unless ``module`` is a ``expected`` (``owner.from_torch``'s argument)."""
    if not isinstance(module, expected):
        raise TypeError(
            f"{owner.__name__}.from_torch expects a torch.nn.{expected.__name__}, "
            f"got {type(module).__name__}"
        )
