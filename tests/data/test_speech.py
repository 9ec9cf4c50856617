"""Speech data: SPHERE files, TIMIT and TED-LIUM on tiny trees in their on-disk layouts, the
61 -> 39 phone folding, filterbank features and their cache."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kcprnn.data.speech import (
    CHARACTERS,
    FOLD_61_TO_39,
    PHONES_39,
    PHONES_61,
    CorruptAudioError,
    FeatureSpec,
    clean_transcript,
    compute_features,
    deltas,
    extract_features,
    fold_phones,
    load_speech_set,
    load_tedlium,
    load_timit,
    normalize,
    read_audio,
    read_sphere_header,
    read_stm,
    stack_frames,
    tilt_bands,
    warp_bands,
    write_sphere,
)

RATE = 16000


def tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).normal(0, 0.01, len(t))
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_timit_utt(folder: Path, name: str, phones: list[str] | None, sphere: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    audio = tone(0.3, seed=len(name))
    if sphere:
        write_sphere(folder / f"{name}.WAV", audio)
    else:
        sf.write(str(folder / f"{name}.wav"), audio, RATE, subtype="PCM_16")
    if phones is not None:
        bounds = np.linspace(0, len(audio), len(phones) + 1).astype(int)
        lines = [f"{a} {b} {p}" for a, b, p in zip(bounds[:-1], bounds[1:], phones, strict=True)]
        ext = ".PHN" if sphere else ".phn"
        (folder / f"{name}{ext}").write_text("\n".join(lines) + "\n")


def timit_tree(root: Path, upper: bool) -> Path:
    """TRAIN: 1 speaker (SA1 dropped, SI648 kept, SX18 without .PHN skipped); TEST: a core test
    speaker (MDAB0), a dev speaker (FAKS0) and a speaker in neither set (MXYZ0)."""

    def d(*parts):
        return root.joinpath(*[p.upper() if upper else p.lower() for p in parts])

    phones = ["h#", "sh", "ix", "hv", "eh", "dcl", "jh", "q", "h#"]
    for speaker_dir, names in (
        (d("timit", "train", "dr1", "fcjf0"), ["sa1", "si648"]),
        (d("timit", "test", "dr1", "mdab0"), ["sa1", "si1039", "sx139"]),
        (d("timit", "test", "dr1", "faks0"), ["si943"]),
        (d("timit", "test", "dr2", "mxyz0"), ["si100"]),
    ):
        for n in names:
            write_timit_utt(speaker_dir, n.upper() if upper else n, phones, sphere=upper)
    write_timit_utt(d("timit", "train", "dr1", "fcjf0"), "SX18" if upper else "sx18", None, upper)
    return root / ("TIMIT" if upper else "timit")


def test_sphere_round_trip_header_and_truncation(tmp_path):
    audio = tone(0.25)
    path = tmp_path / "a.sph"
    write_sphere(path, audio)
    header = read_sphere_header(path)
    assert header["sample_count"] == len(audio) and header["sample_rate"] == RATE
    assert header["header_bytes"] == 1024 and header["sample_coding"] == "pcm"
    x, rate = read_audio(path)
    assert rate == RATE and np.allclose(x, audio, atol=1.0 / 32767)
    part, _ = read_audio(path, 100, 300)
    assert np.array_equal(part, x[100:300])
    # libsndfile's own SPHERE writer is read the same way
    sf.write(str(tmp_path / "b.sph"), audio, RATE, format="NIST", subtype="PCM_16")
    assert read_sphere_header(tmp_path / "b.sph") is not None
    assert np.allclose(read_audio(tmp_path / "b.sph")[0], x, atol=2.0 / 32767)
    (tmp_path / "c.sph").write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CorruptAudioError, match=r"c\.sph.*truncated"):
        read_audio(tmp_path / "c.sph")
    with pytest.raises(FileNotFoundError, match="nope.sph"):
        read_audio(tmp_path / "nope.sph")


@pytest.mark.parametrize("upper", [True, False])
def test_timit_layouts_protocol_and_skips(tmp_path, upper, caplog):
    root = timit_tree(tmp_path, upper)
    with caplog.at_level(logging.WARNING):
        corpus = load_timit(tmp_path)  # the parent of TIMIT/ is accepted too
    assert load_timit(root).splits == corpus.splits
    ids = {k: [u.uid for u in v] for k, v in corpus.splits.items()}
    assert ids == {
        "train": ["fcjf0_si648"],
        "dev": ["faks0_si943"],
        "test": ["mdab0_si1039", "mdab0_sx139"],
    }
    utt = corpus.splits["train"][0]
    assert utt.tokens == ("h#", "sh", "ix", "hv", "eh", "dcl", "jh", "q", "h#")
    assert corpus.vocabulary == PHONES_61 and corpus.unit == "phone"
    ((skipped_path, reason),) = corpus.skipped
    assert Path(skipped_path).stem.lower() == "sx18" and "PHN" in reason
    assert "sx18" in caplog.text.lower()
    x, rate = read_audio(utt.path)
    assert rate == RATE and len(x) == int(0.3 * RATE)


def test_timit_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_timit(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="TRAIN"):
        load_timit(tmp_path)


def test_phone_folding_61_to_39():
    assert len(PHONES_61) == 61 and len(set(PHONES_61)) == 61
    assert len(PHONES_39) == 39 and "sil" in PHONES_39 and "q" not in PHONES_39
    assert set(FOLD_61_TO_39) == set(PHONES_61)
    assert fold_phones(["ao", "q", "pcl", "h#", "ix", "zh", "ax-h", "en", "iy"]) == [
        "aa",
        "sil",
        "sil",
        "ih",
        "sh",
        "ah",
        "n",
        "iy",
    ]
    assert sum(v == "sil" for v in FOLD_61_TO_39.values()) == 9


def write_talk(root: Path, split: str, talk: str, seconds: float, stm_lines: list[str]) -> None:
    (root / split / "sph").mkdir(parents=True, exist_ok=True)
    (root / split / "stm").mkdir(parents=True, exist_ok=True)
    write_sphere(root / split / "sph" / f"{talk}.sph", tone(seconds))
    (root / split / "stm" / f"{talk}.stm").write_text("\n".join(stm_lines) + "\n")


@pytest.mark.parametrize("release", ["TEDLIUM_release2", "TEDLIUM_release-3/legacy"])
def test_tedlium_stm_segments_ignored_and_empty(tmp_path, release, caplog):
    root = tmp_path / release
    write_talk(
        root,
        "train",
        "TalkA_2010",
        3.0,
        [
            "TalkA_2010 1 TalkA_2010 0.00 0.50 <o,f0,male> ignore_time_segment_in_scoring",
            "TalkA_2010 1 TalkA_2010 0.50 1.50 <o,f0,male> hello {NOISE} world(2) it's",
            "TalkA_2010 1 TalkA_2010 1.50 2.00 <o,f0,male> {SMACK} <sil>",
            "TalkA_2010 1 TalkA_2010 2.00 2.75 <o,f0,male> again",
        ],
    )
    write_talk(root, "test", "TalkB_2011", 1.0, ["TalkB_2011 1 spk 0.10 0.90 <o,f0,female> bye"])
    (root / "dev" / "stm").mkdir(parents=True)
    (root / "dev" / "stm" / "NoAudio.stm").write_text("NoAudio 1 x 0 1 <o> words\n")
    with caplog.at_level(logging.WARNING):
        corpus = load_tedlium(tmp_path)
    train = corpus.splits["train"]
    assert [u.tokens for u in train] == [("hello", "world", "it's"), ("again",)]
    assert [(u.start, u.stop) for u in train] == [(0.5, 1.5), (2.0, 2.75)]
    assert [u.tokens for u in corpus.splits["test"]] == [("bye",)] and not corpus.splits["dev"]
    reasons = sorted(r for _, r in corpus.skipped)
    assert reasons == ["empty transcript", "no audio file NoAudio.sph"]
    assert "TalkA_2010.stm@1.50-2.00" in caplog.text and "NoAudio.stm" in caplog.text
    assert corpus.unit == "char" and corpus.vocabulary == CHARACTERS
    # segments are cut by time: 1 s and 0.75 s of audio -> 101 and 76 frames of 10 ms
    spec = FeatureSpec(n_mels=80, energy=False, deltas=False)
    data = load_speech_set(corpus, spec, tmp_path / "cache")
    assert [len(f) for f in data.frames] == [101, 76, 81] and data.input_size == 80
    assert "".join(CHARACTERS[i - 1] for i in data.targets[0]) == "hello world it's"
    with pytest.raises(FileNotFoundError, match="no TED-LIUM corpus"):
        load_tedlium(tmp_path / release / "train")


def test_stm_reader_and_transcript_cleaning(tmp_path):
    p = tmp_path / "t.stm"
    p.write_text(";; comment\nT 1 S 1.5 2.5 <o,f0,male> Some TEXT here\nT 1 S 3 4 plain words\n")
    assert read_stm(p) == [
        ("T", "S", 1.5, 2.5, "Some TEXT here"),
        ("T", "S", 3.0, 4.0, "plain words"),
    ]
    assert clean_transcript("Hello {BREATH} there(2) <unk> don't [laugh] x-y") == [
        "hello",
        "there",
        "don't",
        "xy",
    ]
    p.write_text("T 1 S a b <o> x\n")
    with pytest.raises(ValueError, match=r"t\.stm:1"):
        read_stm(p)


def test_deltas_match_the_htk_regression_by_hand():
    x = np.array([[0.0], [1.0], [4.0], [9.0], [16.0]])
    d = deltas(x, width=2)
    # t = 2: (1 * (9 - 1) + 2 * (16 - 0)) / 10 = 4.0; t = 0 with edges repeated:
    # (1 * (1 - 0) + 2 * (4 - 0)) / 10 = 0.9
    assert d[2, 0] == pytest.approx(4.0) and d[0, 0] == pytest.approx(0.9)
    assert d[4, 0] == pytest.approx((1 * (16 - 9) + 2 * (16 - 4)) / 10)


def test_filterbank_features_shape_and_tone_band():
    spec = FeatureSpec()
    assert spec.dim == 123 and FeatureSpec(n_mels=80, energy=False, deltas=False).dim == 80
    low, high = (
        compute_features(tone(0.5, 300), RATE, spec),
        compute_features(tone(0.5, 3000), RATE, spec),
    )
    assert low.shape == (1 + 8000 // 160, 123) and low.dtype == np.float32
    # the loudest band follows the tone's frequency; deltas of a steady tone are ~0 mid-utterance
    assert low[20:30, :40].mean(0).argmax() < high[20:30, :40].mean(0).argmax()
    peak = low[20:30, :40].mean(0).argmax()
    assert np.abs(low[20:30, 41 + peak]).max() < 0.05 and np.abs(low[20:30, 82 + peak]).max() < 0.05
    # the energy column: the louder tone has the larger log energy
    assert (
        low[20:30, 40].mean() > compute_features(0.1 * tone(0.5, 300), RATE, spec)[20:30, 40].mean()
    )
    # another sample rate is resampled to 16 kHz first: the same number of frames
    t = np.arange(int(0.5 * 22050)) / 22050
    other = compute_features((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 22050, spec)
    assert other.shape == low.shape


def test_feature_cache_is_keyed_and_skips_truncated_files(tmp_path, caplog):
    for name in ("a", "b"):
        write_sphere(tmp_path / f"{name}.sph", tone(0.2))
    (tmp_path / "bad.sph").write_bytes((tmp_path / "a.sph").read_bytes()[:2000])
    sources = [(str(tmp_path / f"{n}.sph"), 0.0, -1.0) for n in ("a", "bad", "b")]
    with caplog.at_level(logging.WARNING):
        store = extract_features(["a", "bad", "b"], sources, FeatureSpec(), tmp_path / "cache")
    assert store.uids == ("a", "b") and len(store.skipped) == 1
    assert "bad.sph" in store.skipped[0][0] and "bad.sph" in caplog.text
    assert store.features.dtype == np.float16 and list(store.lengths) == [21, 21]
    again = extract_features(["a", "bad", "b"], sources, FeatureSpec(), tmp_path / "cache")
    assert np.array_equal(np.asarray(again.features), np.asarray(store.features))
    assert again.skipped == store.skipped
    other = extract_features(["a"], sources[:1], FeatureSpec(n_mels=20), tmp_path / "cache")
    assert other.features.shape[1] == 63
    assert len(list((tmp_path / "cache" / "speech-features").iterdir())) == 2


def test_normalization_and_frame_stacking():
    rng = np.random.default_rng(0)
    frames = [rng.normal(3, 2, (10, 4)), rng.normal(-1, 5, (6, 4)), rng.normal(7, 1, (8, 4))]
    out = normalize(frames, ["s1", "s1", "s2"], [True, True, False], "global")
    train = np.concatenate(out[:2])
    assert np.allclose(train.mean(0), 0, atol=1e-5) and np.allclose(train.std(0), 1, atol=1e-4)
    per = normalize(frames, ["s1", "s1", "s2"], [True, True, False], "speaker")
    assert np.allclose(per[2].mean(0), 0, atol=1e-5)
    assert np.allclose(np.concatenate(per[:2]).std(0), 1, atol=1e-4)
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    assert np.array_equal(stack_frames(x, 2), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 9]])
    with pytest.raises(ValueError, match="normalization"):
        normalize(frames, ["a"] * 3, [True] * 3, "cepstral")


def test_spectral_tilt_by_hand_and_leaves_the_deltas():
    # two utterances, one step, two stacked frames of (static, delta) groups of 3 bands + energy
    x = torch.arange(32, dtype=torch.float64).reshape(2, 1, 16)
    out = tilt_bands(x, 3, 4, 2, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]))
    # u = -1, 0, 1: utterance 0 gets u, utterance 1 gets 3 (u^2 - 1/3) = 2, -1, 2, on the static
    # bands of both frames (groups 0 and 2); deltas (groups 1 and 3) and energies unchanged
    up = [-1, 0, 1, 0, 0, 0, 0, 0]
    bend = [2, -1, 2, 0, 0, 0, 0, 0]
    assert torch.allclose(out[0, 0], x[0, 0] + torch.tensor(up + up, dtype=torch.float64))
    assert torch.allclose(out[1, 0], x[1, 0] + torch.tensor(bend + bend, dtype=torch.float64))
    # a constant offset has no time derivative: tilting [static, deltas(static)] equals
    # [tilted static, deltas(tilted static)]
    rng = np.random.default_rng(1)
    static = rng.normal(size=(9, 6))  # 9 frames, 5 bands + energy
    feats = torch.from_numpy(np.concatenate([static, deltas(static)], axis=1))[None]
    s, k = torch.tensor([0.7]), torch.tensor([-0.4])
    tilted = tilt_bands(feats, 5, 6, 2, s, k)[0].numpy()
    static_t = tilt_bands(torch.from_numpy(static)[None], 5, 6, 1, s, k)[0].numpy()
    assert np.allclose(tilted, np.concatenate([static_t, deltas(static_t)], axis=1))
    with pytest.raises(ValueError, match="3 orders: a frame holds 16 values"):
        tilt_bands(x, 3, 4, 3, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"one curvature per utterance \(2\), got \(1,\)"):
        tilt_bands(x, 3, 4, 2, torch.zeros(2), torch.zeros(1))


def test_band_warp_by_hand_and_commutes_with_deltas():
    # two utterances, one step, two groups (say static and delta) of 4 bands + energy
    x = torch.arange(20, dtype=torch.float64).reshape(2, 1, 10)
    out = warp_bands(x, 4, 5, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert torch.equal(out[0], x[0])  # factor 1: unchanged
    # factor 0.5: band j reads position j / 2: x0, (x0 + x1) / 2, x1, (x1 + x2) / 2; energy kept
    assert out[1, 0].tolist() == [10, 10.5, 11, 11.5, 14, 15, 15.5, 16, 16.5, 19]
    # factor 1.5: positions 0, 1.5, 3, 4.5 -> the last band (3)
    up = warp_bands(x[:1], 4, 5, torch.tensor([1.5], dtype=torch.float64))
    assert up[0, 0].tolist() == [0, 1.5, 3, 3, 4, 5, 6.5, 8, 8, 9]
    # deltas are linear in time and the warp in frequency: warping the deltas of the bands
    # equals the deltas of the warped bands
    rng = np.random.default_rng(0)
    static = rng.normal(size=(12, 6))  # 12 frames, 5 bands + energy
    feats = np.concatenate([static, deltas(static)], axis=1)  # (12, 12)
    f = torch.tensor([0.83])
    warped = warp_bands(torch.from_numpy(feats)[None], 5, 6, f)[0].numpy()
    static_w = warp_bands(torch.from_numpy(static)[None], 5, 6, f)[0].numpy()
    assert np.allclose(warped, np.concatenate([static_w, deltas(static_w)], axis=1))
    with pytest.raises(ValueError, match="a frame holds 10 values"):
        warp_bands(x, 4, 3, torch.ones(2))
    with pytest.raises(ValueError, match=r"one warp factor per utterance \(2\), got \(3,\)"):
        warp_bands(x, 4, 5, torch.ones(3))
