"""Speech data for the CTC experiments: TIMIT and TED-LIUM from a local copy, log-mel features
cached on disk, and offline stand-ins synthesized with espeak-ng and flite."""

from .audio import CorruptAudioError, read_audio, read_sphere_header, write_sphere
from .corpus import CHARACTERS, SpeechCorpus, Utterance
from .dataset import SpeechSet, encode_targets, load_speech_set, stack_frames
from .features import (
    FeatureSpec,
    FeatureStore,
    compute_features,
    deltas,
    extract_features,
    normalize,
    tilt_bands,
    warp_bands,
)
from .standins import (
    SpeechStandInSpec,
    alice_clauses,
    espeak_phonemes,
    flite_available,
    load_speech_standin,
    make_speech_standin,
    speech_standin_dir,
)
from .tedlium import clean_transcript, load_tedlium, read_stm
from .timit import FOLD_61_TO_39, PHONES_39, PHONES_61, fold_phones, load_timit, read_phn

__all__ = [
    "CHARACTERS",
    "FOLD_61_TO_39",
    "PHONES_39",
    "PHONES_61",
    "CorruptAudioError",
    "FeatureSpec",
    "FeatureStore",
    "SpeechCorpus",
    "SpeechSet",
    "SpeechStandInSpec",
    "Utterance",
    "alice_clauses",
    "clean_transcript",
    "compute_features",
    "deltas",
    "encode_targets",
    "espeak_phonemes",
    "extract_features",
    "flite_available",
    "fold_phones",
    "load_speech_set",
    "load_speech_standin",
    "load_tedlium",
    "load_timit",
    "make_speech_standin",
    "normalize",
    "read_audio",
    "read_phn",
    "read_sphere_header",
    "read_stm",
    "speech_standin_dir",
    "stack_frames",
    "tilt_bands",
    "warp_bands",
    "write_sphere",
]
