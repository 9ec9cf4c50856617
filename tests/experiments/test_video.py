"""Real-dataset loaders on clips the test encodes with PyAV (mpeg4 in .avi)."""

import logging

import numpy as np
import pytest

from kcprnn.data import CorruptClipError, decode_clip, load_video_dataset
from kcprnn.data import video as video_mod
from kcprnn.data.clips import group_split, leave_one_group_out, stratified_split
from kcprnn.data.video import sample_indices, scan_ucf11, scan_ucf50, scan_youtube_celebrities


def test_sample_indices_ascending_and_even():
    np.testing.assert_array_equal(sample_indices(11, 6), [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(sample_indices(3, 5), [0, 0, 1, 2, 2])  # short clip repeats
    with pytest.raises(ValueError, match="0 frames"):
        sample_indices(0, 6)


def test_decode_clip_samples_ascending_frames_and_scales(tmp_path, clip_writer):
    levels = clip_writer(tmp_path / "a.avi", 11)
    frames = decode_clip(tmp_path / "a.avi", 6, size=(16, 12))
    assert frames.shape == (6, 12, 16, 3) and frames.dtype == np.uint8
    # frames 0, 2, ..., 10 of a flat-grey ramp; lossy coding moves levels by a few units
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), levels[::2], atol=4)


def test_decode_clip_mpeg1_mpg(tmp_path, clip_writer):
    levels = clip_writer(tmp_path / "b.mpg", 5, codec="mpeg1video")
    frames = decode_clip(tmp_path / "b.mpg", 5, size=(32, 24))
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), levels, atol=4)


def test_decode_clip_rejects_garbage_and_truncated_files(tmp_path, clip_writer):
    bad = tmp_path / "garbage.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(CorruptClipError, match="garbage.avi"):
        decode_clip(bad, 6)
    clip_writer(tmp_path / "full.avi", 8)
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes((tmp_path / "full.avi").read_bytes()[:300])
    with pytest.raises(CorruptClipError, match="truncated.avi"):
        decode_clip(truncated, 6)


def test_scan_ucf11_groups_labels_and_skips_annotations(ucf11_tree):
    refs = scan_ucf11(ucf11_tree)
    assert len(refs) == 8
    assert {r.label for r in refs} == {"biking", "walking"}
    assert sorted({r.group for r in refs}) == [1, 2]
    assert all(r.path.suffix == ".avi" for r in refs)


def test_scan_ucf50_and_youtube_names(tmp_path):
    for name in ("v_Diving_g01_c01.avi", "v_Diving_g02_c01.avi"):
        (tmp_path / "u50" / "Diving").mkdir(parents=True, exist_ok=True)
        (tmp_path / "u50" / "Diving" / name).write_bytes(b"")
    assert sorted(r.group for r in scan_ucf50(tmp_path / "u50")) == [1, 2]
    (tmp_path / "yt").mkdir()
    (tmp_path / "yt" / "0001_03_002_alan_ball.avi").write_bytes(b"")
    (ref,) = scan_youtube_celebrities(tmp_path / "yt")
    assert (ref.label, ref.group) == ("alan_ball", 3)
    (tmp_path / "yt" / "badname.avi").write_bytes(b"")
    with pytest.raises(ValueError, match="badname.avi"):
        scan_youtube_celebrities(tmp_path / "yt")


def test_missing_folder_and_empty_class_folder(tmp_path, ucf11_tree):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_ucf11(tmp_path / "nowhere")
    (ucf11_tree / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        scan_ucf11(ucf11_tree)


def test_load_video_dataset_caches_and_skips_corrupt_clips(
    ucf11_tree, tmp_path, caplog, monkeypatch
):
    bad = ucf11_tree / "biking" / "v_biking_02" / "v_biking_02_03.avi"
    bad.write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="kcprnn"):
        clips = load_video_dataset("ucf11", ucf11_tree, 4, size=(16, 12), cache_dir=tmp_path / "c")
    assert clips.frames.shape == (8, 4, 12, 16, 3)
    assert clips.class_names == ("biking", "walking")
    np.testing.assert_array_equal(np.bincount(clips.labels), [4, 4])
    assert [p for p, _ in clips.skipped] == [str(bad)]
    assert "v_biking_02_03.avi" in caplog.text

    # second load: every readable clip comes from the cache, nothing is decoded again
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(video_mod, "decode_clip", no_decode)
    bad.unlink()
    again = load_video_dataset("ucf11", ucf11_tree, 4, size=(16, 12), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.frames, clips.frames)
    np.testing.assert_array_equal(again.groups, clips.groups)


def test_splits_follow_the_protocols():
    groups = np.repeat(np.arange(1, 11), 3)
    train, test = group_split(groups, 0.2, seed=0)
    assert len(np.intersect1d(groups[train], groups[test])) == 0
    assert len(np.unique(groups[test])) == 2
    train, test = leave_one_group_out(groups, 4)
    np.testing.assert_array_equal(test, [9, 10, 11])
    with pytest.raises(ValueError, match="fold=99"):
        leave_one_group_out(groups, 99)
    labels = np.repeat(np.arange(3), 10)
    train, test = stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[test]), [2, 2, 2])
    assert len(np.union1d(train, test)) == 30 and len(np.intersect1d(train, test)) == 0
