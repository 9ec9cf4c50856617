"""Data for the experiments: video loaders (PyAV) and stand-ins; spike files in SHD's layout
(SHD, SSC) and an offline SHD stand-in; speech corpora (TIMIT, TED-LIUM, their stand-ins) in
:mod:`kcprnn.data.speech`."""

from .clips import ClipSet, group_split, leave_one_group_out, stratified_split
from .images import SourceImages, load_source_images
from .shd import (
    SHD_NUM_UNITS,
    SpikeFileError,
    SpikeSet,
    SpikeSplits,
    bin_spikes,
    load_spike_dataset,
    read_spike_file,
    validation_split,
    write_spike_file,
)
from .speech import (
    FeatureSpec,
    SpeechCorpus,
    SpeechSet,
    SpeechStandInSpec,
    load_speech_set,
    load_speech_standin,
    load_tedlium,
    load_timit,
    speech_standin_dir,
)
from .spikes import (
    SHD_LIKE_CLASSES,
    EncoderSpec,
    SpikeStandInSpec,
    encode_spikes,
    espeak_available,
    make_shd_like,
    shd_like_dir,
)
from .standins import StandInSpec, load_standin, make_ucf11_like, make_youtube_like
from .video import CorruptClipError, decode_clip, load_video_dataset

__all__ = [
    "FeatureSpec",
    "SpeechCorpus",
    "SpeechSet",
    "SpeechStandInSpec",
    "load_speech_set",
    "load_speech_standin",
    "load_tedlium",
    "load_timit",
    "speech_standin_dir",
    "SHD_LIKE_CLASSES",
    "SHD_NUM_UNITS",
    "ClipSet",
    "CorruptClipError",
    "EncoderSpec",
    "SourceImages",
    "SpikeFileError",
    "SpikeSet",
    "SpikeSplits",
    "SpikeStandInSpec",
    "StandInSpec",
    "bin_spikes",
    "decode_clip",
    "encode_spikes",
    "espeak_available",
    "group_split",
    "leave_one_group_out",
    "load_source_images",
    "load_spike_dataset",
    "load_standin",
    "load_video_dataset",
    "make_shd_like",
    "make_ucf11_like",
    "make_youtube_like",
    "read_spike_file",
    "shd_like_dir",
    "stratified_split",
    "validation_split",
    "write_spike_file",
]
