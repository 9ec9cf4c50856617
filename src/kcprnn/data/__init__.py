"""Video data for the experiments: real-dataset loaders (PyAV) and offline stand-ins."""

from .clips import ClipSet, group_split, leave_one_group_out, stratified_split
from .images import SourceImages, load_source_images
from .standins import StandInSpec, load_standin, make_ucf11_like, make_youtube_like
from .video import CorruptClipError, decode_clip, load_video_dataset

__all__ = [
    "ClipSet",
    "CorruptClipError",
    "SourceImages",
    "StandInSpec",
    "decode_clip",
    "group_split",
    "leave_one_group_out",
    "load_source_images",
    "load_standin",
    "load_video_dataset",
    "make_ucf11_like",
    "make_youtube_like",
    "stratified_split",
]
