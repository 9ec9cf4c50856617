"""Starting from a trained run: ``init_from`` decomposes its weights into the new run's formats
(exactly where the format can hold them) and copies the rest; ``distill`` adds the KL divergence
from a teacher's outputs, checked against torch's ``kl_div`` and a hand-assembled loss."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_speech_train import _tiny_timit

from kcprnn.data.fsdd import write_digits
from kcprnn.experiments.config import Config, ConfigError, load_config
from kcprnn.experiments.speech import SpeechTask, build_ctc_model, load_speech_data
from kcprnn.experiments.train import build_model, load_checkpoint, train
from kcprnn.experiments.transfer import Teacher, distillation_loss, initialize_from
from kcprnn.rnn.plan import dense_weight

SPEECH = dict(
    dataset="timit",
    hidden_size=8,
    hidden_modes=(),
    bidirectional=True,
    epochs=1,
    batch_size=2,
    lr=1e-2,
    progress=False,
    threads=1,
    normalization="global",
)
# TT ranks above the full ranks are clipped to them: the decomposition is exact
EXACT_TT = dict(
    format="tt",
    hidden_format="tt",
    format_options={"rank": 512, "in_modes": (3, 41)},
    hidden_options={"rank": 512},
)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("timit")
    common = dict(SPEECH, data_dir=str(_tiny_timit(root)), cache_dir=str(root / "cache"))
    run = root / "dense"
    train(Config(**common, format="dense", hidden_format="dense", out_dir=str(run)))
    return common, run


def _assert_same_weights(model, source):
    for layer in range(source.rnn.num_layers):
        for d in range(source.rnn.num_directions):
            ours, theirs = model.rnn.cell(layer, d), source.rnn.cell(layer, d)
            for role in ("ih", "hh"):
                torch.testing.assert_close(
                    dense_weight(ours.matrices()[role]),
                    dense_weight(theirs.matrices()[role]),
                    rtol=1e-4,
                    atol=1e-5,
                )
            torch.testing.assert_close(ours.bias_ih, theirs.bias_ih, rtol=0, atol=0)
            torch.testing.assert_close(ours.bias_hh, theirs.bias_hh, rtol=0, atol=0)


def test_init_from_decomposes_the_run_into_the_new_format(dense_run):
    common, run = dense_run
    source, _, meta = load_checkpoint(run)
    cfg = Config(**common, **EXACT_TT, init_from=str(run))
    torch.manual_seed(1)
    model = build_ctc_model(cfg, meta["input_size"], len(meta["class_names"]))
    records = initialize_from(model, str(run))
    assert [(r["layer"], r["direction"], r["matrix"]) for r in records] == [
        (0, d, m) for d in (0, 1) for m in ("W_ih", "W_hh")
    ]
    assert max(r["relative_error"] for r in records) < 1e-5
    assert model.weight_ih.format_name == "tt"
    _assert_same_weights(model, source)
    torch.testing.assert_close(model.output.weight, source.output.weight, rtol=0, atol=0)
    x = torch.randn(2, 5, meta["input_size"])
    source.eval(), model.eval()
    torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-4)


def test_init_from_refuses_another_architecture(dense_run, tmp_path):
    common, run = dense_run
    model = build_ctc_model(Config(**{**common, "hidden_size": 4}), 123, 62)
    with pytest.raises(ValueError, match=r"init_from=.*its model .* is not this run's"):
        initialize_from(model, str(run))
    with pytest.raises(FileNotFoundError, match=r"init_from='.*nowhere': no such run folder"):
        initialize_from(model, str(tmp_path / "nowhere"))


def test_distillation_loss_is_torchs_kl_divergence():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 4, 6, generator=g).log_softmax(-1)
    teacher = torch.randn(3, 4, 6, generator=g).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # (3, 4)
    torch.testing.assert_close(distillation_loss(student, teacher, mask), kl[mask.bool()].mean())
    torch.testing.assert_close(distillation_loss(student, teacher), kl.mean())
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # at temperature 2: softmax(log p / 2) on both sides, the divergence scaled by 4
    soft = F.kl_div(
        (student / 2).log_softmax(-1),
        (teacher / 2).log_softmax(-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    torch.testing.assert_close(
        distillation_loss(student, teacher, mask, temperature=2.0), 4 * soft[mask.bool()].mean()
    )


def test_speech_step_adds_the_weighted_distillation_term(dense_run):
    common, run = dense_run
    cfg = Config(**common, **EXACT_TT, distill=2.0, teacher=str(run))
    data = load_speech_data(cfg)
    torch.manual_seed(0)
    model = build_ctc_model(cfg, data.input_size, data.num_symbols)
    state = torch.get_rng_state()
    teacher = Teacher(str(run), cfg.distill, model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # loading draws nothing from the run's RNG
    rows = data.train[:2]
    loss, sums = SpeechTask(cfg, data, torch.device("cpu"), teacher).step(model, rows, rows)
    plain, plain_sums = SpeechTask(cfg, data, torch.device("cpu")).step(model, rows, rows)
    # the KL over the frames of each utterance, by hand
    source, _, _ = load_checkpoint(run)
    source.eval()
    kls = []
    for i in rows:
        x = torch.from_numpy(np.asarray(data.frames[i], dtype=np.float32))[None]  # (1, t, f)
        with torch.no_grad():
            t = source(x)[0]
        kls.append(F.kl_div(model(x)[0], t, log_target=True, reduction="none").sum(-1))
    kl = torch.cat(kls).mean()
    torch.testing.assert_close(loss, plain + 2.0 * kl, rtol=1e-5, atol=1e-6)
    assert sums["loss_sum"] == pytest.approx(plain_sums["loss_sum"])
    assert sums["distill_sum"] == pytest.approx(kl.item() * 2, rel=1e-5)


def test_train_with_init_from_and_distill(dense_run, tmp_path):
    common, run = dense_run
    out = tmp_path / "student"
    cfg = Config(**common, **EXACT_TT, init_from=str(run), distill=1.0, out_dir=str(out))
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the student starts as the teacher (an exact decomposition): the KL starts at about 0
    assert rows[-1]["train_distill"] > -1e-6 and "test_per" in rows[-1]
    log = (out / "run.log").read_text()
    assert f"initialized from {run}" in log and "W_hh[0,1]" in log


def test_classifier_init_from_and_teacher(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 6))
    utts = [(y + 0.1 * rng.standard_normal((4, 13))).astype(np.float32) for y in labels]
    write_digits(tmp_path / "digits.npz", utts, labels)
    common = dict(
        dataset="fsdd",
        data_dir=str(tmp_path / "digits.npz"),
        hidden_size=8,
        hidden_modes=(),
        epochs=1,
        batch_size=8,
        progress=False,
        threads=1,
    )
    run = tmp_path / "dense"
    train(Config(**common, format="dense", hidden_format="dense", out_dir=str(run)))
    source, _, meta = load_checkpoint(run)
    tt = {
        "format": "tt",
        "hidden_format": "tt",
        "format_options": {"rank": 64},
        "hidden_options": {"rank": 64},
    }
    model = build_model(Config(**common, **tt), meta["input_size"], len(meta["class_names"]))
    initialize_from(model, str(run))
    _assert_same_weights(model, source)
    torch.testing.assert_close(model.classifier.bias, source.classifier.bias, rtol=0, atol=0)
    teacher = Teacher(str(run), 0.5, model, torch.device("cpu"))
    x = torch.randn(3, 4, 13)
    source.eval()
    torch.testing.assert_close(teacher.log_probs(x), source(x).log_softmax(-1))
    ctc = build_ctc_model(Config(dataset="timit-like", hidden_size=8, hidden_modes=()), 13, 11)
    with pytest.raises(ValueError, match=r"teacher=.*SequenceClassifier .* does not fit"):
        Teacher(str(run), 0.5, ctc, torch.device("cpu"))
    # a student run: the distillation term is part of its loss, and it trains
    train(Config(**common, **tt, init_from=str(run), distill=0.5, out_dir=str(tmp_path / "s")))
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["test_acc"] >= 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--distill=1"], r"distill=1\.0 needs a teacher: set teacher \(or init_from\)"),
        (["--teacher=runs/dense"], r"teacher='runs/dense' is given but distill=0"),
        (["--distill=nan", "--teacher=x"], r"distill must be a finite number >= 0"),
        (["--distill=-1", "--teacher=x"], r"distill must be a finite number >= 0, got distill=-1"),
        (
            ["--distill=1", "--teacher=x", "--distill_temperature=0"],
            r"distill_temperature must be a finite number > 0, got distill_temperature=0\.0",
        ),
    ],
)
def test_bad_transfer_options_name_the_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
