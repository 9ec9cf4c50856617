"""TED-LIUM releases 1, 2 and 3 from a local copy.

Layouts: ``TEDLIUM_release1/`` and ``TEDLIUM_release2/`` hold ``{train,dev,test}/{sph,stm}/``;
release 3 (``TEDLIUM_release-3/``) holds the same three splits under ``legacy/`` (the
release-2 dev and test sets with the release-3 training talks), which is what is read. One
``<talk>.sph`` (16 kHz NIST SPHERE) and one ``<talk>.stm`` per talk; an STM line is
``<talk> <channel> <speaker> <start s> <end s> <<label>> <transcript>``. Each line is one
utterance, cut from the talk by time; lines whose transcript is
``ignore_time_segment_in_scoring`` are dropped, as are noise and filler markers (``{NOISE}``,
``<sil>``) and pronunciation-variant suffixes (``word(2)``). Targets are the words; models emit
characters (:data:`~kcprnn.data.speech.corpus.CHARACTERS`) and are scored by word error rate.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .corpus import CHARACTERS, SpeechCorpus, Utterance

__all__ = ["IGNORE", "clean_transcript", "load_tedlium", "read_stm"]

log = logging.getLogger(__name__)

IGNORE = "ignore_time_segment_in_scoring"


def clean_transcript(text: str) -> list[str]:
    """Scored words of an STM transcript: lower case, markers in ``{}``/``<>``/``[]`` dropped,
    ``(N)`` variant suffixes removed, characters outside a-z and the apostrophe removed."""
    words = []
    for word in text.lower().split():
        if word[:1] in "{<[" or word == IGNORE:
            continue
        word = re.sub(r"\(\d+\)$", "", word)
        word = "".join(c for c in word if c in CHARACTERS and c != " ")
        if word.strip("'"):
            words.append(word)
    return words


def read_stm(path: str | os.PathLike) -> list[tuple[str, str, float, float, str]]:
    """``(talk, speaker, start s, end s, transcript)`` rows of an STM file (``;;`` comments
    skipped).

    Raises:
        ValueError: a malformed line (the message names the file and line).
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith(";;"):
            continue
        parts = line.split(None, 6)
        if len(parts) < 5:
            raise ValueError(f"{path}:{n}: expected '<talk> <channel> <speaker> <start> <end> ...'")
        try:
            t0, t1 = float(parts[3]), float(parts[4])
        except ValueError:
            raise ValueError(
                f"{path}:{n}: start/end {parts[3]!r} {parts[4]!r} are not numbers"
            ) from None
        rest = " ".join(parts[5:])
        if rest.startswith("<"):  # the optional <o,f0,male> label
            rest = rest.split(">", 1)[1] if ">" in rest else ""
        rows.append((parts[0], parts[2], t0, t1, rest.strip()))
    return rows


def _split_root(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"TED-LIUM folder {str(data_dir)!r} does not exist")
    candidates = [data_dir, data_dir / "legacy"]
    candidates += [p / "legacy" for p in sorted(data_dir.glob("TEDLIUM*"))]
    candidates += sorted(data_dir.glob("TEDLIUM*"))
    for c in candidates:
        if (c / "train" / "stm").is_dir() or (c / "test" / "stm").is_dir():
            return c
    raise FileNotFoundError(
        f"no TED-LIUM corpus under {str(data_dir)!r}: expected {{train,dev,test}}/{{sph,stm}}/ "
        "(releases 1 and 2) or legacy/{train,dev,test}/{sph,stm}/ (release 3)"
    )


def load_tedlium(data_dir: str | os.PathLike) -> SpeechCorpus:
    """The TED-LIUM utterances under ``data_dir`` (a release folder or its parent): ``train``,
    ``dev`` and ``test`` segments with their words.

    A segment with an empty transcript (after cleaning), a talk without its ``.sph`` file or an
    unreadable ``.stm`` is skipped with a warning naming the file (listed in ``skipped``).

    Raises:
        FileNotFoundError: no release layout under ``data_dir``.
    """
    root = _split_root(Path(data_dir))
    splits: dict[str, list[Utterance]] = {}
    skipped: list[tuple[str, str]] = []
    for split in ("train", "dev", "test"):
        utts: list[Utterance] = []
        for stm in sorted((root / split / "stm").glob("*.stm")):
            sph = root / split / "sph" / f"{stm.stem}.sph"
            if not sph.is_file():
                reason = f"no audio file {sph.name}"
                log.warning("skipped talk %s: %s", stm, reason)
                skipped.append((str(stm), reason))
                continue
            try:
                rows = read_stm(stm)
            except ValueError as exc:
                log.warning("skipped talk %s: %s", stm, exc)
                skipped.append((str(stm), str(exc)))
                continue
            for talk, speaker, t0, t1, text in rows:
                if text.strip() == IGNORE:
                    continue
                where = f"{stm}@{t0:.2f}-{t1:.2f}"
                words = clean_transcript(text)
                if not words:
                    log.warning("skipped segment %s: empty transcript", where)
                    skipped.append((where, "empty transcript"))
                    continue
                if not t1 > t0:
                    log.warning("skipped segment %s: end time before start", where)
                    skipped.append((where, "end time before start"))
                    continue
                uid = f"{talk}_{int(round(t0 * 100)):07d}_{int(round(t1 * 100)):07d}"
                utts.append(Utterance(uid, speaker, str(sph), tuple(words), t0, t1))
        splits[split] = utts
    return SpeechCorpus("tedlium", splits, "char", CHARACTERS, skipped=tuple(skipped))
