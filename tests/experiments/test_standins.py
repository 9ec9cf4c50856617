"""Stand-in generators: geometry of the rendering, labels, determinism, cache."""

import math

import numpy as np
import pytest
import torch

from kcprnn.data import (
    StandInSpec,
    load_source_images,
    load_standin,
    make_ucf11_like,
    make_youtube_like,
)
from kcprnn.data.standins import UCF11_LIKE_CLASSES, _render_alpha


@pytest.fixture(scope="module", autouse=True)
def _source_images():
    try:
        load_source_images()
    except FileNotFoundError as exc:  # system data (apt package), not a Python package
        pytest.skip(str(exc))


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]]
    return float((alpha * xs).sum() / alpha.sum()), float((alpha * ys).sum() / alpha.sum())


def test_render_places_and_rotates_the_sprite():
    sprite = torch.zeros(1, 1, 8, 8)
    sprite[..., :, :4] = 1.0  # left half of the sprite is opaque
    alpha = _render_alpha(
        sprite, np.array([30.0]), np.array([20.0]), np.array([16.0]), np.array([0.0]), 40, 64
    )[0, 0].numpy()
    # in pixel-centre coordinates the opaque half spans x in [22, 30], y in [12, 28]
    np.testing.assert_allclose(_centroid(alpha), (26.0, 20.0), atol=0.05)
    np.testing.assert_allclose(alpha.sum(), 8 * 16, rtol=1e-4)
    # angle pi/2 turns the sprite clockwise on screen (y down): its left half goes above the centre
    turned = _render_alpha(
        sprite,
        np.array([30.0]),
        np.array([20.0]),
        np.array([16.0]),
        np.array([math.pi / 2]),
        40,
        64,
    )[0, 0].numpy()
    np.testing.assert_allclose(_centroid(turned), (30.0, 16.0), atol=0.05)


def test_ucf11_like_motion_classes_move_as_named():
    spec = StandInSpec(clips_per_class=3, num_frames=4, height=48, width=64, seed=1)
    clips = make_ucf11_like(spec)
    assert clips.frames.shape == (33, 4, 48, 64, 3) and clips.frames.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(clips.labels), [3] * 11)
    assert clips.class_names == UCF11_LIKE_CLASSES
    # the object is brighter than the background: its motion shows in the change of the frames
    for c, name in enumerate(UCF11_LIKE_CLASSES[:8]):
        for clip in clips.frames[clips.labels == c].astype(float):
            diff = clip[-1].sum(-1) - clip[0].sum(-1)  # appears (+) ahead, vanishes (-) behind
            ahead, behind = _centroid(diff.clip(min=0)), _centroid((-diff).clip(min=0))
            dx, dy = ahead[0] - behind[0], ahead[1] - behind[1]
            angle = math.degrees(math.atan2(-dy, dx)) % 360
            assert min(abs(angle - 45 * c), 360 - abs(angle - 45 * c)) < 30, (name, angle)


def test_standins_are_deterministic_in_the_seed():
    spec = StandInSpec(clips_per_class=2, num_frames=3, height=24, width=32, seed=7)
    a, b = make_ucf11_like(spec), make_ucf11_like(spec)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = make_ucf11_like(
        StandInSpec(clips_per_class=2, num_frames=3, height=24, width=32, seed=8)
    )
    assert not np.array_equal(a.frames, other.frames)
    ya = make_youtube_like(
        StandInSpec(
            kind="youtube-like", clips_per_class=1, num_frames=3, height=24, width=32, seed=7
        )
    )
    yb = make_youtube_like(
        StandInSpec(
            kind="youtube-like", clips_per_class=1, num_frames=3, height=24, width=32, seed=7
        )
    )
    np.testing.assert_array_equal(ya.frames, yb.frames)
    assert ya.num_classes == 47 and ya.frames.shape == (47, 3, 24, 32, 3)


def test_cache_round_trip(tmp_path):
    spec = StandInSpec(clips_per_class=1, num_frames=2, height=24, width=32, seed=3)
    first = load_standin(spec, tmp_path)
    (folder,) = (tmp_path / "standins").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "frames.npy",
        "groups.npy",
        "labels.npy",
        "meta.json",
    ]
    again = load_standin(spec, tmp_path)
    np.testing.assert_array_equal(again.frames, make_ucf11_like(spec).frames)
    np.testing.assert_array_equal(again.frames, first.frames)
    assert again.class_names == first.class_names


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="num_frames"):
        StandInSpec(num_frames=0)
    with pytest.raises(ValueError, match="kind"):
        StandInSpec(kind="ucf50-like")
