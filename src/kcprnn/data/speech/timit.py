"""TIMIT (LDC93S1) from a local copy, with the standard phone-recognition protocol.

Layout ``TIMIT/{TRAIN,TEST}/DR1..DR8/<speaker>/<utterance>.{WAV,PHN,WRD,TXT}``, in upper or
lower case (``timit/train/dr1/fcjf0/sa1.wav``); ``.WAV`` files are NIST SPHERE (or RIFF
conversions, also read). ``.PHN`` lines are ``<begin sample> <end sample> <phone>``.

Protocol (Lee and Hon, 1989; Halberstadt, 1998): the SA sentences are dropped, leaving 3,696
training utterances of 462 speakers; the dev set is 50 speakers of the test folder (400
utterances), the core test set 24 speakers (192 utterances). Models are trained on the 61 phones
and scored after folding them to 39 (:data:`FOLD_61_TO_39`; the glottal stop ``q`` is deleted).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .corpus import SpeechCorpus, Utterance

__all__ = [
    "CORE_TEST_SPEAKERS",
    "DEV_SPEAKERS",
    "FOLD_61_TO_39",
    "PHONES_39",
    "PHONES_61",
    "fold_phones",
    "load_timit",
    "read_phn",
]

log = logging.getLogger(__name__)

PHONES_61 = tuple(
    "aa ae ah ao aw ax ax-h axr ay b bcl ch d dcl dh dx eh el em en eng epi er ey f g gcl h# hh "
    "hv ih ix iy jh k kcl l m n ng nx ow oy p pau pcl q r s sh t tcl th uh uw ux v w y z zh".split()
)

_FOLDS = {
    "ao": "aa",
    "ax": "ah",
    "ax-h": "ah",
    "axr": "er",
    "hv": "hh",
    "ix": "ih",
    "el": "l",
    "em": "m",
    "en": "n",
    "nx": "n",
    "eng": "ng",
    "zh": "sh",
    "ux": "uw",
    **{p: "sil" for p in ("pcl", "tcl", "kcl", "bcl", "dcl", "gcl", "h#", "pau", "epi")},
}
FOLD_61_TO_39: dict[str, str | None] = {p: _FOLDS.get(p, p) for p in PHONES_61}
FOLD_61_TO_39["q"] = None
PHONES_39 = tuple(sorted({p for p in FOLD_61_TO_39.values() if p is not None}))

CORE_TEST_SPEAKERS = frozenset(
    "mdab0 mwbt0 felc0 mtas1 mwew0 fpas0 mjmp0 mlnt0 fpkt0 mlll0 mtls0 fjlm0 mbpm0 mklt0 fnlp0 "
    "mcmj0 mjdh0 fmgd0 mgrt0 mnjm0 fdhc0 mjln0 mpam0 fmld0".split()
)
"""The 24 speakers of the core test set (2 male, 1 female per dialect region)."""

DEV_SPEAKERS = frozenset(
    "faks0 fdac1 fjem0 mgwt0 mjar0 mmdb1 mmdm2 mpdf0 fcmh0 fkms0 mbdg0 mbwm0 mcsh0 fadg0 fdms0 "
    "fedw0 mgjf0 mglb0 mrtk0 mtaa0 mtdt0 mthc0 mwjg0 fnmr0 frew0 fsem0 mbns0 mmjr0 mdls0 mdlf0 "
    "mdvc0 mers0 fmah0 fdrw0 mrcs0 mrjm4 fcal1 mmwh0 fjsj0 majc0 mjsw0 mreb0 fgjd0 fjmg0 mroa0 "
    "mteb0 mjfc0 mrjr0 fmml0 mrws1".split()
)
"""The 50 speakers of the test folder used as the dev set (none in the core test set)."""


def fold_phones(phones: list[str] | tuple[str, ...]) -> list[str]:
    """Map 61 TIMIT phones to the 39 scored ones (``q`` deleted); unknown phones unchanged."""
    out = []
    for p in phones:
        q = FOLD_61_TO_39.get(p, p)
        if q is not None:
            out.append(q)
    return out


def read_phn(path: str | os.PathLike) -> list[tuple[int, int, str]]:
    """``(begin sample, end sample, phone)`` rows of a ``.PHN`` file (phones lower-cased).

    Raises:
        ValueError: a malformed line (the message names the file and line).
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ValueError(f"{path}:{n}: expected '<begin> <end> <phone>', got {line!r}")
        rows.append((int(parts[0]), int(parts[1]), parts[2].lower()))
    return rows


def _child(folder: Path, name: str) -> Path | None:
    """The entry of ``folder`` named ``name`` in any case."""
    for entry in folder.iterdir():
        if entry.name.lower() == name.lower():
            return entry
    return None


def _find_root(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"TIMIT folder {str(data_dir)!r} does not exist")
    for candidate in (data_dir, _child(data_dir, "timit"), _child(data_dir, "data")):
        if candidate is not None and candidate.is_dir() and _child(candidate, "train"):
            return candidate
    raise FileNotFoundError(
        f"no TIMIT corpus under {str(data_dir)!r}: expected TRAIN/ and TEST/ folders (any case), "
        "e.g. TIMIT/TRAIN/DR1/FCJF0/SA1.WAV"
    )


def load_timit(data_dir: str | os.PathLike, keep_sa: bool = False) -> SpeechCorpus:
    """The TIMIT utterances under ``data_dir`` (the folder holding ``TRAIN``/``TEST``, or its
    parent) split by the standard protocol: ``train`` (the training folder), ``dev`` (the 50 dev
    speakers) and ``test`` (the 24-speaker core test set), SA sentences dropped unless
    ``keep_sa``. Targets are the 61 phones of each ``.PHN`` file; PER folds them to 39.

    An utterance without a ``.PHN`` file, or with an empty or malformed one, is skipped with a
    warning naming the file (listed in ``skipped``).

    Raises:
        FileNotFoundError: ``data_dir`` or its ``TRAIN`` folder is missing.
    """
    root = _find_root(Path(data_dir))
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    skipped: list[tuple[str, str]] = []
    for folder_name in ("train", "test"):
        folder = _child(root, folder_name)
        if folder is None:
            if folder_name == "train":
                raise FileNotFoundError(f"no TRAIN folder in {str(root)!r}")
            continue
        for wav in sorted(folder.rglob("*"), key=lambda p: str(p).lower()):
            if wav.suffix.lower() != ".wav" or not wav.is_file():
                continue
            stem = wav.stem.lower()
            speaker = wav.parent.name.lower()
            if stem.startswith("sa") and not keep_sa:
                continue
            if folder_name == "train":
                split = "train"
            elif speaker in CORE_TEST_SPEAKERS:
                if stem.startswith("sa"):
                    continue  # the core test set is SI and SX sentences only
                split = "test"
            elif speaker in DEV_SPEAKERS:
                split = "dev"
            else:
                continue
            phn = next(
                (
                    p
                    for p in wav.parent.iterdir()
                    if p.stem == wav.stem and p.suffix.lower() == ".phn"
                ),
                None,
            )
            reason = None
            if phn is None:
                reason = "no .PHN transcription next to it"
            else:
                try:
                    phones = tuple(p for _, _, p in read_phn(phn))
                except ValueError as exc:
                    phones, reason = (), str(exc)
                if not reason and not phones:
                    reason = f"{phn.name} is empty"
                if not reason and (unknown := sorted(set(phones) - set(PHONES_61))):
                    reason = f"{phn.name} has phones outside the 61-phone set: {unknown}"
            if reason:
                log.warning("skipped utterance %s: %s", wav, reason)
                skipped.append((str(wav), reason))
                continue
            uid = f"{speaker}_{stem}"
            splits[split].append(Utterance(uid, speaker, str(wav), phones))
    return SpeechCorpus(
        "timit",
        splits,
        "phone",
        PHONES_61,
        scoring_map=dict(FOLD_61_TO_39),
        skipped=tuple(skipped),
    )
