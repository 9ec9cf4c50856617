"""An offline SHD stand-in: synthetic spoken digits, a cochlea-like spike encoder, SHD's files.

**Speech.** English (``zero`` .. ``nine``, labels 0-9) and German (``null`` .. ``neun``, labels
10-19) digits are synthesized with the ``espeak-ng`` program (Debian package ``espeak-ng``).
A *speaker* is one espeak-ng voice variant with its own base pitch and speaking rate; every
utterance jitters pitch, rate and loudness around the speaker's values, starts after a random
silence and gets a little white noise. As in SHD, 12 speakers, 2 of which appear only in the
test file; the test file also holds a share of the other speakers' utterances.

**Encoder** (:func:`encode_spikes`, parameters :class:`EncoderSpec`), a cheap stand-in for the
cochlea model behind SHD (basilar membrane, hair cells, bushy cells):

1. the waveform is normalised to unit RMS;
2. short-time power spectrum: Hann window of ``window`` s, hop ``hop`` s (1 ms);
3. ``num_channels`` (700) overlapping band-pass channels, the centres equally spaced on the
   ERB-rate scale ``E(f) = 21.4 log10(1 + 0.00437 f)`` between ``f_min`` and ``f_max`` (so
   logarithmic above ~500 Hz, like the cochlea's place map), each a triangle in frequency whose
   half-width is the equivalent rectangular bandwidth ``ERB(f) = 24.7 (0.00437 f + 1)`` Hz
   (at least one FFT bin), normalised to unit sum;
4. level in dB, relative to the loudest channel and frame of the utterance; the ``dynamic_range``
   dB below it map linearly to a drive in [0, 1], anything quieter to 0;
5. one leaky integrate-and-fire neuron per channel: ``dv/dt = -v / tau + max_rate * drive``,
   a spike when ``v`` reaches 1 and then ``v <- v - 1``; the spike time is interpolated
   within the hop. The leak silences channels whose drive stays below ``1 / (max_rate tau)``.

The defaults (``max_rate`` 150 /s, ``dynamic_range`` 50 dB) give about 8,300 spikes per
utterance on the default stand-in, near the density of the Heidelberg cochlea model (the
``lauscher`` package) on the same kind of espeak-ng digit: about 8,500 spikes over all 700
channels for a 0.74 s utterance.

:func:`make_shd_like` writes ``shd_train.h5`` and ``shd_test.h5`` in SHD's layout
(:func:`~kcprnn.data.shd.write_spike_file`); :func:`shd_like_dir` caches them in a folder keyed
by every generator parameter and returns it, so :func:`~kcprnn.data.shd.load_spike_dataset`
reads the stand-in exactly as it reads the released data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._io import default_cache_dir
from .shd import SHD_FILES, SHD_NUM_UNITS, write_spike_file

__all__ = [
    "ENGLISH_DIGITS",
    "GERMAN_DIGITS",
    "SHD_LIKE_CLASSES",
    "EncoderSpec",
    "SpikeStandInSpec",
    "encode_spikes",
    "erb_filterbank",
    "espeak_available",
    "make_shd_like",
    "shd_like_dir",
    "synthesize",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Bumped whenever synthesis or encoding changes, so that stale caches are not reused."""

ENGLISH_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GERMAN_DIGITS = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
SHD_LIKE_CLASSES = tuple(f"english-{w}" for w in ENGLISH_DIGITS) + tuple(
    f"german-{w}" for w in ENGLISH_DIGITS
)
"""Class names by label, as in SHD: 0-9 English digits, 10-19 German digits."""

# (variant, base pitch 0-99, base words per minute) of each speaker; the last ones are the
# held-out (test-only) speakers by default.
SPEAKER_VOICES = (
    ("m1", 40, 165),
    ("f1", 60, 155),
    ("m2", 35, 175),
    ("f2", 65, 150),
    ("m3", 45, 160),
    ("f3", 55, 170),
    ("m4", 30, 150),
    ("f4", 70, 165),
    ("m5", 50, 180),
    ("f5", 62, 160),
    ("m6", 42, 155),
    ("m7", 52, 170),
)


# --- encoder ---


@dataclass(frozen=True)
class EncoderSpec:
    """Parameters of :func:`encode_spikes` (see the module docstring).

    Attributes:
        num_channels: band-pass channels (spike units); 700 as in SHD.
        f_min, f_max: centre frequencies of the first and last channel (Hz); ``f_max`` is capped
            below the Nyquist frequency of the audio.
        window: STFT window length (s).
        hop: STFT hop and neuron time step (s).
        dynamic_range: dB below the utterance's loudest channel and frame that still drive the
            neurons.
        max_rate: input gain of the neurons (1/s): a channel at full drive fires at about this
            rate.
        tau: membrane time constant (s).
    """

    num_channels: int = SHD_NUM_UNITS
    f_min: float = 100.0
    f_max: float = 8000.0
    window: float = 0.025
    hop: float = 0.001
    dynamic_range: float = 50.0
    max_rate: float = 150.0
    tau: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {self.num_channels!r}")
        if not 0 < self.f_min < self.f_max:
            raise ValueError(f"need 0 < f_min < f_max, got f_min={self.f_min}, f_max={self.f_max}")
        for name in ("window", "hop", "dynamic_range", "max_rate", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")


def erb_rate(f: np.ndarray | float) -> np.ndarray:
    """Glasberg and Moore's ERB-rate scale (number of ERBs below ``f`` Hz)."""
    return 21.4 * np.log10(1.0 + 0.00437 * np.asarray(f, dtype=np.float64))


def erb_rate_inverse(e: np.ndarray) -> np.ndarray:
    return (10.0 ** (np.asarray(e) / 21.4) - 1.0) / 0.00437


def channel_frequencies(spec: EncoderSpec, sample_rate: float) -> np.ndarray:
    """Centre frequency (Hz) of every channel, ``(num_channels,)``, equally spaced in ERB-rate."""
    f_max = min(spec.f_max, 0.95 * sample_rate / 2)
    if f_max <= spec.f_min:
        raise ValueError(f"sample rate {sample_rate} Hz leaves no band above f_min={spec.f_min} Hz")
    e = np.linspace(erb_rate(spec.f_min), erb_rate(f_max), spec.num_channels)
    return erb_rate_inverse(e)


def erb_filterbank(spec: EncoderSpec, sample_rate: float, n_fft: int) -> np.ndarray:
    """Triangular ERB-wide filters on the ``n_fft // 2 + 1`` FFT bins, each summing to 1:
    ``(num_channels, bins)``."""
    centres = channel_frequencies(spec, sample_rate)  # (c,)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # (k,)
    width = np.maximum(24.7 * (0.00437 * centres + 1.0), sample_rate / n_fft)  # (c,)
    weights = np.clip(1.0 - np.abs(bins[None, :] - centres[:, None]) / width[:, None], 0, None)
    return weights / weights.sum(axis=1, keepdims=True)  # (c, k)


def power_spectrogram(
    audio: np.ndarray, sample_rate: float, window: float, hop: float
) -> tuple[np.ndarray, float]:
    """``(frames, bins)`` power of the Hann-windowed STFT and the hop actually used (s); frame
    ``k`` is centred at ``k * hop``."""
    win = max(2, round(window * sample_rate))
    step = max(1, round(hop * sample_rate))
    n_fft = 1 << (win - 1).bit_length()
    padded = np.pad(audio, (win // 2, win // 2 + step))
    count = 1 + (len(padded) - win) // step
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::step][:count]  # (t, w)
    spectrum = np.fft.rfft(frames * np.hanning(win), n=n_fft, axis=1)  # (t, k)
    return (spectrum.real**2 + spectrum.imag**2).astype(np.float64), step / sample_rate


def encode_spikes(
    audio: np.ndarray, sample_rate: float, spec: EncoderSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encode mono audio into spikes (see the module docstring for the model).

    Args:
        audio: ``(samples,)`` waveform.
        sample_rate: its sample rate (Hz).
        spec: encoder parameters (default :class:`EncoderSpec`).

    Returns:
        ``(times, units)``: float32 spike times (s), ascending, and int64 channels.
    """
    spec = spec or EncoderSpec()
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1 or len(audio) == 0:
        raise ValueError(f"audio must be a non-empty 1-D waveform, got shape {audio.shape}")
    rms = np.sqrt(np.mean(audio**2))
    if rms == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    power, dt = power_spectrogram(audio / rms, sample_rate, spec.window, spec.hop)  # (t, k)
    n_fft = 2 * (power.shape[1] - 1)
    bands = power @ erb_filterbank(spec, sample_rate, n_fft).T  # (t, c)
    level = 10.0 * np.log10(bands + 1e-12)
    drive = np.clip(1.0 + (level - level.max()) / spec.dynamic_range, 0.0, None)  # (t, c)
    decay = np.exp(-dt / spec.tau)
    gain = spec.max_rate * dt
    v = np.zeros(spec.num_channels)
    times, units = [], []
    for k in range(drive.shape[0]):
        v_prev = v * decay
        v = v_prev + gain * drive[k]
        fired = np.flatnonzero(v >= 1.0)
        while len(fired):
            # linear interpolation of the crossing within the step
            frac = (1.0 - v_prev[fired]) / (v[fired] - v_prev[fired])
            times.append((k + np.clip(frac, 0.0, 1.0)) * dt)
            units.append(fired)
            v[fired] -= 1.0
            v_prev[fired] -= 1.0
            fired = fired[v[fired] >= 1.0]
    if not times:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    t = np.concatenate(times)
    u = np.concatenate(units)
    order = np.lexsort((u, t))
    return t[order].astype(np.float32), u[order].astype(np.int64)


# --- speech ---


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` program is on the PATH."""
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str, pitch: int, speed: int) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng (``-v voice -p pitch -s speed``); returns float waveform in
    [-1, 1] and its sample rate."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            "the espeak-ng program is needed for the SHD stand-in; install the Debian package "
            "'espeak-ng' (make system-deps does)"
        )
    result = subprocess.run(
        [exe, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for {text!r} ({voice}): {result.stderr.decode()}")
    # espeak-ng writes a WAV whose size fields are left open on a pipe: read the frames directly
    with wave.open(io.BytesIO(result.stdout)) as w:
        rate, width = w.getframerate(), w.getsampwidth()
        raw = w.readframes(len(result.stdout))
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit audio, expected 16-bit")
    audio = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.float64) / 32768.0
    return audio, rate


# --- the stand-in ---


@dataclass(frozen=True)
class SpikeStandInSpec:
    """What :func:`make_shd_like` generates.

    Attributes:
        repeats: utterances per speaker and class.
        classes: generate only the first ``classes`` labels (20: all; fewer for quick checks).
        speakers: number of speakers (at most 12 voices are defined).
        test_speakers: speakers that appear only in the test file (the last ones).
        test_fraction: share of each training speaker's utterances that go to the test file.
        pitch_jitter, speed_jitter: per-utterance jitter of espeak pitch (0-99 scale) and rate
            (fraction of the speaker's words per minute), uniform in +-jitter.
        max_onset: silence before each utterance, uniform in [0, max_onset] s.
        noise: white noise RMS relative to the utterance's RMS.
        seed: everything random is drawn from this seed.
        encoder: the spike encoder's parameters.
    """

    repeats: int = 6
    classes: int = len(SHD_LIKE_CLASSES)
    speakers: int = 12
    test_speakers: int = 2
    test_fraction: float = 0.2
    pitch_jitter: float = 8.0
    speed_jitter: float = 0.12
    max_onset: float = 0.15
    noise: float = 0.05
    seed: int = 0
    encoder: EncoderSpec = field(default_factory=EncoderSpec)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # from JSON
            object.__setattr__(self, "encoder", EncoderSpec(**self.encoder))
        if not 1 <= self.speakers <= len(SPEAKER_VOICES):
            raise ValueError(
                f"speakers must lie in 1..{len(SPEAKER_VOICES)}, got speakers={self.speakers}"
            )
        if not 0 <= self.test_speakers < self.speakers:
            raise ValueError(
                f"test_speakers must lie in 0..speakers-1, got test_speakers={self.test_speakers}"
                f" with speakers={self.speakers}"
            )
        if not 1 <= self.classes <= len(SHD_LIKE_CLASSES):
            raise ValueError(
                f"classes must lie in 1..{len(SHD_LIKE_CLASSES)}, got classes={self.classes}"
            )
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be a positive int, got repeats={self.repeats!r}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in [0, 1), got {self.test_fraction}")

    def key(self) -> str:
        """A short hash of every parameter and the generator version (the cache folder name)."""
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _utterance(
    rng: np.random.Generator, spec: SpikeStandInSpec, speaker: int, label: int
) -> tuple[np.ndarray, np.ndarray]:
    variant, pitch, speed = SPEAKER_VOICES[speaker]
    english = label < 10
    word = (ENGLISH_DIGITS if english else GERMAN_DIGITS)[label % 10]
    p = int(np.clip(round(pitch + rng.uniform(-spec.pitch_jitter, spec.pitch_jitter)), 0, 99))
    s = int(round(speed * (1 + rng.uniform(-spec.speed_jitter, spec.speed_jitter))))
    audio, rate = synthesize(word, f"{'en' if english else 'de'}+{variant}", p, s)
    audio = np.concatenate([np.zeros(int(rng.uniform(0, spec.max_onset) * rate)), audio])
    rms = np.sqrt(np.mean(audio**2)) or 1.0
    audio = audio + spec.noise * rms * rng.standard_normal(len(audio))
    return encode_spikes(audio, rate, spec.encoder)


def make_shd_like(spec: SpikeStandInSpec, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Generate the stand-in and write ``shd_train.h5`` and ``shd_test.h5`` into ``out_dir``.

    Deterministic in ``spec``: every utterance draws its jitter from its own seed
    ``(spec.seed, speaker, label, repeat)``. Returns the paths by split.
    """
    out = Path(out_dir)
    test_ids = set(range(spec.speakers - spec.test_speakers, spec.speakers))
    parts: dict[str, dict[str, list]] = {
        s: {"times": [], "units": [], "labels": [], "speakers": []} for s in ("train", "test")
    }
    split_rng = np.random.default_rng([spec.seed, 1])
    for speaker in range(spec.speakers):
        for label in range(spec.classes):
            held = split_rng.uniform(size=spec.repeats) < spec.test_fraction
            for r in range(spec.repeats):
                rng = np.random.default_rng([spec.seed, speaker, label, r])
                times, units = _utterance(rng, spec, speaker, label)
                split = "test" if speaker in test_ids or held[r] else "train"
                parts[split]["times"].append(times)
                parts[split]["units"].append(units)
                parts[split]["labels"].append(label)
                parts[split]["speakers"].append(speaker)
    paths = {}
    for split, p in parts.items():
        path = out / SHD_FILES["shd"][split]
        write_spike_file(
            path,
            p["times"],
            p["units"],
            p["labels"],
            p["speakers"],
            SHD_LIKE_CLASSES,
            attrs={"generator": "kcprnn shd-like", "spec": json.dumps(asdict(spec))},
        )
        paths[split] = path
    return paths


def shd_like_dir(spec: SpikeStandInSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the stand-in's two files, generated on first use.

    The folder is ``<cache>/spikes/shd-like-<key>`` (:meth:`SpikeStandInSpec.key`); it is built
    in a temporary folder and renamed into place, so it is either complete or absent.
    """
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "spikes"
    folder = root / f"shd-like-{spec.key()}"
    if all((folder / f).is_file() for f in SHD_FILES["shd"].values()):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}-"))
    try:
        make_shd_like(spec, tmp)
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not folder.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("cached SHD-like stand-in in %s", folder)
    return folder
