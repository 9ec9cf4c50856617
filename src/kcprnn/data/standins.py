"""Offline stand-ins for the paper's video tasks, rendered deterministically from real images.

Both are built from real images that an installable package ships (Fashion-MNIST from Debian's
``dataset-fashion-mnist``, see :mod:`kcprnn.data.images`), composited onto smooth random colour
backgrounds at the paper's 160x120 RGB frame size (57,600 inputs per frame).

- :func:`make_ucf11_like` (UCF11 proxy): 11 classes whose label is a *motion pattern* of a randomly
  chosen, randomly coloured object: 8 directions of translation, zoom in, zoom out, rotation. The
  object and its mean position and size are independent of the class, so one frame does not tell
  the class; the order of the frames does.
- :func:`make_youtube_like` (YouTube Celebrities proxy): 47 identities, each one fixed exemplar
  image, seen under a random walk of position, zoom, rotation and lighting, with a random tint and
  pixel noise.

They are proxies with the tasks' input sizes and label structure, not the real videos: no camera
motion, no clutter, no real faces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._io import default_cache_dir, load_npy, save_npy_atomic
from .clips import ClipSet
from .images import load_source_images

__all__ = [
    "UCF11_LIKE_CLASSES",
    "StandInSpec",
    "load_standin",
    "make_ucf11_like",
    "make_youtube_like",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
"""Bumped whenever rendering changes, so that stale caches are not reused."""

UCF11_LIKE_CLASSES = (
    "right",
    "up-right",
    "up",
    "up-left",
    "left",
    "down-left",
    "down",
    "down-right",
    "zoom-in",
    "zoom-out",
    "rotate",
)
NUM_IDENTITIES = 47

_CHUNK = 512  # frames rendered per grid_sample call


@dataclass(frozen=True)
class StandInSpec:
    """What to generate. ``kind`` is ``"ucf11-like"`` or ``"youtube-like"``.

    Attributes:
        kind: which stand-in.
        clips_per_class: clips per class (per identity for ``"youtube-like"``).
        num_frames: frames per clip (6 for UCF11; up to 85 for YouTube Celebrities).
        height, width: frame size (the paper's 120x160).
        seed: everything random is drawn from this seed.
        source: image source for :func:`~kcprnn.data.images.load_source_images`.
    """

    kind: str = "ucf11-like"
    clips_per_class: int = 60
    num_frames: int = 6
    height: int = 120
    width: int = 160
    seed: int = 0
    source: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("ucf11-like", "youtube-like"):
            raise ValueError(
                f"stand-in kind must be 'ucf11-like' or 'youtube-like', got {self.kind!r}"
            )
        for name in ("clips_per_class", "num_frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.kind == "ucf11-like" and self.num_frames < 2:
            raise ValueError(f"motion classes need num_frames >= 2, got {self.num_frames}")


# --- rendering ---


def _backgrounds(rng: np.random.Generator, n: int, height: int, width: int) -> torch.Tensor:
    """Dim smooth random colour fields in [0.02, 0.22]: (n, 3, h, w)."""
    coarse = torch.from_numpy(rng.uniform(0.02, 0.22, size=(n, 3, 3, 4)).astype(np.float32))
    fields = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return fields.clamp(0, 1)  # (n, 3, h, w)


def _render_alpha(
    sprites: torch.Tensor,
    cx: np.ndarray,
    cy: np.ndarray,
    size: np.ndarray,
    angle: np.ndarray,
    height: int,
    width: int,
) -> torch.Tensor:
    """Place sprite ``f`` (``(f, 1, s, s)`` in [0, 1]) centred at pixel ``(cx, cy)`` with side
    ``size`` pixels, rotated by ``angle`` radians. Returns the alpha maps ``(f, 1, h, w)``."""
    # Output pixel x has normalised coordinate x_n with x = (x_n + 1) w / 2 - 1/2 (align_corners
    # False); the sprite coordinate is the rotated offset from the centre over half the side.
    k = 2.0 / size
    c, s = np.cos(angle), np.sin(angle)
    ox, oy = width / 2 - 0.5 - cx, height / 2 - 0.5 - cy
    theta = np.stack(
        [
            np.stack([k * c * width / 2, k * s * height / 2, k * (c * ox + s * oy)], axis=-1),
            np.stack([-k * s * width / 2, k * c * height / 2, k * (-s * ox + c * oy)], axis=-1),
        ],
        axis=1,
    )  # (f, 2, 3)
    theta_t = torch.from_numpy(theta.astype(np.float32))
    shape = [len(theta), 1, height, width]
    grid = F.affine_grid(theta_t, shape, align_corners=False)  # (f, h, w, 2)
    return F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _compose(
    rng: np.random.Generator,
    sprites: torch.Tensor,
    cx: np.ndarray,
    cy: np.ndarray,
    size: np.ndarray,
    angle: np.ndarray,
    gain: np.ndarray,
    colours: np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """Render ``n`` clips of ``t`` frames: sprites ``(n, 1, s, s)``; geometry and ``gain``
    (lighting) ``(n, t)``; ``colours`` ``(n, 3)``. Returns uint8 ``(n, t, h, w, 3)``."""
    n, t = cx.shape
    out = np.empty((n, t, height, width, 3), dtype=np.uint8)
    backgrounds = _backgrounds(rng, n, height, width)  # (n, 3, h, w)
    noise_seeds = np.asarray(rng.integers(0, 2**31 - 1, size=n))  # (n,)
    clips_per_chunk = max(1, _CHUNK // t)
    for start in range(0, n, clips_per_chunk):
        sl = slice(start, min(n, start + clips_per_chunk))
        m = sl.stop - sl.start
        spr = sprites[sl].repeat_interleave(t, dim=0)  # (m t, 1, s, s)
        alpha = _render_alpha(
            spr, cx[sl].ravel(), cy[sl].ravel(), size[sl].ravel(), angle[sl].ravel(), height, width
        ).reshape(m, t, 1, height, width)  # (m, t, 1, h, w)
        colour = torch.from_numpy(colours[sl].astype(np.float32)).reshape(m, 1, 3, 1, 1)
        g = torch.from_numpy(gain[sl].astype(np.float32)).reshape(m, t, 1, 1, 1)
        bg = backgrounds[sl].unsqueeze(1)  # (m, 1, 3, h, w)
        frame = (bg * (1 - alpha) + colour * alpha) * g  # (m, t, 3, h, w)
        for i in range(m):
            gen = torch.Generator().manual_seed(int(noise_seeds[start + i]))
            frame[i] += 0.02 * torch.randn(frame[i].shape, generator=gen)
        pixels = (frame.clamp(0, 1) * 255).round().to(torch.uint8)  # (m, t, 3, h, w)
        out[sl] = pixels.permute(0, 1, 3, 4, 2).numpy()  # (m, t, h, w, 3)
    return out


def _sprites(images: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """Source images ``index`` as float alpha in [0, 1]: (n, 1, s, s)."""
    return torch.from_numpy(images[index].astype(np.float32) / 255.0).unsqueeze(1)


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bright, saturated colours: one channel near 1, the others random. (n, 3)."""
    colours = rng.uniform(0.3, 1.0, size=(n, 3))
    colours[np.arange(n), rng.integers(0, 3, size=n)] = 1.0
    return colours


def make_ucf11_like(spec: StandInSpec) -> ClipSet:
    """UCF11-like motion classes (see the module docstring). Deterministic in ``spec.seed``."""
    if spec.kind != "ucf11-like":
        raise ValueError(f"make_ucf11_like needs spec.kind='ucf11-like', got {spec.kind!r}")
    rng = np.random.default_rng(spec.seed)
    src = load_source_images(spec.source)
    h, w, t = spec.height, spec.width, spec.num_frames
    num_classes = len(UCF11_LIKE_CLASSES)
    labels = np.repeat(np.arange(num_classes), spec.clips_per_class)
    n = len(labels)
    steps = np.arange(t) - (t - 1) / 2  # frame offsets from the middle frame, (t,)
    scale = min(h, w) / 120.0
    base = rng.uniform(36, 52, size=n) * scale  # mean object side, px
    speed = rng.uniform(10, 13, size=n) * scale * 6 / t  # px per frame; same path length for any t
    zoom = rng.uniform(1.2, 1.28, size=n) ** (6 / t)  # size ratio per frame
    spin = rng.choice([-1.0, 1.0], size=n) * rng.uniform(0.45, 0.6, size=n) * 6 / t  # rad/frame
    angle0 = rng.uniform(-0.3, 0.3, size=n)
    size = np.repeat(base[:, None], t, axis=1)
    angle = np.repeat(angle0[:, None], t, axis=1)
    dx = np.zeros((n, t))
    dy = np.zeros((n, t))
    for c in range(8):  # translations, counter-clockwise from "right"; image y points down
        sel = labels == c
        phi = c * math.pi / 4
        dx[sel] = np.outer(speed[sel], steps) * math.cos(phi)
        dy[sel] = -np.outer(speed[sel], steps) * math.sin(phi)
    sel = labels == 8
    size[sel] = base[sel, None] * zoom[sel, None] ** steps
    sel = labels == 9
    size[sel] = base[sel, None] * zoom[sel, None] ** -steps
    sel = labels == 10
    angle[sel] = angle0[sel, None] + np.outer(spin[sel], steps)
    # Centre of the path: uniform over the positions that keep the object inside the frame.
    half = size.max(axis=1) / 2 * 0.8
    lo_x, hi_x = half - dx.min(axis=1), w - half - dx.max(axis=1)
    lo_y, hi_y = half - dy.min(axis=1), h - half - dy.max(axis=1)
    mx = lo_x + rng.uniform(size=n) * np.maximum(hi_x - lo_x, 0)
    my = lo_y + rng.uniform(size=n) * np.maximum(hi_y - lo_y, 0)
    cx, cy = mx[:, None] + dx, my[:, None] + dy
    gain = np.repeat(rng.uniform(0.85, 1.15, size=(n, 1)), t, axis=1)
    sprites = _sprites(src.images, rng.integers(0, len(src.images), size=n))
    frames = _compose(rng, sprites, cx, cy, size, angle, gain, _random_colours(rng, n), h, w)
    groups = np.tile(np.arange(spec.clips_per_class) % 25 + 1, num_classes)
    return ClipSet(frames, labels.astype(np.int64), groups.astype(np.int64), UCF11_LIKE_CLASSES)


def make_youtube_like(spec: StandInSpec) -> ClipSet:
    """YouTube-Celebrities-like identities (see the module docstring). Deterministic in the seed."""
    if spec.kind != "youtube-like":
        raise ValueError(f"make_youtube_like needs spec.kind='youtube-like', got {spec.kind!r}")
    rng = np.random.default_rng(spec.seed)
    src = load_source_images(spec.source)
    h, w, t = spec.height, spec.width, spec.num_frames
    if len(src.images) < NUM_IDENTITIES:
        raise ValueError(f"{src.name} has {len(src.images)} images, fewer than {NUM_IDENTITIES}")
    exemplars = rng.choice(len(src.images), size=NUM_IDENTITIES, replace=False)
    labels = np.repeat(np.arange(NUM_IDENTITIES), spec.clips_per_class)
    n = len(labels)
    scale = min(h, w) / 120.0

    def walk(start: np.ndarray, step: float) -> np.ndarray:  # (n,) -> (n, t) random walk
        return start[:, None] + np.cumsum(rng.normal(0, step, size=(n, t)), axis=1)

    size = np.clip(walk(rng.uniform(50, 80, size=n) * scale, 1.5 * scale), 30 * scale, 100 * scale)
    cx = np.clip(walk(w / 2 + rng.uniform(-25, 25, size=n) * scale, 2.5 * scale), 0.3 * w, 0.7 * w)
    cy = np.clip(walk(h / 2 + rng.uniform(-15, 15, size=n) * scale, 2.0 * scale), 0.3 * h, 0.7 * h)
    angle = walk(rng.uniform(-0.25, 0.25, size=n), 0.05)
    gain = np.clip(walk(rng.uniform(0.6, 1.2, size=n), 0.04), 0.4, 1.4)
    sprites = _sprites(src.images, exemplars[labels])
    frames = _compose(rng, sprites, cx, cy, size, angle, gain, _random_colours(rng, n), h, w)
    groups = np.tile(np.arange(spec.clips_per_class) + 1, NUM_IDENTITIES)
    names = tuple(f"identity-{i:02d}" for i in range(NUM_IDENTITIES))
    return ClipSet(frames, labels.astype(np.int64), groups.astype(np.int64), names)


# --- cache ---


def _cache_key(spec: StandInSpec) -> str:
    payload = json.dumps({"version": GENERATOR_VERSION, **spec.__dict__}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def load_standin(spec: StandInSpec, cache_dir: str | os.PathLike | None = None) -> ClipSet:
    """Generate the stand-in described by ``spec``, or read it from the cache.

    The cache folder (``cache_dir`` or :func:`~kcprnn.data._io.default_cache_dir`) holds
    ``<kind>-<hash>/{frames,labels,groups}.npy`` and ``meta.json``; each file is written
    atomically and ``meta.json`` last, so a folder without it is regenerated.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "standins" / f"{spec.kind}-{_cache_key(spec)}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            class_names = tuple(json.loads(meta_path.read_text())["class_names"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{str(meta_path)!r} is not a stand-in cache record ({exc!r}); delete the "
                f"folder {str(folder)!r} and it is rebuilt"
            ) from None
        return ClipSet(
            load_npy(folder / "frames.npy"),
            load_npy(folder / "labels.npy"),
            load_npy(folder / "groups.npy"),
            class_names,
        )
    make = make_ucf11_like if spec.kind == "ucf11-like" else make_youtube_like
    clips = make(spec)
    save_npy_atomic(folder / "frames.npy", clips.frames)
    save_npy_atomic(folder / "labels.npy", clips.labels)
    save_npy_atomic(folder / "groups.npy", clips.groups)
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"spec": spec.__dict__, "class_names": list(clips.class_names)}))
    os.replace(tmp, meta_path)
    log.info("cached stand-in %s in %s", spec.kind, folder)
    return clips
