"""The training harness's optimizer options: ``weight_decay`` (AdamW) reaches the optimizer,
validates with a clear error, and runs and checkpoints whose config predates it still match."""

import json

import pytest
import torch

from kcprnn.experiments.config import Config, ConfigError, config_defaults, load_config
from kcprnn.experiments.loop import check_resumable
from kcprnn.experiments.model import SequenceClassifier
from kcprnn.experiments.speech import build_ctc_model
from kcprnn.experiments.train import load_checkpoint, make_optimizer, train


def _model(bidirectional=False, fmt="dense"):
    torch.manual_seed(0)
    options = {"in_modes": (3, 4), "rank": 2} if fmt == "tt" else {}
    return SequenceClassifier(
        12,
        4,
        3,
        format=fmt,
        format_options=options,
        hidden_modes=(2, 2),
        bidirectional=bidirectional,
    )


def _one_step(opt, model, seed=1):
    """Give every parameter a seeded gradient, take one step; return (before, grads)."""
    g = torch.Generator().manual_seed(seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        grads[n] = torch.randn(p.shape, generator=g)
        p.grad = grads[n].clone()
    opt.step()
    return before, grads


def _adam_first_step(lr, grad):
    # step 1 of Adam with its bias corrections: m = g, v = g^2, so the step is lr g / (|g| + eps)
    return lr * grad / (grad.abs() + 1e-8)


def _is_ih(name):
    return ".weight_ih." in name


def test_weight_decay_is_decoupled_shrinkage_next_to_the_adam_step():
    lr, wd = 0.05, 0.3
    model = _model()
    opt = make_optimizer(Config(lr=lr, weight_decay=wd), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd]
    before, grads = _one_step(opt, model)
    for n, p in model.named_parameters():  # p <- p (1 - lr wd) - Adam step, biases too
        expected = before[n] * (1 - lr * wd) - _adam_first_step(lr, grads[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=n)


def test_zero_weight_decay_and_no_ih_lr_is_plain_adam():
    model, ref_model = _model(), _model()
    opt = make_optimizer(Config(lr=0.01), model)
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    for step in range(3):
        _one_step(opt, model, seed=step)
        _one_step(ref, ref_model, seed=step)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("bidirectional", "fmt"), [(False, "dense"), (True, "tt")])
def test_ih_lr_moves_only_the_input_matrices_at_their_own_rate(bidirectional, fmt):
    lr, ih_lr = 0.01, 1e-4
    model = _model(bidirectional, fmt)
    opt = make_optimizer(Config(lr=lr, ih_lr=ih_lr), model)
    assert type(opt) is torch.optim.Adam and [g["lr"] for g in opt.param_groups] == [lr, ih_lr]
    names = [n for n, _ in model.named_parameters()]
    ih_names = [n for n in names if _is_ih(n)]
    # every direction's W_ih (its TT cores) and nothing else
    assert len(ih_names) == (2 if bidirectional else 1) * (2 if fmt == "tt" else 1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    before, grads = _one_step(opt, model)
    for n, p in model.named_parameters():
        rate = ih_lr if _is_ih(n) else lr
        expected = before[n] - _adam_first_step(rate, grads[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9, msg=n)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--weight_decay=-0.1",
            r"weight_decay must be a finite number >= 0, got weight_decay=-0\.1",
        ),
        ("--weight_decay=nan", r"weight_decay must be a finite number >= 0, got weight_decay=nan"),
        ("--weight_decay=inf", r"weight_decay must be a finite number >= 0, got weight_decay=inf"),
        ("--weight_decay=fast", r"'weight_decay' must be of type float"),
        ("--ih_lr=-1e-5", r"ih_lr must be a finite number >= 0, got ih_lr=-1e-05"),
    ],
)
def test_bad_weight_decay_names_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_weight_decay_override():
    assert load_config(None, ["--weight_decay=1e-2"]).weight_decay == 0.01
    assert load_config(None, ["--weight_decay=2"]).weight_decay == 2.0  # int -> float


def test_speech_models_take_the_same_options():
    cfg = Config(
        dataset="timit-like",
        lr=1e-3,
        ih_lr=1e-4,
        weight_decay=0.5,
        num_layers=2,
        bidirectional=True,
    )
    torch.manual_seed(0)
    model = build_ctc_model(cfg, 6, 5)
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    ih = {id(p) for d in range(2) for p in model.rnn.cell(0, d).weight_ih.parameters()}
    groups = opt.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == ih  # first layer's W_ih, both directions
    assert len(groups[0]["params"]) + len(ih) == len(list(model.parameters()))
    before, grads = _one_step(opt, model)
    for name, p in model.named_parameters():  # first AdamW step, each group at its own lr
        lr = 1e-4 if id(p) in ih else 1e-3
        expected = before[name] * (1 - lr * 0.5) - _adam_first_step(lr, grads[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_a_config_saved_before_a_key_existed_reads_as_its_default():
    cfg = Config(epochs=3)
    saved = cfg.to_dict()
    del saved["weight_decay"]  # a checkpoint written before the option existed
    check_resumable(saved, cfg)  # no error: the missing key means its default
    assert config_defaults()["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match=r"weight_decay: 0\.0 -> 0\.1"):
        check_resumable(saved, Config(epochs=3, weight_decay=0.1))


@pytest.fixture(scope="module")
def _source_images():
    from kcprnn.data import load_source_images

    try:
        load_source_images()
    except FileNotFoundError as exc:  # system data (apt package), not a Python package
        pytest.skip(str(exc))


def test_training_run_uses_weight_decay(tmp_path, _source_images):
    common = dict(
        dataset="ucf11-like",
        clips_per_class=2,
        num_frames=2,
        frame_width=32,
        frame_height=24,
        hidden_size=8,
        hidden_modes=(2, 2, 2),
        batch_size=4,
        epochs=1,
        lr=1e-2,
        seed=0,
        format="dense",
        threads=1,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    norms = {}
    for wd in (0.0, 5.0):
        run = tmp_path / f"wd{wd}"
        train(Config(**common, weight_decay=wd, out_dir=str(run)))
        record = json.loads((run / "checkpoint.json").read_text())
        (group,) = record["optimizer"]["param_groups"]
        assert group["weight_decay"] == wd
        model, _, _ = load_checkpoint(run)
        norms[wd] = float(model.weight_ih.to_dense().detach().norm())
    # the same seed and batches: only the decay differs, and 5 steps of (1 - 0.05) shrink W_ih
    assert norms[5.0] < norms[0.0]


def _is_tt(name):  # the TT model's W_ih cores (every other matrix is dense)
    return ".weight_ih." in name and "cores" in name


def test_format_lr_moves_each_formats_factors_at_its_own_rate():
    lr = 0.01
    model = _model(True, "tt")
    cfg = load_config(None, ["--lr=0.01", "--format_lr.tt=0.25"])
    assert cfg.format_lr == {"tt": 0.25}
    opt = make_optimizer(cfg, model)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("other", lr), ("tt", lr / 4)]
    names = [n for n, _ in model.named_parameters()]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    assert sum(map(_is_tt, names)) == 4  # two directions, two cores each
    before, grads = _one_step(opt, model)
    for n, p in model.named_parameters():
        rate = lr / 4 if _is_tt(n) else lr
        expected = before[n] - _adam_first_step(rate, grads[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9, msg=n)


def test_format_lr_next_to_ih_lr_leaves_the_input_matrices_to_ih_lr():
    model = _model(False, "tt")
    opt = make_optimizer(Config(lr=0.01, ih_lr=1e-4, format_lr={"tt": 0.5, "dense": 2.0}), model)
    by_name = {g.get("name", "ih"): g for g in opt.param_groups}
    assert by_name["ih"]["lr"] == 1e-4 and by_name["dense"]["lr"] == 0.02
    assert "tt" not in by_name  # its only matrix is the input one, which ih_lr takes
    ih_ids = {id(p) for p in by_name["ih"]["params"]}
    assert ih_ids == {id(p) for n, p in model.named_parameters() if _is_ih(n)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--format_lr.nope=0.5", "nope"),
        ("--format_lr.ht=0", "ht=0"),
        ("--format_lr.ht=-1", "-1"),
        ("--format_lr.ht=true", "ht=True"),
        ("--format_lr.ht=inf", "ht=inf"),
        ("--format_lr=0.5", "must be of type dict"),
    ],
)
def test_bad_format_lr_is_refused_naming_it(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_param_groups_validates_and_shares_nothing_twice():
    import kcprnn

    torch.manual_seed(0)
    model = kcprnn.LSTM(8, 16, format="tt", hidden_format="ht", bidirectional=True)
    groups = kcprnn.param_groups(model, 0.1, format_lr={"ht": 1 / 3, "kcp": 2.0})
    assert [g["name"] for g in groups] == ["other", "ht"]  # no KCP matrix: no empty group
    assert groups[1]["lr"] == pytest.approx(0.1 / 3)
    ht = [
        p for m in model.modules() if getattr(m, "format_name", "") == "ht" for p in m.parameters()
    ]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in ht}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        kcprnn.param_groups(model, 0.1, format_lr={"nope": 1.0})
    for bad in (float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=f"ht={bad!r}"):
            kcprnn.param_groups(model, 0.1, format_lr={"ht": bad})
