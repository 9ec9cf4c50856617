"""Helpers for the experiment tests: tiny encoded clips written with PyAV."""

from pathlib import Path

import av  # in the test extra: these tests run for real
import numpy as np
import pytest


def write_clip(
    path: Path, num_frames: int, width: int = 32, height: int = 24, codec: str = "mpeg4"
) -> np.ndarray:
    """Write a clip whose frame ``k`` is flat grey ``20 + 20 k`` (so the order is visible after
    lossy coding); return the per-frame levels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = 20 + 20 * np.arange(num_frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for level in levels:
            img = np.full((height, width, 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return levels


@pytest.fixture
def clip_writer():
    """The :func:`write_clip` helper."""
    return write_clip


@pytest.fixture
def ucf11_tree(tmp_path: Path) -> Path:
    """A UCF11-layout folder: 2 classes x 2 groups x 2 clips of 8 frames, plus an annotation
    file."""
    root = tmp_path / "UCF11"
    for cls, prefix in (("biking", "v_biking"), ("walking", "v_walk_dog")):
        for g in (1, 2):
            for c in (1, 2):
                write_clip(root / cls / f"{prefix}_{g:02d}" / f"{prefix}_{g:02d}_{c:02d}.avi", 8)
        (root / cls / f"{prefix}_01" / "Annotation").mkdir()
        (root / cls / f"{prefix}_01" / "Annotation" / "notes.xgtf").write_text("<xml/>")
    return root


@pytest.fixture(scope="module")
def source_images():
    """Skip the module's tests where the video stand-ins' source images (a Debian package, not a
    Python one) are not installed."""
    from kcprnn.data import load_source_images

    try:
        load_source_images()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A data cache folder shared by the tests of one module (the stand-in is generated once)."""
    return tmp_path_factory.mktemp("cache")
