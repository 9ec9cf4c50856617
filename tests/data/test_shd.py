"""SHD-layout files: reading, binning, bad files, splits; the spike encoder on pure tones."""

from pathlib import Path

import h5py  # in the test extra: these tests run for real
import numpy as np
import pytest

from kcprnn.data import (
    EncoderSpec,
    SpikeFileError,
    bin_spikes,
    encode_spikes,
    load_spike_dataset,
    read_spike_file,
    validation_split,
    write_spike_file,
)
from kcprnn.data.spikes import channel_frequencies


def write_raw(path: Path, times, units, labels, speakers, keys=None, replace=None) -> Path:
    """An SHD-layout file written with plain h5py (independent of ``write_spike_file``);
    ``replace`` swaps a field's data (``{"name": array}``) or drops it (``{"name": None}``)."""
    replace = replace or {}
    fields = {
        "spikes/times": (times, h5py.vlen_dtype(np.float32)),
        "spikes/units": (units, h5py.vlen_dtype(np.uint16)),
        "labels": (np.asarray(labels, np.uint16), None),
        "extra/speaker": (np.asarray(speakers, np.uint16), None),
    }
    if keys is not None:
        fields["extra/keys"] = (np.array([k.encode() for k in keys], dtype=object), "S")
    with h5py.File(path, "w") as f:
        for name, (data, dtype) in fields.items():
            data = replace.get(name, data)
            if data is None:
                continue
            if isinstance(dtype, np.dtype) and h5py.check_vlen_dtype(dtype) is not None:
                ds = f.create_dataset(name, (len(data),), dtype=dtype)
                for k, row in enumerate(data):
                    ds[k] = row
            elif dtype == "S":
                f.create_dataset(name, data=np.array([bytes(d) for d in data]))
            else:
                f.create_dataset(name, data=data)
    return path


def sample_data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 7, 40, 3, 12][:n]
    times = [np.sort(rng.uniform(0, 1.2, size=k)).astype(np.float32) for k in lengths]
    units = [rng.integers(0, 700, size=k).astype(np.uint16) for k in lengths]
    return times, units, np.arange(n) % 3, np.arange(n) % 2


# --- reading ---


def test_variable_length_round_trip_through_both_writers(tmp_path):
    times, units, labels, speakers = sample_data()
    keys = ["zero", "one", "two"]
    for path in (
        write_raw(tmp_path / "raw.h5", times, units, labels, speakers, keys),
        tmp_path / "ours.h5",
    ):
        if path.name == "ours.h5":
            write_spike_file(path, times, units, labels, speakers, keys)
        s = read_spike_file(path)
        assert len(s) == 6 and s.class_names == tuple(keys) and s.num_units == 700
        np.testing.assert_array_equal(s.labels, labels)
        np.testing.assert_array_equal(s.speakers, speakers)
        np.testing.assert_array_equal(s.spike_counts(), [len(t) for t in times])
        for k in range(6):
            t, u = s.sample(k)
            np.testing.assert_array_equal(t, times[k])
            np.testing.assert_array_equal(u, units[k])
        # a subset keeps each sample's own spikes
        sub = s.subset([4, 2])
        np.testing.assert_array_equal(sub.sample(0)[1], units[4])
        np.testing.assert_array_equal(sub.sample(1)[0], times[2])


def test_file_without_keys_gets_numbered_classes(tmp_path):
    times, units, labels, speakers = sample_data()
    s = read_spike_file(write_raw(tmp_path / "a.h5", times, units, labels, speakers))
    assert s.class_names == ("class-0", "class-1", "class-2")


def test_writer_is_byte_for_byte_deterministic(tmp_path):
    times, units, labels, speakers = sample_data()
    for name in ("a.h5", "b.h5"):
        write_spike_file(tmp_path / name, times, units, labels, speakers, ["x", "y", "z"])
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


# --- binning ---


def test_binning_matches_a_hand_computed_case():
    times = np.array([0.0, 0.005, 0.012, 0.305, 0.999, 1.0, 1.7], dtype=np.float32)
    units = np.array([3, 3, 1, 699, 0, 2, 5])
    frames = bin_spikes(times, units, bin_width=0.01, max_time=1.0)
    expected = np.zeros((100, 700), np.float32)
    expected[0, 3] = 2  # 0.0 and 0.005 share bin 0
    expected[1, 1] = 1
    expected[30, 699] = 1
    expected[99, 0] = 1  # 1.0 and 1.7 lie at or after max_time: dropped
    np.testing.assert_array_equal(frames, expected)
    coarse = bin_spikes(times, units, num_units=700, bin_width=0.25, max_time=0.5)
    assert coarse.shape == (2, 700)
    assert coarse.sum() == 4 and coarse[0, 3] == 2 and coarse[1, 699] == 1


def test_batch_frames_equal_per_sample_binning(tmp_path):
    times, units, labels, speakers = sample_data()
    write_spike_file(tmp_path / "a.h5", times, units, labels, speakers, ["x", "y", "z"])
    s = read_spike_file(tmp_path / "a.h5")
    idx = [5, 0, 3, 2]
    batch = s.frames(idx, bin_width=0.02, max_time=1.1)
    assert batch.shape == (4, 55, 700)
    for row, k in enumerate(idx):
        np.testing.assert_array_equal(
            batch[row], bin_spikes(times[k], units[k], bin_width=0.02, max_time=1.1)
        )


# --- bad files ---


def test_bad_files_name_the_file_and_the_field(tmp_path):
    times, units, labels, speakers = sample_data()
    args = (times, units, labels, speakers)
    cases = {
        "missing.h5": ({"extra/speaker": None}, "missing field 'extra/speaker'"),
        "short_labels.h5": ({"labels": np.zeros(5, np.uint16)}, "'labels' has 5 entries"),
        "units_count.h5": ({"spikes/units": units[:5]}, "'spikes/units' has 5 samples"),
        "sample_len.h5": (
            {"spikes/units": [u[:-1] if len(u) else u for u in units]},
            r"sample 1 has 1 spike times \(spikes/times\) but 0 units",
        ),
        "range.h5": (
            {"spikes/units": [*units[:3], np.full(40, 700, np.uint16), *units[4:]]},
            r"'spikes/units' holds unit 700 \(sample 3\)",
        ),
        "flat_times.h5": ({"spikes/times": None}, "'spikes/times' must hold variable-length"),
        "float_labels.h5": ({"labels": np.zeros(6, np.float32)}, "'labels' must hold integers"),
    }
    for name, (replace, message) in cases.items():
        path = tmp_path / name
        write_raw(path, *args, replace=replace)
        if name == "flat_times.h5":  # a plain float dataset instead of vlen arrays
            with h5py.File(path, "a") as f:
                f["spikes/times"] = np.zeros(6, np.float32)
        with pytest.raises(SpikeFileError, match=message) as info:
            read_spike_file(path)
        assert name in str(info.value)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SpikeFileError, match="text.h5: not a readable HDF5 file"):
        read_spike_file(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        read_spike_file(tmp_path / "nothing.h5")


# --- splits ---


def test_validation_split_by_class_and_by_speaker():
    labels = np.repeat(np.arange(4), 10)
    speakers = np.tile(np.arange(5), 8)
    train, valid = validation_split(labels, speakers, 0.2, seed=3)
    assert sorted([*train, *valid]) == list(range(40))
    np.testing.assert_array_equal(np.bincount(labels[valid]), [2, 2, 2, 2])
    train, valid = validation_split(labels, speakers, 0.4, seed=3, by_speaker=True)
    assert sorted([*train, *valid]) == list(range(40))
    assert len(np.unique(speakers[valid])) == 2
    assert not set(speakers[valid]) & set(speakers[train])
    again = validation_split(labels, speakers, 0.4, seed=3, by_speaker=True)
    np.testing.assert_array_equal(again[1], valid)
    # classes smaller than 1 / fraction still give a validation set of the right size
    train, valid = validation_split(np.arange(20), np.zeros(20), 0.25, seed=0)
    assert len(valid) == 5 and len(train) == 15
    with pytest.raises(ValueError, match="fraction"):
        validation_split(labels, speakers, 1.0, seed=0)


def test_released_split_is_kept_and_ssc_reads_its_valid_file(tmp_path):
    rng = np.random.default_rng(0)

    def write(path, n, speaker_ids):
        times = [np.sort(rng.uniform(0, 1, 5)).astype(np.float32) for _ in range(n)]
        units = [rng.integers(0, 700, 5) for _ in range(n)]
        write_spike_file(
            path, times, units, np.arange(n) % 4, speaker_ids, [f"c{k}" for k in range(4)]
        )

    shd = tmp_path / "shd"
    write(shd / "shd_train.h5", 40, np.arange(40) % 4)
    write(shd / "shd_test.h5", 12, [4, 5] * 4 + [0, 1, 2, 3])  # speakers 4, 5 only in test
    splits = load_spike_dataset(shd, "shd", valid_fraction=0.25, seed=1)
    assert len(splits.data) == 52
    np.testing.assert_array_equal(splits.test, np.arange(40, 52))
    assert sorted([*splits.train, *splits.valid]) == list(range(40))
    # a quarter of the training file, 2 or 3 of each class's 10
    assert len(splits.valid) == 10
    assert sorted(np.bincount(splits.data.labels[splits.valid])) == [2, 2, 3, 3]
    assert {4, 5} <= set(splits.data.speakers[splits.test])
    assert not {4, 5} & set(splits.data.speakers[np.r_[splits.train, splits.valid]])
    ssc = tmp_path / "ssc"
    write(ssc / "ssc_train.h5", 8, np.zeros(8, int))
    write(ssc / "ssc_valid.h5", 4, np.ones(4, int))
    write(ssc / "ssc_test.h5", 4, np.full(4, 2))
    splits = load_spike_dataset(ssc, "ssc")
    assert (splits.train.tolist(), splits.valid.tolist()) == (list(range(8)), [8, 9, 10, 11])
    assert splits.test.tolist() == [12, 13, 14, 15]
    (ssc / "ssc_valid.h5").unlink()
    with pytest.raises(FileNotFoundError, match="ssc_valid.h5"):
        load_spike_dataset(ssc, "ssc")


# --- encoder ---


@pytest.mark.parametrize("freq", [500.0, 2000.0])
def test_encoder_puts_a_pure_tone_on_its_channels(freq):
    rate = 16000
    t = np.arange(int(0.3 * rate)) / rate
    ramp = np.sin(np.pi / 2 * np.clip(np.minimum(t, 0.3 - t) / 0.02, 0, 1)) ** 2  # no clicks
    times, units = encode_spikes(np.sin(2 * np.pi * freq * t) * ramp, rate)
    centres = channel_frequencies(EncoderSpec(), rate)
    counts = np.bincount(units, minlength=700)
    assert abs(centres[np.argmax(counts)] - freq) / freq < 0.05
    # every spike comes from a channel whose filter (one ERB wide on each side) or the Hann
    # window's main lobe (80 Hz for 25 ms) reaches the tone: centres within 2 ERB of it
    erb = 24.7 * (0.00437 * freq + 1)
    assert counts[np.abs(centres - freq) > 2 * erb].sum() == 0
    assert counts[np.abs(centres - freq) <= erb].sum() > 0.6 * counts.sum()
    assert times.min() >= 0 and times.max() <= 0.3 + 0.02
    assert np.all(np.diff(times) >= 0)
    silent = encode_spikes(np.zeros(4000), rate)
    assert len(silent[0]) == 0
