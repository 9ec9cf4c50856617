"""Loaders for the real video datasets (UCF11, UCF50, YouTube Celebrities Face) with PyAV.

Clips are decoded once: ``num_frames`` frames sampled in ascending order, scaled to 160x120 RGB,
and cached as uint8 ``.npy`` files (written atomically), so later epochs and runs read arrays.
A clip that cannot be decoded is skipped with a logged warning and listed in
:attr:`ClipSet.skipped`; the load goes on.

Layouts (docs/experiments.md, "Real datasets"):

- UCF11: ``<root>/<class>/<group folder ending _GG>/<clip>.mpg|.avi`` (non-video files such as
  ``Annotation`` folders are ignored); group id ``GG``.
- UCF50: ``<root>/<Class>/v_<Class>_gGG_cCC.avi``; group id ``GG`` (leave-one-group-out folds).
- YouTube Celebrities: ``<NNNN>_<VV>_<CCC>_<first>_<last>.avi`` anywhere under ``<root>``;
  label ``first_last``, group = source video ``VV``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import default_cache_dir, load_npy, save_npy_atomic
from .clips import ClipSet

__all__ = [
    "VIDEO_DATASETS",
    "VIDEO_SUFFIXES",
    "ClipRef",
    "CorruptClipError",
    "decode_clip",
    "load_video_dataset",
    "sample_indices",
    "scan_ucf11",
    "scan_ucf50",
    "scan_youtube_celebrities",
]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".avi", ".mpg", ".mpeg", ".mp4")


class CorruptClipError(ValueError):
    """A clip that cannot be decoded (unreadable, truncated, no video frames)."""


@dataclass(frozen=True)
class ClipRef:
    """One clip on disk: its path, class name and group id."""

    path: Path
    label: str
    group: int


# --- decoding ---


def sample_indices(num_available: int, num_frames: int) -> np.ndarray:
    """``num_frames`` frame indices in ascending order, evenly spread over ``num_available``
    (repeated when the clip is shorter)."""
    if num_available < 1:
        raise ValueError(f"cannot sample from a clip with {num_available} frames")
    return np.linspace(0, num_available - 1, num_frames).round().astype(np.int64)


def decode_clip(
    path: str | os.PathLike, num_frames: int, size: tuple[int, int] = (160, 120)
) -> np.ndarray:
    """Decode ``num_frames`` frames of a video file, ascending, scaled to ``size = (w, h)``.

    Returns:
        uint8 ``(num_frames, h, w, 3)`` RGB.

    Raises:
        CorruptClipError: the file cannot be opened or decoded, or has no video frames.
    """
    import av  # optional dependency: the `experiments` extra

    width, height = size
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise CorruptClipError(f"{path}: no video stream")
            frames = list(container.decode(video=0))
    except CorruptClipError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise CorruptClipError(f"{path}: cannot decode video ({exc})") from exc
    if not frames:
        raise CorruptClipError(f"{path}: no decodable video frames")
    picked = [frames[i] for i in sample_indices(len(frames), num_frames)]
    return np.stack(
        [f.reformat(width=width, height=height, format="rgb24").to_ndarray() for f in picked]
    )  # (t, h, w, 3)


# --- scanning ---


def _require_dir(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {str(path)!r} does not exist or is not a folder")
    return path


def _videos(folder: Path) -> list[Path]:
    found = folder.rglob("*")
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _class_clips(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(class name, clip)`` for every clip of every class folder under ``root``; a missing
    dataset folder, no class folders or an empty class folder is a clear error."""
    folder = _require_dir(root)
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not dirs:
        raise ValueError(f"dataset folder {str(folder)!r} has no class folders")
    out = []
    for class_dir in dirs:
        clips = _videos(class_dir)
        if not clips:
            raise ValueError(f"class folder {str(class_dir)!r} contains no video clips")
        out += [(class_dir.name, clip) for clip in clips]
    return out


def scan_ucf11(root: str | os.PathLike) -> list[ClipRef]:
    """List UCF11 clips: class = top folder, group = the trailing number of the group folder."""
    refs = []
    for name, clip in _class_clips(root):
        m = re.search(r"_(\d+)$", clip.parent.name) or re.search(r"_(\d+)_\d+$", clip.stem)
        if m is None:
            raise ValueError(f"{clip}: cannot read the UCF11 group number (want .../v_name_GG/)")
        refs.append(ClipRef(clip, name, int(m.group(1))))
    return refs


def scan_ucf50(root: str | os.PathLike) -> list[ClipRef]:
    """List UCF50 clips ``<Class>/v_<Class>_gGG_cCC.avi``: group ``GG``."""
    refs = []
    for name, clip in _class_clips(root):
        m = re.search(r"_g(\d+)_c\d+$", clip.stem)
        if m is None:
            raise ValueError(f"{clip}: name does not match v_<Class>_gGG_cCC")
        refs.append(ClipRef(clip, name, int(m.group(1))))
    return refs


def scan_youtube_celebrities(root: str | os.PathLike) -> list[ClipRef]:
    """List YouTube Celebrities clips ``<NNNN>_<VV>_<CCC>_<first>_<last>.avi``."""
    folder = _require_dir(root)
    clips = _videos(folder)
    if not clips:
        raise ValueError(f"dataset folder {str(folder)!r} contains no video clips")
    refs = []
    for clip in clips:
        parts = clip.stem.split("_")
        if len(parts) != 5 or not parts[1].isdigit():
            raise ValueError(f"{clip}: name does not match <NNNN>_<VV>_<CCC>_<first>_<last>")
        refs.append(ClipRef(clip, f"{parts[3]}_{parts[4]}", int(parts[1])))
    return refs


VIDEO_DATASETS = {
    "ucf11": scan_ucf11,
    "ucf50": scan_ucf50,
    "youtube": scan_youtube_celebrities,
}


# --- loading with a cache ---


def _cache_path(cache: Path, ref: ClipRef, num_frames: int, size: tuple[int, int]) -> Path:
    stat = ref.path.stat()
    key = f"{ref.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{num_frames}|{size}"
    return cache / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npy"


def load_video_dataset(
    name: str,
    root: str | os.PathLike,
    num_frames: int,
    size: tuple[int, int] = (160, 120),
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> ClipSet:
    """Scan, decode (or read from the cache) and stack every clip of dataset ``name``.

    Args:
        name: ``"ucf11"``, ``"ucf50"`` or ``"youtube"``.
        root: the dataset's top folder.
        num_frames: frames sampled per clip, ascending.
        size: ``(width, height)`` of the frames.
        cache_dir: where decoded clips go (default :func:`~kcprnn.data._io.default_cache_dir`).
        progress: show a tqdm bar while decoding.
    """
    if name not in VIDEO_DATASETS:
        raise ValueError(f"video dataset must be one of {sorted(VIDEO_DATASETS)}, got {name!r}")
    refs = VIDEO_DATASETS[name](root)
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / "clips" / name
    class_names = tuple(sorted({r.label for r in refs}))
    index = {c: i for i, c in enumerate(class_names)}
    frames, labels, groups, skipped = [], [], [], []
    if progress:
        from tqdm import tqdm

        refs_iter = tqdm(refs, desc=f"decoding {name}", unit="clip")
    else:
        refs_iter = refs
    for ref in refs_iter:
        path = _cache_path(cache, ref, num_frames, size)
        if path.is_file():
            clip = load_npy(path)
        else:
            try:
                clip = decode_clip(ref.path, num_frames, size)
            except CorruptClipError as exc:
                log.warning("skipping corrupt clip: %s", exc)
                skipped.append((str(ref.path), str(exc)))
                continue
            save_npy_atomic(path, clip)
        frames.append(clip)
        labels.append(index[ref.label])
        groups.append(ref.group)
    if not frames:
        raise ValueError(f"no readable clips in {str(root)!r} ({len(skipped)} skipped)")
    return ClipSet(
        np.stack(frames),
        np.asarray(labels, dtype=np.int64),
        np.asarray(groups, dtype=np.int64),
        class_names,
        tuple(skipped),
    )
