"""The common form of a speech corpus: utterances (audio span + target tokens) per split."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CHARACTERS", "SpeechCorpus", "Utterance"]

CHARACTERS = tuple(" '" + "abcdefghijklmnopqrstuvwxyz")
"""Output symbols of character models (TED-LIUM): space, apostrophe, a-z."""


@dataclass(frozen=True)
class Utterance:
    """One utterance: a span of an audio file and its target tokens.

    ``tokens`` are phones (TIMIT, the TIMIT-like stand-in) or words (TED-LIUM and its
    stand-in); ``start``/``stop`` are seconds (``stop < 0``: to the end of the file).
    """

    uid: str
    speaker: str
    path: str
    tokens: tuple[str, ...]
    start: float = 0.0
    stop: float = -1.0


@dataclass(frozen=True)
class SpeechCorpus:
    """Utterances per split (``train``, ``dev``, ``test``) and how they are scored.

    Attributes:
        name: corpus name (part of the feature cache key).
        splits: split name -> utterances.
        unit: ``"phone"`` (targets are the tokens; scored by phone error rate) or ``"char"``
            (targets are the characters of the words; scored by word error rate).
        vocabulary: the model's output symbols (the CTC blank comes on top).
        scoring_map: phone -> scored phone (``None`` deletes it) applied to reference and
            hypothesis before PER (TIMIT's 61 -> 39 folding); empty for identity.
        skipped: ``(file, reason)`` of utterances left out while listing the corpus.
    """

    name: str
    splits: dict[str, list[Utterance]]
    unit: str
    vocabulary: tuple[str, ...]
    scoring_map: dict[str, str | None] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.unit not in ("phone", "char"):
            raise ValueError(f"unit must be 'phone' or 'char', got {self.unit!r}")
