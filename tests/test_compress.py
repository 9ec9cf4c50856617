"""``kcprnn compress``: decomposition of a trained model's weights through ``from_dense``, the rank
chosen for a compression target, torch.nn state_dicts as input, and a run folder compressed,
fine-tuned and evaluated end to end."""

import json

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn import make_matrix
from kcprnn.cli import main as cli_main
from kcprnn.experiments.compress import (
    compress_rnn,
    rank_for_compression,
    torch_rnn_from_state_dict,
)


@pytest.mark.parametrize("fmt", ["kcp", "tt", "tr", "tucker", "ht", "cp", "bt"])
def test_rank_for_compression_is_the_largest_that_reaches_the_target(fmt):
    rank = rank_for_compression(fmt, 700, 512, 50.0, {})
    ratio = make_matrix(fmt, 700, 512, device="meta", rank=rank).compression_ratio
    above = make_matrix(fmt, 700, 512, device="meta", rank=rank + 1).compression_ratio
    assert ratio >= 50.0 > above


def test_rank_for_compression_refuses_an_unreachable_target():
    with pytest.raises(ValueError, match="cannot compress a 8 x 6 matrix 1000x"):
        rank_for_compression("tt", 6, 8, 1000.0, {})


def test_compress_at_full_rank_is_exact_and_dense_is_a_copy():
    torch.manual_seed(1)
    ref = nn.LSTM(12, 8, num_layers=2, bidirectional=True, batch_first=True)
    model = kcprnn.LSTM.from_torch(ref, "dense")
    x = torch.randn(3, 5, 12)
    copy, records = compress_rnn(model, "dense")
    assert torch.equal(copy(x)[0], model(x)[0]) and copy is not model
    assert [r["compression"] for r in records] == [1.0] * 4
    exact, records = compress_rnn(
        model, "tt", rank=64, hidden_format="tt", hidden_rank=64, hidden_modes=[2, 4]
    )
    assert {r["matrix"] for r in records} == {"W_ih", "W_hh"} and len(records) == 8
    assert max(r["relative_error"] for r in records) < 1e-5
    torch.testing.assert_close(exact(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)
    # the hidden modes fold the gates into W_hh's first output mode, as in the constructor
    assert exact.cell(0).weight_hh.out_modes == (8, 4)
    # the source model is untouched
    assert model.cell(0).weight_ih.format_name == "dense"


def test_compress_at_low_rank_meets_the_target_and_loses_accuracy():
    model = kcprnn.GRU(64, 16, format="dense")
    small, records = compress_rnn(model, "kcp", compression=20.0)
    (rec,) = records
    assert rec["compression"] >= 20.0 and rec["options"]["rank"] >= 1
    assert small.cell(0).weight_ih.num_params == rec["params"]
    # an unstructured random W_ih is far from any low-rank format
    assert 0.3 < rec["relative_error"] < 1.0


def test_torch_state_dict_is_read_and_checked():
    ref = nn.GRU(10, 6, num_layers=2, bidirectional=True, bias=False)
    sd = ref.state_dict()
    module = torch_rnn_from_state_dict(sd, "gru", input_size=10)
    assert isinstance(module, nn.GRU) and module.num_layers == 2 and module.bidirectional
    assert module.bias is False
    with pytest.raises(ValueError, match="weight_ih_l0 has 18 rows, not a multiple of the 4"):
        torch_rnn_from_state_dict(sd, "lstm")
    with pytest.raises(ValueError, match="hidden_size=7 given, but the weights have hidden_size=6"):
        torch_rnn_from_state_dict(sd, "gru", hidden_size=7)
    with pytest.raises(ValueError, match=r"unexpected tensor names \['fc.weight'\]"):
        torch_rnn_from_state_dict({**sd, "fc.weight": torch.ones(1)}, "gru")


def test_cli_on_a_torch_state_dict(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    ref = nn.LSTM(12, 8, num_layers=2, bidirectional=True)
    save_file(ref.state_dict(), tmp_path / "lstm.safetensors")
    out = tmp_path / "out"
    args = [str(tmp_path / "lstm.safetensors"), "--out", str(out), "--cell", "lstm"]
    assert cli_main(["compress", *args, "--format", "tt", "--rank", "64"]) == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["source_kind"] == "torch.nn state_dict"
    assert report["output_relative_error"] < 1e-5
    assert "dense_test_acc" not in report  # no data for a bare state_dict
    model = kcprnn.load(out / "model.safetensors")
    x = torch.randn(4, 2, 12)
    torch.testing.assert_close(model(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)
    assert set(p.name for p in out.iterdir()) == {"model.safetensors", "compress.json"}
    # a second run into the same folder is refused; a GRU reading of LSTM weights too
    assert cli_main(["compress", *args, "--format", "tt"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    wrong = [str(tmp_path / "lstm.safetensors"), "--out", str(tmp_path / "o2"), "--cell", "gru"]
    assert cli_main(["compress", *wrong, "--format", "tt"]) == 2
    assert "weight_ih_l0 has 32 rows, not a multiple of the 3 gates" in capsys.readouterr().err
    # a fine-tuning request without a run folder's data is refused
    again = [str(out / "model.safetensors"), "--out", str(tmp_path / "o3"), "--format", "cp"]
    assert cli_main(["compress", *again, "--finetune-epochs", "1"]) == 2
    assert "needs a classification run folder" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_run_folder_compressed_fine_tuned_and_evaluated(tmp_path, capsys):
    from kcprnn.data import load_source_images
    from kcprnn.experiments.config import Config
    from kcprnn.experiments.train import evaluate, load_data, split_indices, train

    try:
        load_source_images()
    except FileNotFoundError as exc:  # system data (apt package), not a Python package
        pytest.skip(str(exc))
    cfg = Config(
        dataset="ucf11-like",
        clips_per_class=3,
        num_frames=3,
        frame_width=32,
        frame_height=24,
        hidden_size=16,
        hidden_modes=(2, 2, 2, 2),
        batch_size=4,
        lr=1e-2,
        epochs=2,
        format="dense",
        progress=False,
        threads=1,
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
    )
    summary = train(cfg)
    out = tmp_path / "kcp"
    argv = [str(tmp_path / "run"), "--out", str(out), "--format", "kcp", "--compression", "30"]
    assert cli_main(["compress", *argv, "--finetune-epochs", "2"]) == 0
    report = json.loads((out / "compress.json").read_text())
    # the dense accuracy is the run's own last test accuracy (same data, same split)
    assert report["dense_test_acc"] == pytest.approx(summary["test_acc"])
    (rec,) = report["matrices"]
    assert rec["matrix"] == "W_ih" and rec["compression"] >= 30
    assert rec["options"]["out_modes"] == [8, 2, 2, 2]  # the run's hidden modes, gates folded
    assert [r["epoch"] for r in report["finetune"]] == [1, 2]
    # the saved model is the fine-tuned one: evaluating it reproduces the reported accuracy
    model = kcprnn.load(out / "model.safetensors")
    data = load_data(cfg)
    _, test_idx = split_indices(cfg, data)
    acc = evaluate(model, data, test_idx, 4, torch.device("cpu"))[1]
    assert acc == pytest.approx(report["finetuned_test_acc"])
    assert model.weight_ih.format_name == "kcp"
    printed = capsys.readouterr().out
    assert "fine-tune epoch 2" in printed and "decomposed" in printed


def test_seeded_kcp_decomposition_repeats(tmp_path):
    from safetensors.torch import save_file

    save_file(nn.GRU(16, 8).state_dict(), tmp_path / "gru.safetensors")
    reports = []
    for name in ("a", "b"):
        argv = [str(tmp_path / "gru.safetensors"), "--cell", "gru", "--out", str(tmp_path / name)]
        assert cli_main(["compress", *argv, "--format", "kcp", "--rank", "2", "--seed", "3"]) == 0
        reports.append(json.loads((tmp_path / name / "compress.json").read_text()))
    assert reports[0]["matrices"] == reports[1]["matrices"]
    a, b = (kcprnn.load(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_projection_matrices_follow_the_hidden_format():
    model = kcprnn.LSTM(6, 8, proj_size=3, num_layers=2, format="dense")
    small, records = compress_rnn(model, "tt", rank=64, hidden_format="tr", hidden_rank=64)
    assert sorted({r["matrix"] for r in records}) == ["W_hh", "W_hr", "W_ih"]
    for layer in range(2):
        old, new = model.cell(layer), small.cell(layer)
        for role, m in new.matrices().items():
            assert m.format_name == ("tt" if role == "ih" else "tr")
            dense = old.matrices()[role].to_dense()
            torch.testing.assert_close(m.to_dense(), dense, atol=1e-5, rtol=1e-4)
