"""CTC acoustic models, decoding and error rates for the speech experiments.

:class:`CTCModel` is a stack of (compressed) bidirectional LSTM or GRU layers over feature frames
with a linear layer to the output symbols plus the CTC blank (index 0), trained with
:class:`torch.nn.CTCLoss`.

Decoding (our own):

- :func:`greedy_decode`: the best symbol per frame, repeats collapsed, blanks removed.
- :func:`beam_search`: CTC prefix beam search (Graves 2012; Hannun et al. 2014): hypotheses are
  label prefixes scored by the total probability of all alignments that produce them
  (blank-ending and non-blank-ending parts kept apart), the ``beam_size`` best kept after each
  frame. It finds the most probable *labelling* where greedy decoding finds the most probable
  *path*. Optionally with a symbol :class:`Bigram` language model by shallow fusion: each
  extension of a prefix by a symbol also scores ``weight * log P(symbol | last symbol) +
  bonus``.

Error rates come from ``jiwer``: word error rate over words, phone error rate over phones (each
phone a "word"), both the total edit distance over the total reference length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import FactorizedMatrix
from .model import make_rnn

__all__ = ["Bigram", "CTCModel", "beam_search", "char_error_rate", "error_rate", "greedy_decode"]


class CTCModel(nn.Module):
    r"""Frames ``(batch, time, input_size)`` -> log-probabilities ``(batch, time, num_symbols)``.

    Args:
        input_size: values per frame (123 for TIMIT's filterbanks with deltas).
        hidden_size: state size per direction.
        num_symbols: output symbols including the blank (index 0).
        cell: ``"lstm"`` or ``"gru"``.
        num_layers: stacked recurrent layers.
        bidirectional: a backward direction in every layer.
        format, format_options: input-to-hidden format (a key of :data:`kcprnn.FORMATS`) and its
            options (``rank``, ``in_modes``, ...).
        hidden_format, hidden_options: the hidden-to-hidden format and its options.
        hidden_modes: modes of the hidden size (the gates fold into the first one).
        layer_options: one dict per layer laid over ``format_options`` for that layer's
            input-to-hidden matrices (:class:`kcprnn.LSTM`'s ``layer_options``).
        dropout: dropout probability on every recurrent layer's output: between stacked layers
            and before the output layer (training only; 0 = none).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_symbols: int,
        *,
        cell: str = "lstm",
        num_layers: int = 1,
        bidirectional: bool = True,
        format: str = "dense",
        format_options: dict[str, Any] | None = None,
        hidden_format: str = "dense",
        hidden_options: dict[str, Any] | None = None,
        hidden_modes: Sequence[Any] | None = None,
        layer_options: Sequence[dict[str, Any]] | None = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got dropout={dropout}")
        if num_symbols < 2:
            raise ValueError(f"num_symbols must count the blank and >= 1 symbol, got {num_symbols}")
        self.rnn = make_rnn(
            cell,
            input_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            format=format,
            format_options=format_options,
            hidden_format=hidden_format,
            hidden_options=hidden_options,
            hidden_modes=hidden_modes,
            device=device,
            dropout=dropout,
            layer_options=layer_options,
        )
        self.dropout = nn.Dropout(dropout)
        directions = 2 if bidirectional else 1
        self.output = nn.Linear(directions * hidden_size, num_symbols, device=device)

    @property
    def weight_ih(self) -> FactorizedMatrix:
        """The first input-to-hidden :class:`~kcprnn.formats.FactorizedMatrix`."""
        return self.rnn.cell(0).weight_ih

    @property
    def weight_hh(self) -> FactorizedMatrix:
        """The first hidden-to-hidden :class:`~kcprnn.formats.FactorizedMatrix`."""
        return self.rnn.cell(0).weight_hh

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (b, t, d*h)
        return self.output(self.dropout(out)).log_softmax(dim=-1)  # (b, t, c)


def greedy_decode(log_probs: np.ndarray | Tensor, length: int | None = None) -> list[int]:
    """Best-path decoding of one utterance's ``(T, C)`` scores: argmax per frame, repeats
    collapsed, blanks (0) removed."""
    scores = log_probs.detach().cpu().numpy() if isinstance(log_probs, Tensor) else log_probs
    best = np.asarray(scores)[: length if length is not None else len(scores)].argmax(axis=1)
    out, previous = [], 0
    for s in best.tolist():
        if s != previous and s != 0:
            out.append(s)
        previous = s
    return out


@dataclass(frozen=True)
class Bigram:
    """A symbol bigram language model for :func:`beam_search`: ``log_probs[a, b]`` is
    ``log P(b | a)`` over the symbols ``1 .. C - 1``, row 0 the start of an utterance (column 0,
    the blank, is never predicted). Every symbol a prefix grows by scores
    ``weight * log P + bonus`` (``bonus`` offsets the model's cost per symbol)."""

    log_probs: np.ndarray  # (C, C)
    weight: float = 1.0
    bonus: float = 0.0

    @classmethod
    def estimate(
        cls,
        sequences: Sequence[Sequence[int]],
        num_symbols: int,
        smoothing: float = 1.0,
        weight: float = 1.0,
        bonus: float = 0.0,
    ) -> Bigram:
        """Relative frequencies of symbol pairs in ``sequences`` (CTC targets, symbols ``1 ..
        num_symbols - 1``), each count plus ``smoothing`` (add-k)."""
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got smoothing={smoothing}")
        counts = np.full((num_symbols, num_symbols), float(smoothing))
        counts[:, 0] = 0.0
        for n, seq in enumerate(sequences):
            previous = 0
            for s in seq:
                if not 0 < s < num_symbols:
                    raise ValueError(f"sequence {n} holds symbol {s}, outside 1..{num_symbols - 1}")
                counts[previous, s] += 1.0
                previous = s
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_probs = np.where(totals > 0, np.log(counts / totals), -np.inf)
        return cls(log_probs, weight, bonus)

    def scores(self) -> np.ndarray:
        """``(C, C)``: what extending a prefix ending in ``a`` by ``b`` adds. A pair never seen
        (no smoothing) costs a large finite amount, not -inf: no inf - inf downstream."""
        return self.weight * np.nan_to_num(self.log_probs, neginf=-1e30) + self.bonus


def beam_search(
    log_probs: np.ndarray | Tensor,
    beam_size: int = 8,
    length: int | None = None,
    lm: Bigram | None = None,
) -> list[int]:
    """CTC prefix beam search over one utterance's ``(T, C)`` log-probabilities (blank 0), with
    ``lm``'s score (:meth:`Bigram.scores`) added for every symbol a prefix grows by."""
    scores = log_probs.detach().cpu().numpy() if isinstance(log_probs, Tensor) else log_probs
    lp = np.asarray(scores, dtype=np.float64)[: length if length is not None else len(scores)]
    neg_inf = -np.inf
    if lm is not None and lm.log_probs.shape != (lp.shape[1], lp.shape[1]):
        raise ValueError(
            f"the language model covers {lm.log_probs.shape[0]} symbols, the scores {lp.shape[1]}"
        )
    fusion = lm.scores() if lm is not None else None  # (C, C)
    # prefix -> (log P(prefix, ending in blank), log P(prefix, ending in its last symbol))
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, neg_inf)}
    for t in range(len(lp)):
        frame = lp[t]
        # only symbols that can matter: the beam's size of the frame's best ones
        candidates = np.argsort(frame)[::-1][: max(beam_size, 2)]
        nxt: dict[tuple[int, ...], list[float]] = {}
        add = _accumulator(nxt)
        for prefix, (pb, pn) in beams.items():
            total = np.logaddexp(pb, pn)
            for s in candidates.tolist():
                p = frame[s]
                if s == 0:
                    add(prefix, total + p, neg_inf)
                    continue
                extended = prefix + (s,)
                grow = p if fusion is None else p + fusion[prefix[-1] if prefix else 0, s]
                if prefix and prefix[-1] == s:
                    # a repeat needs a blank in between to extend; without one it stays
                    add(extended, neg_inf, pb + grow)
                    add(prefix, neg_inf, pn + p)
                else:
                    add(extended, neg_inf, total + grow)
        ranked = sorted(nxt.items(), key=lambda kv: -np.logaddexp(kv[1][0], kv[1][1]))
        ranked = ranked[:beam_size]
        beams = {k: (v[0], v[1]) for k, v in ranked}
    best = max(beams.items(), key=lambda kv: np.logaddexp(kv[1][0], kv[1][1]))
    return list(best[0])


def _accumulator(table: dict[tuple[int, ...], list[float]]) -> Any:
    """``add(prefix, blank, nonblank)``: log-add the two probabilities into ``table[prefix]``."""

    def add(prefix: tuple[int, ...], blank: float, nonblank: float) -> None:
        b, n = table.get(prefix, (-np.inf, -np.inf))
        table[prefix] = [np.logaddexp(b, blank), np.logaddexp(n, nonblank)]

    return add


def error_rate(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Total edit distance (substitutions + deletions + insertions) between token sequences
    over the total reference length, via ``jiwer`` (words for WER, phones for PER)."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    for i, ref in enumerate(references):
        if not ref:
            raise ValueError(f"reference {i} is empty")
        if any(not tok or any(c.isspace() for c in tok) for tok in ref):
            raise ValueError(f"reference {i} has an empty token or one with spaces: {list(ref)}")
    out = jiwer.process_words([" ".join(r) for r in references], [" ".join(h) for h in hypotheses])
    edits = out.substitutions + out.deletions + out.insertions
    return edits / sum(len(r) for r in references)


def char_error_rate(
    references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]
) -> float:
    """Character error rate between word sequences: :func:`error_rate` over their characters,
    the spaces between words counted as characters."""

    def chars(words: Sequence[str]) -> list[str]:
        return ["|" if c == " " else c for c in " ".join(words)]

    return error_rate([chars(r) for r in references], [chars(h) for h in hypotheses])
