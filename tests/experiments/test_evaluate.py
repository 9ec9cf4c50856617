"""``kcprnn evaluate``: a finished run's checkpoint scored again reproduces its last metrics line,
another CTC decoder gives what a run configured with that decoder logged, and bad requests get
clear errors."""

import json

import pytest
import torch
from test_resume import TINY
from test_speech_train import tiny_timit_run

from kcprnn.cli import main as cli_main
from kcprnn.experiments.config import Config, ConfigError
from kcprnn.experiments.evaluate import evaluate_run
from kcprnn.experiments.speech import decode_split, load_speech_data
from kcprnn.experiments.train import load_checkpoint, train


def _last(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_speech_runs_rescored_with_either_decoder(tmp_path):
    # the checkpoint holds the average (ema), which the metrics describe
    common = tiny_timit_run(tmp_path, format="kcp", ema=0.5, batch_size=2, seed=5)
    beam, greedy = tmp_path / "beam", tmp_path / "greedy"
    train(Config(**common, beam_size=3, out_dir=str(beam)))
    train(Config(**common, beam_size=1, out_dir=str(greedy)))  # the same training

    row = evaluate_run(beam)  # the run's own decoder
    assert row["beam_size"] == 3
    for key in ("test_loss", "test_per"):
        assert row[key] == pytest.approx(_last(beam)[key], rel=1e-6)
    row = evaluate_run(beam, beam_size=1)  # greedy: what the greedy run logged
    assert row["beam_size"] == 1
    for key in ("test_loss", "test_per"):
        assert row[key] == pytest.approx(_last(greedy)[key], rel=1e-6)

    out = tmp_path / "scores.jsonl"
    assert cli_main(["evaluate", str(greedy), "--beam_size", "2", "--out", str(out)]) == 0
    (written,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert written["run"] == str(greedy) and written["beam_size"] == 2
    assert written["test_per"] == pytest.approx(evaluate_run(greedy, beam_size=2)["test_per"])
    with pytest.raises(ConfigError, match="beam_size=0"):
        evaluate_run(greedy, beam_size=0)
    # a bigram of the training targets in the beam search; none for greedy decoding
    row = evaluate_run(greedy, beam_size=2, lm_weight=0.5, lm_bonus=1.0)
    assert (row["lm_weight"], row["lm_bonus"]) == (0.5, 1.0) and 0 <= row["test_per"]
    assert evaluate_run(greedy, beam_size=2, lm_bonus=0.0)["test_per"] == written["test_per"]
    with pytest.raises(ConfigError, match=r"lm_weight=0.0 and lm_bonus=2.0 score.*beam_size=1"):
        evaluate_run(greedy, lm_bonus=2.0)

    # per speaker: each split of the tiny tree holds one speaker, whose rate is the split's
    row = evaluate_run(greedy, per_speaker=True)
    model, cfg, _ = load_checkpoint(greedy)
    data = load_speech_data(cfg)
    assert len(data.test) and len(data.dev)
    for split, idx in (("dev", data.dev), ("test", data.test)):
        if len(idx):
            by_speaker = row[f"{split}_per_by_speaker"]
            assert list(by_speaker) == sorted({data.speakers[i] for i in idx})
            assert list(by_speaker.values()) == [row[f"{split}_per"]]
            # the decoded tokens come back in the order of idx: each as decoded alone
            hyps = decode_split(model, data, idx, 2, torch.device("cpu"))[2]
            alone = [
                decode_split(model, data, idx[k : k + 1], 1, torch.device("cpu"))[2][0]
                for k in range(len(idx))
            ]
            assert hyps == alone


@pytest.mark.usefixtures("source_images")
def test_classifier_run_rescored(tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(
        Config(
            **{**TINY, "epochs": 2, "checkpoint_every": 0}, cache_dir=str(cache), out_dir=str(run)
        )
    )
    row = evaluate_run(run)
    assert row["test_acc"] == _last(run)["test_acc"]
    assert row["test_loss"] == pytest.approx(_last(run)["test_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"beam_size=4 decodes CTC outputs; 'youtube-like'"):
        evaluate_run(run, beam_size=4)
    with pytest.raises(ConfigError, match=r"per_speaker scores speech runs; 'youtube-like'"):
        evaluate_run(run, per_speaker=True)
    with pytest.raises(
        ConfigError, match=r"lm_weight and lm_bonus decode speech runs; 'youtube-like'"
    ):
        evaluate_run(run, lm_weight=1.0)
    assert cli_main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "missing checkpoint.json" in capsys.readouterr().err
