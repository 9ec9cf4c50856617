"""Starting from a trained model: initialization from another run and knowledge distillation.

``init_from = RUN_DIR`` (:func:`initialize_from`): the model starts from the checkpoint of a run
with the same architecture (typically the dense model of the same preset). Every recurrent
matrix is rebuilt dense from that run and decomposed into this run's format and options
(:meth:`kcprnn.rnn.cells.RNNCellBase.load_dense_weights`: ``from_dense`` at the solved size);
biases and the output layer are copied. Compressing a trained model and then training on is the
usual route to a compressed model in practice; what it buys is measured in ``docs/speech.md``.

``distill = w`` with ``teacher = RUN_DIR`` (:class:`Teacher`): the training loss gains ``w``
times the Kullback-Leibler divergence from the teacher's output distribution to the model's
(Hinton et al. 2015; ``distill_temperature`` softens both first): per frame, averaged over the
frames of the utterances, for the CTC models; per sequence for the classifiers. The teacher runs
without gradients in eval mode on the same (undropped) inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..rnn.plan import dense_weight

__all__ = ["Teacher", "distillation_loss", "initialize_from", "start_from"]

log = logging.getLogger(__name__)


def _load(run_dir: str, role: str) -> tuple[Any, Any]:
    from .train import load_checkpoint

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{role}={run_dir!r}: no such run folder")
    with torch.random.fork_rng(devices=[]):  # building the model draws an initialization
        model, cfg, _ = load_checkpoint(run_dir)
    return model, cfg


def _architecture(model: Any) -> tuple[Any, ...]:
    rnn = model.rnn
    return (
        type(model).__name__,
        rnn.mode,
        rnn.input_size,
        rnn.hidden_size,
        rnn.num_layers,
        rnn.num_directions,
        rnn.proj_size,
        rnn.bias,
    )


def initialize_from(model: nn.Module, run_dir: str) -> list[dict[str, Any]]:
    """Initialize ``model`` (a :class:`~kcprnn.experiments.ctc.CTCModel` or
    :class:`~kcprnn.experiments.model.SequenceClassifier`) from the checkpoint in ``run_dir``.

    Returns one record per recurrent matrix: layer, direction, matrix, and the relative
    Frobenius error of its decomposition.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
        ValueError: the run's model has another architecture (the message names both).
    """
    source, _ = _load(run_dir, "init_from")
    ours, theirs = _architecture(model), _architecture(source)
    if ours != theirs:
        keys = "model, cell, input, hidden, layers, directions, projection, bias"
        raise ValueError(
            f"init_from={run_dir!r}: its model ({keys}: {theirs}) is not this run's ({ours})"
        )
    records = []
    net: Any = model
    rnn, src = net.rnn, source.rnn
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for direction in range(rnn.num_directions):
                cell, other = rnn.cell(layer, direction), src.cell(layer, direction)
                dense = {role: dense_weight(m).detach() for role, m in other.matrices().items()}
                cell.load_dense_weights(
                    dense["ih"],
                    dense["hh"],
                    dense.get("hr"),
                    bias_ih=other.bias_ih if other.bias else None,
                    bias_hh=other.bias_hh if other.bias else None,
                )
                for role, w in dense.items():
                    got = dense_weight(cell.matrices()[role])
                    err = float((got - w).norm() / w.norm().clamp_min(1e-30))
                    records.append(
                        {
                            "layer": layer,
                            "direction": direction,
                            "matrix": f"W_{role}",
                            "relative_error": err,
                        }
                    )
        state = source.state_dict()
        for name, p in model.named_parameters():
            if not name.startswith("rnn."):
                p.copy_(state[name])  # the output layer: same shapes by the architecture check
    errors = ", ".join(
        f"{r['matrix']}[{r['layer']},{r['direction']}] {r['relative_error']:.3f}" for r in records
    )
    log.info("initialized from %s; relative errors of the decompositions: %s", run_dir, errors)
    return records


def distillation_loss(
    student: Tensor, teacher: Tensor, mask: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """Mean over positions of ``KL(teacher || student)`` between the log-probabilities
    ``(..., classes)``; ``mask`` (the leading shape, 1 for positions that count) restricts the
    mean. At a ``temperature`` T other than 1 both distributions are softened first
    (``softmax(log p / T)``) and the divergence is scaled by T², which keeps its gradients'
    scale (Hinton et al. 2015)."""
    if temperature != 1.0:
        student = (student / temperature).log_softmax(-1)
        teacher = (teacher / temperature).log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1) * temperature**2  # (...)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _outputs(model: Any) -> tuple[int, int]:
    """(inputs per step, output classes) of an experiment model."""
    head = model.output if hasattr(model, "output") else model.classifier
    return model.rnn.input_size, head.out_features


class Teacher:
    """The model of a finished run (``teacher``), evaluated without gradients in eval mode, and
    the weight of its distillation term. Any architecture with the same inputs and classes."""

    def __init__(
        self,
        run_dir: str,
        weight: float,
        model: nn.Module,
        device: torch.device,
        temperature: float = 1.0,
    ) -> None:
        teacher, _ = _load(run_dir, "teacher")
        if type(teacher) is not type(model) or _outputs(teacher) != _outputs(model):
            raise ValueError(
                f"teacher={run_dir!r}: its {type(teacher).__name__} (inputs, classes "
                f"{_outputs(teacher)}) does not fit this run's {type(model).__name__} "
                f"({_outputs(model)})"
            )
        self.model = teacher.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight = weight
        self.temperature = temperature

    @torch.no_grad()
    def log_probs(self, x: Tensor) -> Tensor:
        """The teacher's log-probabilities for ``x``: ``(b, t, c)`` for a CTC model (which gives
        them), ``(b, c)`` for a classifier (from its logits)."""
        self.model.eval()
        out = self.model(x)
        return out if out.dim() == 3 else out.log_softmax(-1)

    def divergence(self, student: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """:func:`distillation_loss` of the model's log-probabilities ``student`` for ``x``."""
        return distillation_loss(student, self.log_probs(x), mask, self.temperature)


def start_from(cfg: Any, model: nn.Module, device: torch.device, resuming: bool) -> Teacher | None:
    """What a run's config asks of a trained run: ``init_from`` applied to ``model`` (a fresh
    run only: a resumed one reads its own checkpoint), and the distillation :class:`Teacher`
    (``None`` without ``distill``)."""
    if cfg.init_from and not resuming:
        initialize_from(model, cfg.init_from)
    if not cfg.distill:
        return None
    source = cfg.teacher or cfg.init_from
    return Teacher(source, cfg.distill, model, device, cfg.distill_temperature)
