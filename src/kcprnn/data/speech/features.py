"""Log-mel filterbank features for the speech experiments, cached on disk.

A frame is ``n_mels`` log mel-filterbank energies (librosa's mel filters over a ``torch.stft``
power spectrum; 25 ms Hann windows every 10 ms by default), optionally the frame's log energy,
and optionally their first and second time derivatives (deltas and delta-deltas, the HTK
regression over +-2 frames). TIMIT's usual 123-dimensional frame is 40 bands + energy with deltas
and delta-deltas; TED-LIUM models usually read 80 bands.

:func:`extract_features` computes the features of a list of utterances once and keeps them in a
cache folder keyed by the feature parameters and by the source files (path, size, modification
time and the time span read): ``features.npy`` (all frames, float16, concatenated),
``lengths.npy`` and ``index.json``. Normalization (:func:`normalize`) is applied after loading,
with statistics of the training utterances (``"global"``) or of each speaker's own utterances
(``"speaker"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .._io import load_npy, save_npy_atomic
from .audio import CorruptAudioError, read_audio

__all__ = [
    "NORMALIZATIONS",
    "FeatureSpec",
    "FeatureStore",
    "compute_features",
    "deltas",
    "extract_features",
    "normalize",
]

log = logging.getLogger(__name__)

NORMALIZATIONS = ("global", "speaker", "none")


@dataclass(frozen=True)
class FeatureSpec:
    """Feature parameters (all part of the cache key).

    Args:
        n_mels: mel bands.
        energy: append the frame's log energy.
        deltas: append first and second time derivatives (3x the size).
        sample_rate: audio is resampled to this rate first.
        win_ms, hop_ms: analysis window and hop in milliseconds.
        n_fft: FFT size (>= the window in samples).
        preemphasis: first-order pre-emphasis coefficient (0 = none).
        fmin, fmax: the filterbank's frequency range in Hz (fmax 0 = Nyquist).
    """

    n_mels: int = 40
    energy: bool = True
    deltas: bool = True
    sample_rate: int = 16000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    preemphasis: float = 0.97
    fmin: float = 0.0
    fmax: float = 0.0

    def __post_init__(self) -> None:
        if self.n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, got n_mels={self.n_mels}")
        if self.win_samples > self.n_fft:
            raise ValueError(
                f"the window ({self.win_samples} samples) is longer than n_fft={self.n_fft}"
            )
        if self.hop_samples < 1:
            raise ValueError(f"hop_ms={self.hop_ms} is shorter than one sample")

    @property
    def win_samples(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000.0))

    @property
    def hop_samples(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000.0))

    @property
    def group(self) -> int:
        """Values per derivative order: the mel bands, then the log energy."""
        return self.n_mels + int(self.energy)

    @property
    def dim(self) -> int:
        """Values per frame."""
        return self.group * (3 if self.deltas else 1)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@lru_cache(maxsize=8)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    import librosa.filters

    return librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax or None
    ).astype(np.float32)  # (m, n_fft // 2 + 1)


def deltas(x: np.ndarray, width: int = 2) -> np.ndarray:
    r"""Time derivative of ``x`` ``(T, D)`` by the HTK regression
    :math:`d_t = \sum_{n=1}^{N} n (x_{t+n} - x_{t-n}) / (2 \sum_n n^2)`, the edges repeated."""
    padded = np.pad(x, ((width, width), (0, 0)), mode="edge")
    t = len(x)
    out = np.zeros_like(x)
    for n in range(1, width + 1):
        out += n * (padded[width + n : width + n + t] - padded[width - n : width - n + t])
    return out / (2 * sum(n * n for n in range(1, width + 1)))


def compute_features(audio: np.ndarray, sample_rate: int, spec: FeatureSpec) -> np.ndarray:
    """Features of one waveform: float32 ``(T, spec.dim)``, ``T = 1 + len // hop`` at
    ``spec.sample_rate``."""
    x = np.asarray(audio, dtype=np.float32)
    if sample_rate != spec.sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(sample_rate), spec.sample_rate)
        x = resample_poly(x, spec.sample_rate // g, int(sample_rate) // g).astype(np.float32)
    if spec.preemphasis:
        x = np.concatenate([x[:1], x[1:] - spec.preemphasis * x[:-1]])
    if len(x) < spec.n_fft:
        x = np.pad(x, (0, spec.n_fft - len(x)))
    window = torch.hann_window(spec.win_samples)
    stft = torch.stft(
        torch.from_numpy(x),
        n_fft=spec.n_fft,
        hop_length=spec.hop_samples,
        win_length=spec.win_samples,
        window=window,
        center=True,
        return_complex=True,
    )  # (f, T)
    power = stft.abs().square().numpy().T  # (T, f)
    mel = _mel_filters(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)
    feats = np.log(np.maximum(power @ mel.T, 1e-10))  # (T, m)
    if spec.energy:
        energy = np.log(np.maximum(power.sum(axis=1, keepdims=True), 1e-10))
        feats = np.concatenate([feats, energy], axis=1)
    if spec.deltas:
        d1 = deltas(feats)
        feats = np.concatenate([feats, d1, deltas(d1)], axis=1)
    return feats.astype(np.float32)


@dataclass(frozen=True)
class FeatureStore:
    """Cached features of utterances: ``frames(i)`` is utterance ``i``'s ``(T, D)`` array.
    ``uids`` lists the utterances kept; ``skipped`` the ``(file, reason)`` of those whose audio
    could not be read."""

    features: np.ndarray  # (total frames, D) float16
    offsets: np.ndarray  # (n + 1,) int64
    uids: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]

    def frames(self, i: int) -> np.ndarray:
        return np.asarray(self.features[self.offsets[i] : self.offsets[i + 1]], dtype=np.float32)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


AudioSource = tuple[str, float, float]
"""``(file, start seconds, stop seconds)``; ``stop < 0`` reads to the end."""


def _read_source(source: AudioSource) -> tuple[np.ndarray, int]:
    path, t0, t1 = source
    if t0 <= 0 and t1 < 0:
        return read_audio(path)
    import soundfile as sf

    from .audio import read_sphere_header

    header = read_sphere_header(path)
    rate = int(header["sample_rate"]) if header else int(sf.info(str(path)).samplerate)
    return read_audio(path, int(round(t0 * rate)), int(round(t1 * rate)) if t1 >= 0 else None)


def _source_key(source: AudioSource) -> list:
    st = os.stat(source[0])
    return [str(Path(source[0]).resolve()), st.st_size, st.st_mtime_ns, source[1], source[2]]


def extract_features(
    uids: Sequence[str],
    sources: Sequence[AudioSource],
    spec: FeatureSpec,
    cache_dir: str | os.PathLike,
    name: str = "speech",
    progress: Callable[[int, int], None] | None = None,
) -> FeatureStore:
    """Features of the utterances ``uids`` read from ``sources``, computed once and cached in
    ``cache_dir/speech-features/<name>-<key>``. Files that cannot be read (truncated, corrupt,
    missing) are skipped with a warning naming the file and listed in ``skipped``."""
    if len(uids) != len(sources):
        raise ValueError(f"{len(uids)} utterance ids but {len(sources)} audio sources")
    digest = hashlib.sha256(
        json.dumps([spec.key(), list(uids), [_safe_key(s) for s in sources]]).encode()
    ).hexdigest()[:16]
    folder = Path(cache_dir) / "speech-features" / f"{name}-{digest}"
    if (folder / "index.json").is_file():
        index = json.loads((folder / "index.json").read_text())
        return FeatureStore(
            load_npy(folder / "features.npy", mmap=True),
            load_npy(folder / "offsets.npy"),
            tuple(index["uids"]),
            tuple((p, r) for p, r in index["skipped"]),
        )
    kept, skipped, chunks = [], [], []
    for i, (uid, source) in enumerate(zip(uids, sources, strict=True)):
        try:
            audio, rate = _read_source(source)
        except (CorruptAudioError, FileNotFoundError) as exc:
            log.warning("skipped utterance %s: %s", source[0], exc)
            skipped.append((str(source[0]), str(exc)))
            continue
        chunks.append(compute_features(audio, rate, spec).astype(np.float16))
        kept.append(uid)
        if progress is not None:
            progress(i + 1, len(uids))
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features = np.concatenate(chunks) if chunks else np.zeros((0, spec.dim), np.float16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_npy_atomic(tmp / "features.npy", features)
        save_npy_atomic(tmp / "offsets.npy", offsets)
        index = {"spec": json.loads(spec.key()), "uids": kept, "skipped": skipped}
        (tmp / "index.json").write_text(json.dumps(index))
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return FeatureStore(features, offsets, tuple(kept), tuple((p, r) for p, r in skipped))


def _safe_key(source: AudioSource) -> list:
    try:
        return _source_key(source)
    except OSError:
        return [str(source[0]), None, None, source[1], source[2]]


def normalize(
    frames: Sequence[np.ndarray],
    speakers: Sequence[str],
    train: Sequence[bool],
    mode: str = "global",
) -> list[np.ndarray]:
    """Mean and variance normalization of each utterance's ``(T, D)`` frames.

    ``"global"``: one mean and standard deviation per dimension over all training frames;
    ``"speaker"``: each speaker's own statistics over all of that speaker's frames (training or
    not: no labels are used); ``"none"``: unchanged.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {mode!r}")
    if mode == "none" or not frames:
        return [np.asarray(f, dtype=np.float32) for f in frames]
    groups: dict[str, list[int]] = {}
    if mode == "global":
        groups["*"] = [i for i, t in enumerate(train) if t]
        if not groups["*"]:
            raise ValueError("global normalization needs at least one training utterance")
    else:
        for i, s in enumerate(speakers):
            groups.setdefault(s, []).append(i)
    stats = {}
    for g, idx in groups.items():
        stacked = np.concatenate([np.asarray(frames[i], dtype=np.float64) for i in idx])
        stats[g] = (stacked.mean(0), np.maximum(stacked.std(0), 1e-5))
    out = []
    for i, f in enumerate(frames):
        mean, std = stats["*" if mode == "global" else speakers[i]]
        out.append(((np.asarray(f, dtype=np.float64) - mean) / std).astype(np.float32))
    return out


def warp_bands(x: torch.Tensor, n_bands: int, group: int, factors: torch.Tensor) -> torch.Tensor:
    """Mel bands resampled along frequency, one warp factor per utterance (a VTLP-like
    augmentation: a speaker's vocal tract length scales the positions of its formants).

    The last axis of ``x`` ``(b, t, d)`` holds ``d / group`` groups (stacked frames, derivative
    orders) of ``group`` values whose first ``n_bands`` are the mel bands; the rest (the log
    energy) are kept. Utterance ``i``'s band ``j`` takes the value at position
    ``min(j * factors[i], n_bands - 1)``, linearly interpolated between neighbouring bands: a
    factor above 1 moves the spectrum down in frequency, below 1 up. Deltas are linear in time,
    so warping them equals the deltas of the warped bands.
    """
    b, t, d = x.shape
    if n_bands < 1 or group < n_bands or d % group:
        raise ValueError(
            f"cannot warp {n_bands} bands in groups of {group} values: a frame holds {d} values"
        )
    if factors.shape != (b,):
        raise ValueError(f"need one warp factor per utterance ({b}), got {tuple(factors.shape)}")
    v = x.reshape(b, t, d // group, group)
    pos = torch.arange(n_bands, dtype=x.dtype, device=x.device) * factors[:, None].to(x)
    pos = pos.clamp(0, n_bands - 1)  # (b, n_bands)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_bands - 1)
    w = (pos - lo).view(b, 1, 1, n_bands)
    shape = (b, t, d // group, n_bands)
    bands = v[..., :n_bands]
    low = bands.gather(-1, lo.view(b, 1, 1, n_bands).expand(shape))
    high = bands.gather(-1, hi.view(b, 1, 1, n_bands).expand(shape))
    return torch.cat([low + (high - low) * w, v[..., n_bands:]], -1).reshape(b, t, d)


def tilt_bands(
    x: torch.Tensor,
    n_bands: int,
    group: int,
    orders: int,
    slopes: torch.Tensor,
    curvatures: torch.Tensor,
) -> torch.Tensor:
    """Static mel bands offset by a smooth curve over frequency, one per utterance (a spectral
    tilt augmentation: a voice, a microphone or a synthesizer that lifts the high bands against
    the low ones, or the middle against both ends).

    ``x`` ``(b, t, d)`` is laid out as for :func:`warp_bands`, its groups running over the
    stacked frames and, within a frame, over ``orders`` derivative orders (3 with deltas, 1
    without), the static values first. Utterance ``i``'s static band ``j`` of every frame gets
    ``slopes[i] * u_j + curvatures[i] * (u_j ** 2 - 1 / 3)``, ``u`` running evenly from -1 (the
    lowest band) to 1 (the highest). The deltas do not change (a constant offset has none), nor
    does the log energy.
    """
    b, t, d = x.shape
    if n_bands < 1 or group < n_bands or orders < 1 or d % (group * orders):
        raise ValueError(
            f"cannot tilt {n_bands} bands in groups of {group} values and {orders} orders: a "
            f"frame holds {d} values"
        )
    for name, v in (("slope", slopes), ("curvature", curvatures)):
        if v.shape != (b,):
            raise ValueError(f"need one {name} per utterance ({b}), got {tuple(v.shape)}")
    u = torch.linspace(-1, 1, n_bands, dtype=x.dtype, device=x.device)  # (n_bands,)
    offset = slopes[:, None].to(x) * u + curvatures[:, None].to(x) * (u**2 - 1 / 3)  # (b, n_bands)
    out = x.reshape(b, t, d // group, group).clone()
    out[:, :, ::orders, :n_bands] += offset[:, None, None, :]
    return out.reshape(b, t, d)
