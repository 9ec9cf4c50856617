"""Optimizer parameter groups with a learning rate per tensor format.

A product of many small factors moves further per optimizer step than a dense matrix does when
Adam moves each factor by about the rate: on the spike stand-in HT's default (a tree of seven
factors) diverges at the rate a dense LSTM trains at and trains at a third of it
(docs/accuracy.md). :func:`param_groups` gives each format's factors their own rate::

    groups = kcprnn.param_groups(model, lr=3e-3, format_lr={"ht": 1 / 3})
    optimizer = torch.optim.Adam(groups)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .formats import FORMATS, FactorizedMatrix

__all__ = ["check_format_lr", "param_groups"]


def check_format_lr(format_lr: Mapping[str, Any]) -> dict[str, float]:
    """``format_lr`` as a plain dict, checked: every key a registered format, every factor a
    finite number above 0 (not a bool); ``ValueError`` naming the first that is not."""
    for name, factor in format_lr.items():
        if name not in FORMATS:
            raise ValueError(f"format_lr: unknown format {name!r}; known: {sorted(FORMATS)}")
        number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
        if not (number and math.isfinite(factor) and factor > 0):
            raise ValueError(f"format_lr: {name}={factor!r} must be a finite number > 0")
    return dict(format_lr)


def param_groups(
    module: nn.Module,
    lr: float,
    *,
    format_lr: Mapping[str, float] | None = None,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """Parameter groups of ``module`` for a ``torch.optim`` optimizer: the parameters of every
    factorized matrix of a format named in ``format_lr`` in one group per format at ``lr *
    format_lr[format]``, every other parameter in one group at ``lr``; a parameter in ``exclude``
    in none (for a group of the caller's own). Each group carries its ``"name"`` (the format,
    or ``"other"``); empty groups are left out. A parameter shared by two matrices goes to the
    first group that reaches it.

    Raises ``ValueError`` as :func:`check_format_lr` does.
    """
    scales = check_format_lr(format_lr or {})
    seen = {id(p) for p in exclude}
    by_format: dict[str, list[nn.Parameter]] = {name: [] for name in scales}
    for sub in module.modules():
        if isinstance(sub, FactorizedMatrix) and sub.format_name in scales:
            for p in sub.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    by_format[sub.format_name].append(p)
    other = [p for p in module.parameters() if id(p) not in seen]
    groups = [{"params": other, "lr": lr, "name": "other"}] if other else []
    for name, params in by_format.items():
        if params:
            groups.append({"params": params, "lr": lr * scales[name], "name": name})
    return groups
