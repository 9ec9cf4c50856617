"""Spiking Heidelberg Digits (SHD) and Spiking Speech Commands (SSC): HDF5 files -> binned spikes.

The files (``shd_train.h5``, ``shd_test.h5``; ``ssc_train.h5``, ``ssc_valid.h5``,
``ssc_test.h5``) share one layout, one entry per sample in every per-sample dataset:

- ``spikes/times``: variable-length float arrays, spike times in seconds;
- ``spikes/units``: variable-length integer arrays of the same lengths, the channel of each spike
  (``0 .. num_units - 1``; 700 for SHD and SSC);
- ``labels``: the class of each sample (SHD: 0-9 English digits, 10-19 German digits);
- ``extra/speaker``: the speaker of each sample;
- ``extra/keys``: the class names, indexed by label (optional for reading).

:func:`read_spike_file` reads and checks one file into a :class:`SpikeSet` (all spikes in two
flat arrays plus per-sample offsets); :meth:`SpikeSet.frames` bins a batch into dense
``(batch, T, num_units)`` spike counts on demand, so a data set of thousands of samples never
lives as a dense ``(N, T, 700)`` array. :func:`write_spike_file` writes the same layout
(atomically), which is how the offline stand-in (:mod:`kcprnn.data.spikes`) and the tests make
files that this loader reads exactly as it reads the released ones.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SHD_FILES",
    "SHD_NUM_UNITS",
    "SpikeFileError",
    "SpikeSet",
    "SpikeSplits",
    "bin_spikes",
    "load_spike_dataset",
    "num_bins",
    "read_spike_file",
    "validation_split",
    "write_spike_file",
]

SHD_NUM_UNITS = 700
"""Channels of the cochlea model behind SHD and SSC."""

SHD_FILES = {
    "shd": {"train": "shd_train.h5", "test": "shd_test.h5"},
    "ssc": {"train": "ssc_train.h5", "valid": "ssc_valid.h5", "test": "ssc_test.h5"},
}
"""The released file names of each data set, by split."""


class SpikeFileError(ValueError):
    """A spike file whose layout or contents are wrong; the message names the file and field."""


# --- binning ---


def num_bins(bin_width: float, max_time: float) -> int:
    """``T = ceil(max_time / bin_width)`` (rounded first, so 1.0 / 0.01 gives 100, not 101)."""
    if not bin_width > 0:
        raise ValueError(f"bin_width must be > 0 seconds, got bin_width={bin_width!r}")
    if not max_time > 0:
        raise ValueError(f"max_time must be > 0 seconds, got max_time={max_time!r}")
    return max(1, math.ceil(round(max_time / bin_width, 9)))


def bin_spikes(
    times: np.ndarray,
    units: np.ndarray,
    *,
    num_units: int = SHD_NUM_UNITS,
    bin_width: float = 0.01,
    max_time: float = 1.0,
) -> np.ndarray:
    """Count the spikes of one sample per time bin and channel.

    Spike ``k`` falls in bin ``floor(times[k] / bin_width)``; spikes at or after ``max_time`` (or
    before 0) are dropped.

    Returns:
        float32 ``(T, num_units)`` counts, ``T = num_bins(bin_width, max_time)``.
    """
    t = num_bins(bin_width, max_time)
    times = np.asarray(times, dtype=np.float64)
    units = np.asarray(units, dtype=np.int64)
    idx = np.floor(times / bin_width).astype(np.int64)
    keep = (times >= 0) & (times < max_time) & (idx < t)
    flat = idx[keep] * num_units + units[keep]
    counts = np.bincount(flat, minlength=t * num_units)
    return counts.reshape(t, num_units).astype(np.float32)  # (t, u)


# --- the in-memory set ---


@dataclass(frozen=True)
class SpikeSet:
    """The samples of one or more spike files.

    Attributes:
        times: float32 spike times (s) of all samples, concatenated.
        units: int16 channels of the same spikes.
        offsets: int64 ``(N + 1,)``; sample ``n`` owns ``times[offsets[n]:offsets[n + 1]]``.
        labels: int64 ``(N,)`` classes.
        speakers: int64 ``(N,)`` speaker ids.
        class_names: the name of each class (``"class-<k>"`` where a file has no keys).
        num_units: channels per sample (700).
        sources: the file each sample came from, as an index into :attr:`files`.
        files: the files read.
    """

    times: np.ndarray
    units: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    speakers: np.ndarray
    class_names: tuple[str, ...]
    num_units: int = SHD_NUM_UNITS
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return self.num_units

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        """Nothing is skipped: a bad file is an error (same attribute as the video sets)."""
        return ()

    def spike_counts(self) -> np.ndarray:
        """Spikes per sample, ``(N,)``."""
        return np.diff(self.offsets)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(times, units)`` of sample ``n``."""
        a, b = self.offsets[n], self.offsets[n + 1]
        return self.times[a:b], self.units[a:b]

    def frames(self, idx: Sequence[int] | np.ndarray, bin_width: float, max_time: float):
        """Binned spike counts of the samples ``idx``: float32 ``(b, T, num_units)``."""
        idx = np.asarray(idx, dtype=np.int64)
        t = num_bins(bin_width, max_time)
        u = self.num_units
        starts, stops = self.offsets[idx], self.offsets[idx + 1]
        lengths = stops - starts
        # the positions of every spike of the batch, and its row in the batch
        pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        row = np.repeat(np.arange(len(idx)), lengths)
        times = self.times[pos].astype(np.float64)
        bins = np.floor(times / bin_width).astype(np.int64)
        keep = (times >= 0) & (times < max_time) & (bins < t)
        flat = (row[keep] * t + bins[keep]) * u + self.units[pos][keep]
        counts = np.bincount(flat, minlength=len(idx) * t * u)
        return counts.reshape(len(idx), t, u).astype(np.float32)  # (b, t, u)

    def subset(self, idx: Sequence[int] | np.ndarray) -> SpikeSet:
        """A new set of the samples ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.offsets[idx + 1] - self.offsets[idx]
        pos = np.repeat(self.offsets[idx] - np.cumsum(lengths) + lengths, lengths) + np.arange(
            lengths.sum()
        )
        return SpikeSet(
            self.times[pos],
            self.units[pos],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.labels[idx],
            self.speakers[idx],
            self.class_names,
            self.num_units,
            self.sources[idx] if len(self.sources) else self.sources,
            self.files,
        )

    @staticmethod
    def concatenate(sets: Sequence[SpikeSet]) -> SpikeSet:
        """One set holding ``sets`` one after the other (same classes and channels)."""
        first = sets[0]
        for s in sets[1:]:
            if s.num_units != first.num_units:
                raise ValueError(
                    f"cannot join spike sets with {first.num_units} and {s.num_units} channels"
                )
        offsets, sources, base, file_base = [np.zeros(1, dtype=np.int64)], [], 0, 0
        for s in sets:
            offsets.append(s.offsets[1:] + base)
            base += s.offsets[-1]
            sources.append(s.sources + file_base)
            file_base += len(s.files)
        return SpikeSet(
            np.concatenate([s.times for s in sets]),
            np.concatenate([s.units for s in sets]),
            np.concatenate(offsets),
            np.concatenate([s.labels for s in sets]),
            np.concatenate([s.speakers for s in sets]),
            max((s.class_names for s in sets), key=len),
            first.num_units,
            np.concatenate(sources),
            tuple(f for s in sets for f in s.files),
        )


# --- reading and writing ---


def _field(f: Any, name: str, path: Path) -> Any:
    if name not in f:
        present = sorted(_walk(f))
        raise SpikeFileError(f"{path}: missing field {name!r} (the file holds {present})")
    return f[name]


def _walk(group: Any, prefix: str = "") -> list[str]:
    names = []
    for key, item in group.items():
        name = f"{prefix}{key}"
        names += _walk(item, name + "/") if hasattr(item, "items") else [name]
    return names


def _vlen_field(f: Any, name: str, path: Path) -> list[np.ndarray]:
    ds = _field(f, name, path)
    if not hasattr(ds, "shape") or ds.ndim != 1:
        raise SpikeFileError(
            f"{path}: field {name!r} must be a 1-D dataset of variable-length arrays"
        )
    values = ds[()]
    if values.dtype != object:
        raise SpikeFileError(
            f"{path}: field {name!r} must hold variable-length arrays (one per sample), "
            f"got a dataset of {values.dtype}"
        )
    return list(values)


def _int_field(f: Any, name: str, path: Path, n: int) -> np.ndarray:
    ds = _field(f, name, path)
    if not hasattr(ds, "shape") or ds.ndim != 1:
        raise SpikeFileError(f"{path}: field {name!r} must be a 1-D dataset")
    values = ds[()]
    if not np.issubdtype(values.dtype, np.integer):
        raise SpikeFileError(f"{path}: field {name!r} must hold integers, got {values.dtype}")
    if len(values) != n:
        raise SpikeFileError(
            f"{path}: field {name!r} has {len(values)} entries but spikes/times has {n} samples"
        )
    return values.astype(np.int64)


def read_spike_file(path: str | os.PathLike, num_units: int = SHD_NUM_UNITS) -> SpikeSet:
    """Read and check one SHD/SSC-layout HDF5 file.

    Raises:
        FileNotFoundError: no file at ``path``.
        SpikeFileError: not HDF5, a missing or wrongly shaped field, arrays of mismatched
            lengths, units outside ``0 .. num_units - 1``, negative or non-finite times,
            negative labels; the message names the file and the field.
    """
    import h5py  # optional dependency: the `experiments` extra

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spike file {str(path)!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise SpikeFileError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        times = _vlen_field(f, "spikes/times", path)
        units = _vlen_field(f, "spikes/units", path)
        n = len(times)
        if len(units) != n:
            raise SpikeFileError(
                f"{path}: field 'spikes/units' has {len(units)} samples but 'spikes/times' has {n}"
            )
        labels = _int_field(f, "labels", path, n)
        speakers = _int_field(f, "extra/speaker", path, n)
        keys = None
        if "extra/keys" in f:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["extra/keys"][()]]
    lengths = np.array([len(t) for t in times], dtype=np.int64)
    for k, (t, u) in enumerate(zip(times, units, strict=True)):
        if len(u) != len(t):
            raise SpikeFileError(
                f"{path}: sample {k} has {len(t)} spike times (spikes/times) but {len(u)} "
                f"units (spikes/units)"
            )
    flat_t = np.concatenate(times).astype(np.float32) if n else np.zeros(0, np.float32)
    flat_u = np.concatenate(units) if n else np.zeros(0, np.int64)
    if n and not np.issubdtype(flat_u.dtype, np.integer):
        raise SpikeFileError(f"{path}: field 'spikes/units' must hold integers, got {flat_u.dtype}")
    if len(flat_u) and (flat_u.min() < 0 or flat_u.max() >= num_units):
        bad = int(flat_u[(flat_u < 0) | (flat_u >= num_units)][0])
        sample = int(np.searchsorted(np.cumsum(lengths), np.argmax(flat_u == bad), side="right"))
        raise SpikeFileError(
            f"{path}: field 'spikes/units' holds unit {bad} (sample {sample}) outside "
            f"0..{num_units - 1}"
        )
    if len(flat_t) and not (np.isfinite(flat_t).all() and flat_t.min() >= 0):
        raise SpikeFileError(f"{path}: field 'spikes/times' holds negative or non-finite times")
    if n and labels.min() < 0:
        raise SpikeFileError(f"{path}: field 'labels' holds a negative label {labels.min()}")
    num_classes = int(labels.max()) + 1 if n else 0
    if keys is not None:
        if len(keys) < num_classes:
            raise SpikeFileError(
                f"{path}: field 'extra/keys' names {len(keys)} classes but 'labels' goes up "
                f"to {num_classes - 1}"
            )
        names = tuple(keys)
    else:
        names = tuple(f"class-{k}" for k in range(num_classes))
    return SpikeSet(
        flat_t,
        flat_u.astype(np.int16),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        labels,
        speakers,
        names,
        num_units,
        np.zeros(n, dtype=np.int64),
        (str(path),),
    )


def write_spike_file(
    path: str | os.PathLike,
    times: Sequence[np.ndarray],
    units: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    speakers: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write samples in the SHD layout (float32 times, uint16 units, uint16 labels and
    speakers, byte-string keys); written to a temporary file and moved into place, so a reader
    never sees a half-written file. ``attrs`` go to the root's HDF5 attributes."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        # track_order off and no timestamps: identical inputs give identical bytes
        with h5py.File(tmp, "w", track_order=False) as f:
            float_t = h5py.vlen_dtype(np.float32)
            int_t = h5py.vlen_dtype(np.uint16)
            n = len(times)
            ds_t = f.create_dataset("spikes/times", (n,), dtype=float_t, track_times=False)
            ds_u = f.create_dataset("spikes/units", (n,), dtype=int_t, track_times=False)
            for k in range(n):
                ds_t[k] = np.asarray(times[k], dtype=np.float32)
                ds_u[k] = np.asarray(units[k], dtype=np.uint16)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.uint16), track_times=False)
            f.create_dataset(
                "extra/speaker", data=np.asarray(speakers, dtype=np.uint16), track_times=False
            )
            f.create_dataset(
                "extra/keys",
                data=np.array([s.encode() for s in class_names], dtype=object),
                dtype=h5py.string_dtype("ascii"),
                track_times=False,
            )
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- splits ---


def validation_split(
    labels: np.ndarray,
    speakers: np.ndarray,
    fraction: float,
    seed: int,
    by_speaker: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Split training samples into ``(train_idx, valid_idx)``.

    ``by_speaker=False``: ``round(fraction * N)`` samples drawn at random, stratified: every
    class gives the same share (up to one sample).
    ``by_speaker=True``: whole speakers, ``round(fraction * speakers)`` of them (at least one and
    at least one left for training), chosen at random; this mimics a held-out-speaker test set.
    """
    labels = np.asarray(labels)
    speakers = np.asarray(speakers)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    if by_speaker:
        ids = np.unique(speakers)
        if len(ids) < 2:
            raise ValueError(
                f"a speaker-wise validation split needs at least 2 speakers, got {ids.tolist()}"
            )
        k = min(max(1, round(fraction * len(ids))), len(ids) - 1)
        held = rng.choice(ids, size=k, replace=False)
        mask = np.isin(speakers, held)
    else:
        # stratified: each sample's key is (its place in a random order of its class + U(0, 1))
        # / class size; the round(fraction * N) smallest keys take the same share of every class
        # (up to one sample), also when classes are smaller than 1 / fraction
        key = np.empty(len(labels))
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            place = rng.permutation(len(members))
            key[members] = (place + rng.uniform(size=len(members))) / len(members)
        k = min(max(1, round(fraction * len(labels))), len(labels) - 1)
        mask = np.zeros(len(labels), dtype=bool)
        mask[np.argsort(key, kind="stable")[:k]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


@dataclass(frozen=True)
class SpikeSplits:
    """One :class:`SpikeSet` with all samples and the index arrays of each split."""

    data: SpikeSet
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def load_spike_dataset(
    data_dir: str | os.PathLike,
    name: str = "shd",
    *,
    valid_fraction: float = 0.1,
    valid_by_speaker: bool = False,
    seed: int = 0,
) -> SpikeSplits:
    """Read the released files of ``name`` (``"shd"`` or ``"ssc"``) from ``data_dir``.

    The released train/test split is kept: for SHD the two speakers that appear only in
    ``shd_test.h5`` stay in the test split. The validation split is ``ssc_valid.h5`` for SSC, and
    for SHD a share ``valid_fraction`` of the training file (:func:`validation_split`; whole
    speakers with ``valid_by_speaker``). ``valid_fraction=0`` gives SHD no validation split.
    """
    if name not in SHD_FILES:
        raise ValueError(f"spike data set must be one of {sorted(SHD_FILES)}, got {name!r}")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"spike data folder {str(folder)!r} does not exist")
    files = SHD_FILES[name]
    missing = [f for f in files.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r} lacks {missing} (the {name.upper()} files)")
    parts = {split: read_spike_file(folder / fname) for split, fname in files.items()}
    order = list(parts)
    data = SpikeSet.concatenate([parts[s] for s in order])
    starts = np.concatenate([[0], np.cumsum([len(parts[s]) for s in order])])
    ranges = {s: np.arange(starts[k], starts[k + 1]) for k, s in enumerate(order)}
    train = ranges["train"]
    if "valid" in ranges:
        valid = ranges["valid"]
    elif valid_fraction > 0:
        keep, held = validation_split(
            data.labels[train], data.speakers[train], valid_fraction, seed, valid_by_speaker
        )
        train, valid = train[keep], train[held]
    else:
        valid = np.zeros(0, dtype=np.int64)
    return SpikeSplits(data, train, valid, ranges["test"])
