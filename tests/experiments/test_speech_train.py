"""The speech task: CTC decoding and error rates against hand-computed cases, the CTC model,
``kcprnn train`` on a tiny TIMIT tree and on a tiny TIMIT-like stand-in, the presets, and a smoke
test on real recordings (pocketsphinx-testdata's LibriVox utterances)."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kcprnn
from kcprnn.cli import main as cli_main
from kcprnn.data.speech import (
    CHARACTERS,
    FeatureSpec,
    SpeechStandInSpec,
    compute_features,
    espeak_phonemes,
    flite_available,
    load_speech_standin,
    read_audio,
    speech_standin_dir,
    write_sphere,
)
from kcprnn.experiments.config import Config, load_config
from kcprnn.experiments.ctc import (
    Bigram,
    CTCModel,
    beam_search,
    char_error_rate,
    error_rate,
    greedy_decode,
)
from kcprnn.experiments.report import collect, format_table
from kcprnn.experiments.speech import SpeechTask, _batch, build_ctc_model, load_speech_data
from kcprnn.experiments.train import load_checkpoint, model_numbers

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
FORMATS = ("dense", "kcp", "tt", "tr", "bt", "ht")

needs_synth = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not flite_available(),
    reason="espeak-ng and flite (Debian packages espeak-ng, flite; `make system-deps`) are missing",
)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    best = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    scores = np.full((len(best), 4), -5.0)
    scores[np.arange(len(best)), best] = 0.0
    assert greedy_decode(scores) == [1, 1, 2, 3]
    assert greedy_decode(scores, length=5) == [1, 1, 2]
    assert greedy_decode(np.zeros((0, 4))) == []


def _labelling_probs(probs: np.ndarray) -> dict[tuple, float]:
    """Brute force: every labelling's CTC probability, summed over all ``C ** T`` paths of the
    ``(T, C)`` frame probabilities (blank 0)."""
    t, c = probs.shape
    totals: dict[tuple, float] = {}
    for path in itertools.product(range(c), repeat=t):
        label = tuple(s for k, s in enumerate(path) if s and (k == 0 or path[k - 1] != s))
        totals[label] = totals.get(label, 0.0) + float(np.prod(probs[np.arange(t), path]))
    return totals


def test_beam_search_finds_the_most_probable_labelling():
    # two frames, P(blank) = 0.6, P(a) = 0.4: the best path is blank-blank (""), p = 0.36, but
    # "a" has p = 0.4 * 0.4 + 0.4 * 0.6 + 0.6 * 0.4 = 0.64
    lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
    assert greedy_decode(lp) == [] and beam_search(lp, beam_size=4) == [1]
    # against brute force over every path of a random 5-frame, 3-symbol case
    rng = np.random.default_rng(0)
    for _ in range(3):
        probs = rng.dirichlet(np.ones(3), size=5)
        totals = _labelling_probs(probs)
        best = max(totals, key=totals.get)
        assert tuple(beam_search(np.log(probs), beam_size=50)) == best


def test_beam_search_with_a_bigram_against_brute_force():
    # add-one counts: from the start 1 -> 3, 2 -> 1; after 1: 1 -> 1, 2 -> 2; after 2: 1, 1
    lm = Bigram.estimate([[1, 2], [1]], 3, smoothing=1.0)
    assert np.allclose(
        np.exp(lm.log_probs[:, 1:]), [[3 / 4, 1 / 4], [1 / 3, 2 / 3], [1 / 2, 1 / 2]]
    )
    assert np.all(np.isneginf(lm.log_probs[:, 0]))  # the blank is never predicted
    # what an extension scores: weight * log P + bonus (from the start, P(1) = 2 / 3 here)
    scores = Bigram.estimate([[1]], 3, weight=2.0, bonus=0.5).scores()
    assert scores[0, 1] == pytest.approx(2.0 * np.log(2 / 3) + 0.5)
    weight, bonus = 1.5, 0.7
    rng = np.random.default_rng(1)
    for _ in range(3):
        probs = rng.dirichlet(np.ones(3), size=5)
        totals = _labelling_probs(probs)
        fused = {
            label: np.log(p)
            + sum(
                weight * lm.log_probs[a, b] + bonus
                for a, b in zip((0, *label)[: len(label)], label, strict=True)
            )
            for label, p in totals.items()
        }
        best = max(fused, key=fused.get)
        fused_lm = Bigram(lm.log_probs, weight, bonus)
        assert tuple(beam_search(np.log(probs), 50, None, fused_lm)) == best
        # weight 0 and bonus 0: the language model changes nothing
        silent = Bigram(lm.log_probs, weight=0.0)
        assert beam_search(np.log(probs), 50, None, silent) == beam_search(np.log(probs), 50)
    with pytest.raises(ValueError, match=r"sequence 1 holds symbol 3, outside 1..2"):
        Bigram.estimate([[1], [3]], 3)
    with pytest.raises(ValueError, match="covers 3 symbols, the scores 4"):
        beam_search(np.zeros((2, 4)), 4, None, lm)


def test_error_rates_against_hand_counts():
    # 1 substitution (b -> x) + 1 deletion (d) over 4 words; then 1 insertion over 2
    assert error_rate([["a", "b", "c", "d"]], [["a", "x", "c"]]) == pytest.approx(2 / 4)
    assert error_rate([["a", "b"]], [["a", "z", "b"]]) == pytest.approx(1 / 2)
    # totals over utterances, not a mean of rates; an empty hypothesis deletes everything
    assert error_rate([["a"], ["b", "c", "d"]], [["x"], []]) == pytest.approx(4 / 4)
    assert error_rate([["sh", "ix"]], [["sh", "ix"]]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        error_rate([[]], [["a"]])


def test_char_error_rate_against_hand_counts():
    # "the cat" (7 characters with the space) -> "the hat": one substitution
    assert char_error_rate([["the", "cat"]], [["the", "hat"]]) == pytest.approx(1 / 7)
    # "ab cd" -> "abcd": the space deleted (1 of 5); an empty hypothesis deletes all 2 + 5
    assert char_error_rate([["ab", "cd"]], [["abcd"]]) == pytest.approx(1 / 5)
    assert char_error_rate([["ab"], ["ab", "cd"]], [[], ["ab", "cd"]]) == pytest.approx(2 / 7)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ctc_model_every_format(fmt):
    torch.manual_seed(0)
    opts = {} if fmt == "dense" else {"rank": 2}
    model = CTCModel(
        24,
        16,
        7,
        num_layers=2,
        format=fmt,
        format_options=opts,
        hidden_format=fmt,
        hidden_options=opts,
        hidden_modes=[4, 4],
        cell="gru" if fmt == "tt" else "lstm",
    )
    x = torch.randn(3, 9, 24)
    out = model(x)
    assert out.shape == (3, 9, 7)
    assert torch.allclose(out.exp().sum(-1), torch.ones(3, 9), atol=1e-5)
    loss = torch.nn.functional.ctc_loss(
        out.transpose(0, 1),
        torch.tensor([1, 2, 3, 4, 5, 6]),
        torch.tensor([9, 9, 7]),
        torch.tensor([2, 3, 1]),
    )
    loss.backward()
    assert torch.isfinite(loss) and model.weight_hh.num_params > 0


def _tiny_timit(root: Path) -> Path:
    rng = np.random.default_rng(0)
    phones = ["h#", "s", "ix", "n", "h#"]
    for split, speaker, names in (
        ("TRAIN", "FCJF0", ["SI648", "SX18", "SX28", "SX38"]),
        ("TEST", "MDAB0", ["SI1039"]),
        ("TEST", "FAKS0", ["SI943"]),
    ):
        d = root / "TIMIT" / split / "DR1" / speaker
        d.mkdir(parents=True)
        for name in names:
            audio = rng.normal(0, 0.1, 4000).astype(np.float32)
            write_sphere(d / f"{name}.WAV", audio)
            if name != "SX38":  # a missing .PHN: skipped and counted
                edges = np.linspace(0, 4000, len(phones) + 1).astype(int)
                (d / f"{name}.PHN").write_text(
                    "".join(
                        f"{a} {b} {p}\n"
                        for a, b, p in zip(edges[:-1], edges[1:], phones, strict=True)
                    )
                )
    (root / "TIMIT" / "TRAIN" / "DR1" / "FCJF0" / "SX28.WAV").write_bytes(b"NIST_1A\n   1024\n")
    return root / "TIMIT"


def tiny_timit_run(tmp_path: Path, **overrides) -> dict:
    """Config keys of a tiny bidirectional run on :func:`_tiny_timit`'s tree (written under
    ``tmp_path``), ``overrides`` on top."""
    return {
        "dataset": "timit",
        "data_dir": str(_tiny_timit(tmp_path)),
        "cache_dir": str(tmp_path / "cache"),
        "hidden_size": 16,
        "hidden_modes": (4, 4),
        "format_options": {"rank": 2},
        "bidirectional": True,
        "epochs": 2,
        "lr": 1e-2,
        "progress": False,
        "threads": 1,
        **overrides,
    }


def test_kcprnn_train_on_a_tiny_timit_tree(tmp_path, capsys):
    data_dir = _tiny_timit(tmp_path)
    run = tmp_path / "run"
    args = [
        "--config",
        str(CONFIGS / "timit_kcp.toml"),
        f"--data_dir={data_dir}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--out_dir={run}",
        "--epochs=2",
        "--hidden_size=16",
        "--hidden_modes=[4,4]",
        "--num_layers=2",  # the preset's three layer tables become two
        "--layer_options=[{rank = 1, terms = 2, in_modes = [[3, 1], [1, 41]], "
        "out_modes = [[4, 1], [1, 16]]}, {rank = 0.5}]",
        "--no-progress",
        "--normalization=global",
    ]
    assert cli_main(["train", *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"test_per", "dev_per", "epoch_seconds", "train_loss"} <= set(row)
        assert row["skipped_utterances"] == 2  # SX38 (no .PHN) and SX28 (truncated audio)
    log = (run / "run.log").read_text()
    assert "SX38" in log and "SX28.WAV" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_train"] == 2 and summary["num_test"] == 1 and summary["num_dev"] == 1
    assert summary["num_symbols"] == 62 and summary["input_size"] == 123
    table = format_table(collect([run]))
    assert "test PER" in table and f"{summary['test_per']:.1%}" in table
    model, cfg, meta = load_checkpoint(run)
    assert isinstance(model, CTCModel) and cfg.dataset == "timit" and len(meta["class_names"]) == 62
    # a missing corpus folder is a clear error
    assert (
        cli_main(["train", *args[:2], f"--data_dir={tmp_path / 'nope'}", f"--out_dir={run}"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_band_warp_reaches_the_model_and_the_teacher_alike(tmp_path):
    cfg = Config(
        dataset="timit",
        data_dir=str(_tiny_timit(tmp_path)),
        cache_dir=str(tmp_path / "cache"),
        format="dense",
        hidden_format="dense",
        hidden_size=8,
        hidden_modes=(),
        bidirectional=True,
        band_warp=0.3,
    )
    data = load_speech_data(cfg)
    torch.manual_seed(0)
    model = build_ctc_model(cfg, data.input_size, data.num_symbols)
    seen: dict[str, torch.Tensor] = {}
    model.register_forward_pre_hook(lambda m, args: seen.__setitem__("model", args[0]))

    class Teacher:  # records what it is shown
        weight = 1.0

        def divergence(self, log_probs, x, frames):
            seen["teacher"] = x
            return log_probs.sum() * 0.0

    rows = data.train[:2]
    plain = _batch(data, rows, torch.device("cpu"), max(len(data.frames[i]) for i in rows))[0]
    SpeechTask(cfg, data, torch.device("cpu"), Teacher()).step(model, rows, rows)
    assert seen["teacher"] is seen["model"]
    warped = seen["model"].reshape(2, -1, 3, 41)
    plain = plain.reshape(2, -1, 3, 41)
    assert not torch.allclose(warped[..., :40], plain[..., :40])  # the 40 bands move
    assert torch.equal(warped[..., 40], plain[..., 40])  # the log energy does not
    # without band_warp the batch reaches the model as it is
    task = SpeechTask(Config(**{**cfg.to_dict(), "band_warp": 0.0}), data, torch.device("cpu"))
    task.step(model, rows, rows)
    assert torch.equal(seen["model"].reshape(plain.shape), plain)
    # spectral_tilt alone: each utterance's static bands move by a curve over the bands drawn
    # from the global generator (a slope, then a curvature); deltas and energy stay
    tilt = Config(**{**cfg.to_dict(), "band_warp": 0.0, "spectral_tilt": 0.5})
    torch.manual_seed(7)
    SpeechTask(tilt, data, torch.device("cpu"), Teacher()).step(model, rows, rows)
    assert seen["teacher"] is seen["model"]
    torch.manual_seed(7)
    slopes, curvatures = (2 * torch.rand(2) - 1) * 0.5, (2 * torch.rand(2) - 1) * 0.5
    u = torch.linspace(-1, 1, 40)
    offset = slopes[:, None] * u + curvatures[:, None] * (u**2 - 1 / 3)  # (2, 40)
    tilted = seen["model"].reshape(plain.shape)
    assert torch.allclose(tilted[:, :, 0, :40], plain[:, :, 0, :40] + offset[:, None], atol=1e-6)
    assert torch.equal(tilted[:, :, 1:], plain[:, :, 1:])  # deltas
    assert torch.equal(tilted[..., 40], plain[..., 40])  # energy


@needs_synth
def test_timit_like_standin_and_training(tmp_path):
    spec = SpeechStandInSpec(
        train_speakers=2,
        dev_speakers=1,
        test_speakers=1,
        utterances_per_speaker=2,
        eval_utterances_per_speaker=1,
    )
    folder = speech_standin_dir(spec, tmp_path / "cache")
    corpus = load_speech_standin(folder)
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 4, "dev": 1, "test": 1}
    train_speakers = {u.speaker for u in corpus.splits["train"]}
    assert not train_speakers & {u.speaker for s in ("dev", "test") for u in corpus.splits[s]}
    train_texts = {u.tokens for u in corpus.splits["train"]}
    assert not train_texts & {u.tokens for u in corpus.splits["test"]}
    assert espeak_phonemes("the cat") == ("D", "@", "k", "a", "t")
    utt = corpus.splits["train"][0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert espeak_phonemes(manifest["utterances"][0]["text"]) == utt.tokens
    # deterministic: a second generation gives the same audio
    again = load_speech_standin(speech_standin_dir(spec, tmp_path / "other"))
    assert (
        Path(again.splits["test"][0].path).read_bytes()
        == Path(corpus.splits["test"][0].path).read_bytes()
    )
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--config",
                str(CONFIGS / "timit-like_tt.toml"),
                f"--cache_dir={tmp_path / 'cache'}",
                f"--out_dir={run}",
                "--epochs=1",
                "--train_speakers=2",
                "--utterances_per_speaker=2",
                "--eval_utterances_per_speaker=1",
                "--hidden_size=16",
                "--hidden_modes=[2,2,4]",  # as many modes as the preset's in_modes [3, 3, 41]
                "--no-progress",
            ]
        )
        == 0
    )
    row = json.loads((run / "metrics.jsonl").read_text())
    assert 0 <= row["test_per"] and 0 <= row["dev_per"] and row["epoch_seconds"] > 0


@needs_synth
def test_tedlium_like_standin_has_long_word_utterances(tmp_path):
    spec = SpeechStandInSpec(
        kind="tedlium-like",
        train_speakers=1,
        dev_speakers=0,
        test_speakers=1,
        utterances_per_speaker=2,
        eval_utterances_per_speaker=1,
    )
    corpus = load_speech_standin(speech_standin_dir(spec, tmp_path))
    assert corpus.unit == "char" and corpus.vocabulary == CHARACTERS
    utts = corpus.splits["train"] + corpus.splits["test"]
    assert len(utts) == 3 and not corpus.splits["dev"]
    for utt in utts:
        assert 12 <= len(utt.tokens) <= 30
        assert set(" ".join(utt.tokens)) <= set(CHARACTERS)
        audio, rate = read_audio(utt.path)
        assert len(audio) / rate > 2.0


@pytest.mark.parametrize("task", ["timit", "tedlium", "timit-like", "tedlium-like"])
def test_presets_every_format_and_budgets(task):
    counts = {}
    for fmt in FORMATS:
        cfg = load_config(CONFIGS / f"{task}_{fmt}.toml")
        assert cfg.format == fmt and cfg.hidden_format == fmt and cfg.bidirectional
        input_size = (cfg.n_mels + cfg.energy) * (3 if cfg.deltas else 1) * cfg.frame_stack
        model = build_ctc_model(cfg, input_size, 62)
        counts[fmt] = model_numbers(model)
    dense = counts["dense"]["recurrent_params"]
    for fmt in FORMATS[1:]:
        assert counts[fmt]["recurrent_dense_params"] == dense
        assert counts[fmt]["recurrent_compression"] >= 100, (task, fmt)


def test_timit_like_kcp_preset_is_a_sum_of_three_kronecker_products_over_the_input_layout():
    # 369 inputs = (3 frames x 3 derivative orders) x 41 bands; W_ih = sum_p A_p (64 x 9) kron
    # B_p (16 x 41): rearranged as the (64*9) x (16*41) matrix of the Van Loan-Pitsianis
    # shuffle, a sum of 3 Kronecker products is a matrix of rank 3
    cfg = load_config(CONFIGS / "timit-like_kcp.toml")
    torch.manual_seed(0)
    model = build_ctc_model(cfg, 369, 60)
    w = model.weight_ih.to_dense().double()
    assert w.shape == (4 * cfg.hidden_size, 369)
    shuffled = w.reshape(64, 16, 9, 41).permute(0, 2, 1, 3).reshape(64 * 9, 16 * 41)
    # (W is float32: singular values below 1e-5 of the largest are its rounding)
    assert torch.linalg.matrix_rank(shuffled, rtol=1e-5).item() == 3
    # the same shuffle on the input's other splits is of full rank: the structure is that one
    other = w.reshape(64, 16, 41, 9).permute(0, 2, 1, 3).reshape(64 * 41, 16 * 9)
    assert torch.linalg.matrix_rank(other, rtol=1e-5).item() > 3


def test_empty_hidden_modes_leave_each_format_its_own_modes():
    # hidden_modes = [] in a preset: the modes each format picks itself, as kcprnn.LSTM does
    # when given none, not an error
    cfg = load_config(
        CONFIGS / "timit-like_dense.toml",
        [
            "--format=kcp",
            "--hidden_format=kcp",
            "--hidden_size=32",
            "--hidden_modes=[]",
            "--format_options.rank=0.05",
            "--hidden_options.rank=0.05",
        ],
    )
    assert cfg.hidden_modes == ()
    torch.manual_seed(0)
    model = build_ctc_model(cfg, 369, 60)
    torch.manual_seed(0)
    reference = kcprnn.LSTM(
        369,
        32,
        batch_first=True,
        bidirectional=True,
        format="kcp",
        hidden_format="kcp",
        hidden_options={"rank": 0.05},
        rank=0.05,
    )
    for direction in range(2):
        ours, ref = model.rnn.cell(0, direction), reference.cell(0, direction)
        for name in ("weight_ih", "weight_hh"):
            a, b = getattr(ours, name), getattr(ref, name)
            assert a.num_params == b.num_params
            torch.testing.assert_close(a.to_dense(), b.to_dense())


@pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian package pocketsphinx-testdata is missing")
def test_smoke_on_real_librivox_recordings():
    lines = (LIBRIVOX / "transcription").read_text().splitlines()
    refs, feats = [], []
    for line in lines:
        words, uid = line.rsplit("(", 1)
        refs.append(words.replace("<s>", "").replace("</s>", "").split())
        audio, rate = read_audio(LIBRIVOX / f"{uid.strip(' )')}.wav")
        assert rate == 16000 and 2.5 < len(audio) / rate < 7.5
        feats.append(
            compute_features(audio, rate, FeatureSpec(n_mels=80, energy=False, deltas=False))
        )
    assert len(refs) == 5
    torch.manual_seed(0)
    model = CTCModel(
        80, 16, len(CHARACTERS) + 1, format="kcp", format_options={"rank": 2}, hidden_modes=[4, 4]
    )
    hyps = []
    with torch.no_grad():
        for f in feats:
            x = torch.from_numpy((f - f.mean(0)) / (f.std(0) + 1e-5)).float()[None]
            lp = model(x)[0]
            symbols = beam_search(lp, beam_size=4)
            hyps.append("".join(CHARACTERS[s - 1] for s in symbols).split())
    wer = error_rate(refs, hyps)
    assert wer >= 0.0 and error_rate(refs, refs) == 0.0
