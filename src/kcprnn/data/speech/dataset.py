"""A speech corpus made ready for CTC training: normalized features and target indices."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .corpus import SpeechCorpus, Utterance
from .features import FeatureSpec, extract_features, normalize

__all__ = ["SpeechSet", "encode_targets", "load_speech_set", "stack_frames"]


def stack_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """Frames ``(T, D)`` -> ``(ceil(T / k), k * D)``: each output frame is ``k`` consecutive
    input frames side by side (the last group padded by repeating the final frame), a ``k``
    times lower frame rate as in low-frame-rate CTC models (Sak et al., 2015)."""
    if k < 1:
        raise ValueError(f"frame_stack must be >= 1, got {k}")
    if k == 1:
        return frames
    t = len(frames)
    groups = -(-t // k)
    padded = np.concatenate([frames, np.repeat(frames[-1:], groups * k - t, axis=0)])
    return padded.reshape(groups, k * frames.shape[1])


def encode_targets(utt: Utterance, corpus: SpeechCorpus) -> np.ndarray:
    """CTC target indices of ``utt``: 1-based positions in ``corpus.vocabulary`` (0 is the
    blank); phones for ``unit="phone"``, the characters of the words joined by spaces for
    ``unit="char"``.

    Raises:
        ValueError: a token or character outside the vocabulary (the message names it).
    """
    index = {s: i + 1 for i, s in enumerate(corpus.vocabulary)}
    symbols = list(utt.tokens) if corpus.unit == "phone" else list(" ".join(utt.tokens))
    missing = sorted({s for s in symbols if s not in index})
    if missing:
        raise ValueError(f"utterance {utt.uid}: symbols {missing} are not in the vocabulary")
    return np.array([index[s] for s in symbols], dtype=np.int64)


@dataclass(frozen=True)
class SpeechSet:
    """Every kept utterance of a corpus: ``frames[i]`` float32 ``(T, D)`` (normalized),
    ``targets[i]`` int64 CTC targets, ``refs[i]`` the reference tokens (phones or words); the
    indices of each split in ``train``/``dev``/``test``; ``skipped`` lists ``(file, reason)`` of
    every utterance left out (listing or audio)."""

    corpus: SpeechCorpus
    uids: tuple[str, ...]
    speakers: tuple[str, ...]
    frames: list[np.ndarray]
    targets: list[np.ndarray]
    refs: list[tuple[str, ...]]
    train: np.ndarray
    dev: np.ndarray
    test: np.ndarray
    skipped: tuple[tuple[str, str], ...]

    @property
    def input_size(self) -> int:
        return int(self.frames[0].shape[1]) if self.frames else 0

    @property
    def num_symbols(self) -> int:
        """Output symbols including the CTC blank (index 0)."""
        return len(self.corpus.vocabulary) + 1

    @property
    def metric(self) -> str:
        """The error rate it is scored by: ``"per"`` for phone targets, ``"wer"`` otherwise."""
        return "per" if self.corpus.unit == "phone" else "wer"


def load_speech_set(
    corpus: SpeechCorpus,
    spec: FeatureSpec,
    cache_dir: str | os.PathLike,
    normalization: str = "global",
    frame_stack: int = 1,
) -> SpeechSet:
    """Features (computed once, cached), normalization, frame stacking (:func:`stack_frames`)
    and targets of ``corpus``."""
    utts = [(split, u) for split in ("train", "dev", "test") for u in corpus.splits.get(split, [])]
    store = extract_features(
        [u.uid for _, u in utts],
        [(u.path, u.start, u.stop) for _, u in utts],
        spec,
        cache_dir,
        corpus.name,
    )
    position = {uid: i for i, uid in enumerate(store.uids)}
    kept = [(s, u) for s, u in utts if u.uid in position]
    raw = [store.frames(position[u.uid]) for _, u in kept]
    speakers = tuple(u.speaker for _, u in kept)
    frames = normalize(raw, speakers, [s == "train" for s, _ in kept], normalization)
    frames = [stack_frames(f, frame_stack) for f in frames]
    split_idx = {
        name: np.array([i for i, (s, _) in enumerate(kept) if s == name], dtype=np.int64)
        for name in ("train", "dev", "test")
    }
    return SpeechSet(
        corpus,
        tuple(u.uid for _, u in kept),
        speakers,
        frames,
        [encode_targets(u, corpus) for _, u in kept],
        [u.tokens for _, u in kept],
        split_idx["train"],
        split_idx["dev"],
        split_idx["test"],
        corpus.skipped + store.skipped,
    )
