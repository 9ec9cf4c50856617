"""An exponential moving average of a model's parameters, for evaluation (``ema`` in the config).

After the optimizer's ``n``-th step (``n`` counted from 1 over the whole run) every parameter's
average moves toward its current value::

    d = (ema - ema**n) / (1 - ema**n)
    average = d * average + (1 - d) * parameter

This is the bias-corrected exponential average (Adam's correction): the parameters after steps
``k = 1..n`` weighted by ``ema**(n - k)`` and normalized. The first step's average is that
step's parameters (``d = 0``), the initial weights never count, and ``d`` rises to ``ema``: the
average covers about the last ``1 / (1 - ema)`` steps from early on (200 at ``ema = 0.995``).
Buffers are not averaged (the models here have none that training changes).
:func:`~kcprnn.experiments.loop.fit` evaluates every epoch on the average and writes it as the
checkpoint's weights; the live parameters the optimizer keeps working on go to the train-state
file (``live/<name>``), so that a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["ParameterAverage"]


class ParameterAverage:
    """The moving average of ``model``'s parameters, started at their current values.

    Args:
        model: the trained module (not a DDP wrapper: its parameter names are the state_dict's).
        decay: ``ema``, in ``(0, 1)``: the weight the average keeps at each step, which the
            bias correction reaches as ``decay**n`` vanishes.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got decay={decay}")
        self.decay = decay
        self.params = dict(model.named_parameters())
        self.values = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the parameters in after the optimizer's ``step``-th step (1 for the first)."""
        d = (self.decay - self.decay**step) / (1.0 - self.decay**step)
        for name, p in self.params.items():
            self.values[name].lerp_(p.detach(), 1.0 - d)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averages inside the block and its live parameters again after."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's parameters with the averages."""
        for name, p in self.params.items():
            p.copy_(self.values[name])

    def checkpoint_tensors(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Swap the averages into ``state`` (the model's CPU ``state_dict``, changed in place:
        the weights a checkpoint stores) and return the live parameters it held, keyed
        ``live/<name>`` for the train-state file."""
        live = {}
        for name, value in self.values.items():
            live[f"live/{name}"] = state[name]
            state[name] = value.detach().cpu().contiguous()
        return live

    @torch.no_grad()
    def restore(self, tensors: dict[str, Tensor]) -> None:
        """On resume, with the model loaded from a checkpoint's weights (the averages): take those
        as the averages and put the live parameters from the train-state ``tensors`` back."""
        missing = [name for name in self.params if f"live/{name}" not in tensors]
        if missing:
            raise ValueError(
                f"the checkpoint's train state has no live parameters for {missing[:3]} "
                "(was it written with ema = 0?)"
            )
        for name, p in self.params.items():
            self.values[name].copy_(p)
            p.copy_(tensors[f"live/{name}"])
