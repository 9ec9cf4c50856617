"""The in-memory form every video dataset takes, and the train/test splits of the protocols."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ClipSet", "group_split", "leave_one_group_out", "stratified_split"]


@dataclass(frozen=True)
class ClipSet:
    """Decoded clips ready for training.

    Attributes:
        frames: ``(n, t, h, w, 3)`` uint8 RGB frames (``t`` sampled frames per clip).
        labels: ``(n,)`` int64 class index into ``class_names``.
        groups: ``(n,)`` int64 group id (UCF group, source video, ...), used by the splits.
        class_names: one name per class.
        skipped: ``(path, reason)`` of every clip that could not be read and was left out.
    """

    frames: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.frames.ndim != 5 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8 of shape (n, t, h, w, 3), got {self.frames.dtype} "
                f"{self.frames.shape}"
            )
        if self.labels.shape != (n,) or self.groups.shape != (n,):
            raise ValueError(
                f"labels and groups need shape ({n},), got {self.labels.shape} and "
                f"{self.groups.shape}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        """Features per frame, ``h * w * 3`` (57,600 at 160x120)."""
        return int(np.prod(self.frames.shape[2:]))


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(test_fraction * n_c)`` clips of every class ``c`` (at least one when the
    class has two or more). Returns sorted ``(train_idx, test_idx)``."""
    _check_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(test_fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(rng.permutation(idx)[:k].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), test_idx), test_idx


def group_split(
    groups: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups: a seeded ``test_fraction`` of the distinct group ids goes to test
    (UCF11's protocol: all clips of a group on one side).

    Returns sorted ``(train_idx, test_idx)``."""
    _check_fraction(test_fraction)
    ids = np.unique(groups)
    if len(ids) < 2:
        raise ValueError(f"a group-wise split needs at least 2 groups, got {ids.tolist()}")
    k = min(max(int(round(test_fraction * len(ids))), 1), len(ids) - 1)
    test_groups = np.random.default_rng(seed).permutation(ids)[:k]
    mask = np.isin(groups, test_groups)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def leave_one_group_out(groups: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """UCF50's protocol: fold ``fold`` tests on group ``fold`` and trains on the others."""
    ids = np.unique(groups)
    if fold not in ids:
        raise ValueError(f"fold must be one of the group ids {ids.tolist()}, got fold={fold}")
    mask = groups == fold
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
