"""Small file helpers shared by the data loaders: atomic ``.npy`` writes and the cache folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["default_cache_dir", "load_npy", "save_npy_atomic"]


def default_cache_dir() -> Path:
    """``$KCPRNN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/kcprnn`` (``~/.cache/kcprnn``)."""
    if os.environ.get("KCPRNN_CACHE_DIR"):
        return Path(os.environ["KCPRNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kcprnn"


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as ``.npy`` (no pickle): a temporary file, then
    ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """Read a ``.npy`` file written by :func:`save_npy_atomic` (pickle refused).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a ``.npy`` file, a truncated one, or one holding objects (a pickle); the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise ValueError(f"it starts with {magic!r}, not a .npy header")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable .npy array ({exc}); delete it and the cache "
            "entry is rebuilt"
        ) from None
