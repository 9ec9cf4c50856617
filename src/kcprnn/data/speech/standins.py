"""Offline stand-ins for TIMIT and TED-LIUM, synthesized from a real English text.

The sentences are the first two chapters of *Alice's Adventures in Wonderland* (public domain)
as shipped with the Debian package ``flite`` (its ``examples/alice``), cut into clauses. They are
spoken by two synthesizers, ``espeak-ng`` (voice variants of its US English voice) and ``flite``
(its US and Scottish voices); a *speaker* is one voice at one base speaking rate (and, for
espeak-ng, pitch), with a small per-utterance jitter. Some speakers are held out: the dev and
test speakers never appear in training, and dev/test sentences are disjoint from the training
sentences (as TIMIT's core test set is).

- ``timit-like``: phone recognition. Clauses of 4-14 words; targets are the phonemes espeak-ng
  itself derives from the text (``espeak-ng -x``, US English; stress marks removed), the same
  targets whichever synthesizer speaks (flite's US voices pronounce nearly the same phones).
  Scored by phone error rate.
- ``tedlium-like``: read speech recognition. Runs of consecutive clauses of 12-30 words, longer
  utterances as TED-LIUM's segments are; targets are words (models emit characters), scored by
  word error rate.

Generation is deterministic (fixed voices, jitter drawn from ``seed``) and writes 16-bit WAV
files plus a ``manifest.json`` into a cache folder keyed by every parameter; a few hundred
utterances take about a minute on one core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._io import default_cache_dir
from .corpus import CHARACTERS, SpeechCorpus, Utterance
from .tedlium import clean_transcript

__all__ = [
    "ALICE_PATHS",
    "STANDIN_SPEAKERS",
    "SpeechStandInSpec",
    "alice_clauses",
    "espeak_phonemes",
    "flite_available",
    "load_speech_standin",
    "make_speech_standin",
    "speech_standin_dir",
]

log = logging.getLogger(__name__)

ALICE_PATHS = (
    "/usr/share/doc/flite/examples/alice",
    "/usr/local/share/doc/flite/examples/alice",
)
"""Where the ``flite`` package installs its copy of *Alice in Wonderland* (chapters 1-2)."""

STANDIN_SPEAKERS: tuple[tuple[str, str, float, int], ...] = (
    # (engine, voice, rate, pitch): espeak rate in words/min, flite a duration stretch
    ("espeak", "en-us+m1", 165, 45),
    ("espeak", "en-us+f1", 170, 60),
    ("flite", "slt", 1.0, 0),
    ("espeak", "en-us+m3", 150, 40),
    ("espeak", "en-us+f2", 180, 55),
    ("flite", "kal16", 1.1, 0),
    ("espeak", "en-us+m2", 175, 50),
    ("espeak", "en-us+f3", 155, 65),
    ("flite", "awb", 0.95, 0),
    ("espeak", "en-us+m4", 160, 35),
    ("espeak", "en-us+f4", 165, 50),
    ("espeak", "en-us+m5", 185, 45),
    # held out: dev speakers, then test speakers
    ("espeak", "en-us+m6", 160, 45),
    ("espeak", "en-us+f5", 170, 60),
    ("espeak", "en-us+m7", 155, 40),
    ("flite", "rms", 1.05, 0),
    ("espeak", "en-us+m8", 175, 55),
)
"""Speaker pool: the first ones train, the last ``test_speakers`` are test only and the
``dev_speakers`` before them dev only."""

KINDS = ("timit-like", "tedlium-like")


@dataclass(frozen=True)
class SpeechStandInSpec:
    """Size and content of a speech stand-in (every field is part of the cache key).

    Args:
        kind: ``"timit-like"`` or ``"tedlium-like"``.
        train_speakers, dev_speakers, test_speakers: speakers per split, taken from
            :data:`STANDIN_SPEAKERS` (dev and test from its end).
        utterances_per_speaker: training utterances per training speaker.
        eval_utterances_per_speaker: utterances per dev or test speaker.
        test_fraction: share of the clauses kept for dev/test sentences only.
        seed: sentence draws and rate jitter.
    """

    kind: str = "timit-like"
    train_speakers: int = 12
    dev_speakers: int = 2
    test_speakers: int = 3
    utterances_per_speaker: int = 40
    eval_utterances_per_speaker: int = 30
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got kind={self.kind!r}")
        total = self.train_speakers + self.dev_speakers + self.test_speakers
        if self.train_speakers < 1 or self.test_speakers < 1 or self.dev_speakers < 0:
            raise ValueError(
                f"need >= 1 train and test speaker and >= 0 dev speakers, got "
                f"{self.train_speakers}/{self.dev_speakers}/{self.test_speakers}"
            )
        if total > len(STANDIN_SPEAKERS):
            raise ValueError(
                f"{total} speakers requested, the pool has {len(STANDIN_SPEAKERS)} voices"
            )
        if self.utterances_per_speaker < 1 or self.eval_utterances_per_speaker < 1:
            raise ValueError("utterances per speaker must be >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def flite_available() -> bool:
    """Whether the ``flite`` program and its *Alice* text are installed."""
    return shutil.which("flite") is not None and _alice_path() is not None


def _alice_path() -> Path | None:
    return next((Path(p) for p in ALICE_PATHS if Path(p).is_file()), None)


def alice_clauses(min_words: int = 4, max_words: int = 14) -> list[str]:
    """The *Alice* text as clauses of ``min_words``-``max_words`` words (sentences split at
    ``. ! ? ; :`` and, when too long, at commas and dashes; shorter pieces joined to the next)."""
    path = _alice_path()
    if path is None:
        raise FileNotFoundError(
            "flite's copy of Alice in Wonderland is missing (expected at "
            f"{ALICE_PATHS[0]}); install the Debian package 'flite' (make system-deps does)"
        )
    text = path.read_text(errors="replace")
    text = re.sub(r"CHAPTER [IVX]+:[^\n]*", " ", text)
    text = re.sub(
        r"[`'\"]+(?=\s|$)|(?<=\s)[`'\"]+|^[`'\"]+", " ", text
    )  # quote marks, not apostrophes
    text = re.sub(r"[^A-Za-z'.,;:!?\- ]", " ", text.replace("\n", " "))
    text = re.sub(r"\s+", " ", text)
    clauses = []
    for sentence in re.split(r"(?<=[.!?;:])\s+", text):
        pieces = [sentence]
        if len(sentence.split()) > max_words:
            pieces = re.split(r"(?<=[,])\s+|\s+-+\s*", sentence)
        buffer: list[str] = []
        for piece in pieces:
            buffer += piece.split()
            if len(buffer) >= min_words:
                clauses.append(buffer)
                buffer = []
        if buffer and clauses and len(clauses[-1]) + len(buffer) <= max_words + 4:
            clauses[-1] += buffer
    out = []
    for words in clauses:
        words = [w.strip(".,;:!?-'") for w in words]
        words = [w for w in words if w]
        if min_words <= len(words) <= max_words + 4:
            out.append(" ".join(words))
    return out


def espeak_phonemes(text: str) -> tuple[str, ...]:
    """US English phonemes of ``text`` from ``espeak-ng -x`` (stress marks, the ``;`` palatal
    mark and the ``#``/``2`` variant markers removed, ``r-`` read as ``r``)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "the espeak-ng program is needed for the speech stand-ins; install the Debian "
            "package 'espeak-ng' (make system-deps does)"
        )
    out = subprocess.run(
        [exe, "-q", "-x", "--sep=_", "-v", "en-us", text], capture_output=True, check=True
    ).stdout.decode()
    phones = []
    for token in re.split(r"[\s_]+", out):
        token = re.sub(r"['%,=#;]", "", token)
        token = "r" if token == "r-" else token.rstrip("2") if len(token) > 1 else token
        if token:
            phones.append(token)
    return tuple(phones)


def _speak(engine: str, voice: str, rate: float, pitch: int, text: str, path: Path) -> None:
    if engine == "espeak":
        exe = shutil.which("espeak-ng")
        args = [str(exe), "-v", voice, "-s", str(int(rate)), "-p", str(pitch), "-w", str(path)]
    else:
        exe = shutil.which("flite")
        args = [str(exe), "-voice", voice, "--setf", f"duration_stretch={rate:.3f}"]
        args += ["-t", text, "-o", str(path)]
    if exe is None:
        package = "espeak-ng" if engine == "espeak" else "flite"
        raise RuntimeError(
            f"the {package} program is needed for the speech stand-ins; install the Debian "
            f"package '{package}' (make system-deps does)"
        )
    if engine == "espeak":
        args.append(text)
    result = subprocess.run(args, capture_output=True)
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(f"{engine} failed for {text!r} ({voice}): {result.stderr.decode()}")


def _trim_silence(audio: np.ndarray, rate: int, keep: float = 0.1) -> np.ndarray:
    """Leading/trailing silence cut to ``keep`` seconds (synthesizers pad unevenly)."""
    level = np.abs(audio)
    loud = np.flatnonzero(level > 0.02 * max(level.max(), 1e-6))
    if not len(loud):
        return audio
    pad = int(keep * rate)
    return audio[max(loud[0] - pad, 0) : loud[-1] + pad]


def make_speech_standin(spec: SpeechStandInSpec, out_dir: str | os.PathLike) -> Path:
    """Synthesize the stand-in into ``out_dir`` (``audio/*.wav`` and ``manifest.json``)."""
    import soundfile as sf

    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "timit-like":
        sentences = alice_clauses(4, 14)
    else:
        clauses = alice_clauses(4, 14)
        sentences, run = [], []
        for clause in clauses:
            run += clause.split()
            if len(run) >= 12:
                sentences.append(" ".join(run[:30]))
                run = []
    order = rng.permutation(len(sentences))
    n_eval = max(1, int(round(spec.test_fraction * len(sentences))))
    eval_texts = [sentences[i] for i in sorted(order[:n_eval])]
    train_texts = [sentences[i] for i in sorted(order[n_eval:])]
    n_train, n_dev = spec.train_speakers, spec.dev_speakers
    pool = STANDIN_SPEAKERS
    roles = [(pool[i], "train") for i in range(n_train)]
    held = pool[len(pool) - spec.test_speakers - n_dev :]
    roles += [(s, "dev") for s in held[:n_dev]] + [(s, "test") for s in held[n_dev:]]
    phoneme_cache: dict[str, tuple[str, ...]] = {}
    rows = []
    for (engine, voice, rate, pitch), split in roles:
        speaker = f"{engine}-{voice.replace('+', '-')}-{rate:g}"
        texts = train_texts if split == "train" else eval_texts
        count = (
            spec.utterances_per_speaker if split == "train" else spec.eval_utterances_per_speaker
        )
        picks = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
        jitter = rng.uniform(0.92, 1.08, size=len(picks))
        for k, (i, j) in enumerate(zip(sorted(picks), jitter, strict=True)):
            text = texts[i]
            uid = f"{speaker}_{k:03d}"
            path = out / "audio" / f"{uid}.wav"
            r = rate * j if engine == "espeak" else rate / j
            raw = out / "audio" / f".{uid}.raw.wav"
            _speak(engine, voice, r, pitch, text, raw)
            audio, sample_rate = sf.read(str(raw), dtype="float32", always_2d=True)
            raw.unlink()
            audio = _trim_silence(audio[:, 0], sample_rate)
            sf.write(str(path), audio, sample_rate, subtype="PCM_16")
            if spec.kind == "timit-like":
                if text not in phoneme_cache:
                    phoneme_cache[text] = espeak_phonemes(text)
                tokens = phoneme_cache[text]
            else:
                tokens = tuple(clean_transcript(text.replace("-", " ")))
            rows.append(
                {
                    "uid": uid,
                    "speaker": speaker,
                    "split": split,
                    "file": path.name,
                    "text": text,
                    "tokens": list(tokens),
                }
            )
    manifest = {"spec": asdict(spec), "utterances": rows}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def speech_standin_dir(spec: SpeechStandInSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the stand-in ``spec`` in ``cache_dir`` (default: the kcprnn cache),
    generated on first use."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = base / "speech-standins" / f"{spec.kind}-{spec.key()}"
    if (folder / "manifest.json").is_file():
        return folder
    base.joinpath("speech-standins").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        make_speech_standin(spec, tmp)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load_speech_standin(folder: str | os.PathLike) -> SpeechCorpus:
    """The stand-in in ``folder`` (written by :func:`make_speech_standin`) as a corpus."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    kind = manifest["spec"]["kind"]
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    for row in manifest["utterances"]:
        path = str(folder / "audio" / row["file"])
        splits[row["split"]].append(
            Utterance(row["uid"], row["speaker"], path, tuple(row["tokens"]))
        )
    if kind == "timit-like":
        phones = sorted({p for utts in splits.values() for u in utts for p in u.tokens})
        return SpeechCorpus(kind, splits, "phone", tuple(phones))
    return SpeechCorpus(kind, splits, "char", CHARACTERS)
