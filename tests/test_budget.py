"""Parameter budgets: a float ``rank`` in (0, 1] solved into each format's options."""

import logging
import math

import numpy as np
import pytest
import torch

import kcprnn
from kcprnn import FORMATS, LSTM, make_matrix
from kcprnn.budget import (
    aligned_splits,
    blocked_splits,
    budget_options,
    candidates,
    configurations,
    validate_budget,
)
from kcprnn.cli import main as cli_main

COMPRESSED = sorted(f for f in FORMATS if f != "dense")


def test_hand_computed_tt_and_kcp():
    # 256 -> 1024: in_modes (4, 4, 4, 4), out_modes (8, 8, 4, 4); merged sizes 32, 32, 16, 16
    # TT ranks (a, b, c): 32 a + 32 a b + 16 b c + 16 c; target 0.01 * 262,144 = 2,621.44
    # (7, 7, 6): 224 + 1,568 + 672 + 96 = 2,560 fits; (7, 7, 7) = 2,688 does not
    w = make_matrix("tt", 256, 1024, rank=0.01)
    assert w.ranks == (1, 7, 7, 6, 1) and w.num_params == 2560
    # KCP, blocked split in ((4,1),(4,1),(1,4),(1,4)) out ((4,2),(8,1),(4,1),(4,1)):
    # S = (16 + 32 + 4 + 4) + (2 + 1 + 4 + 4) = 67 per unit of P R; floor(2,621.44 / 67) = 39
    w = make_matrix("kcp", 256, 1024, rank=0.01)
    assert (w.terms, w.ranks, w.num_params) == (1, (39, 39), 2613)
    assert w.in_splits == ((4, 1), (4, 1), (1, 4), (1, 4))
    assert w.out_splits == ((4, 2), (8, 1), (4, 1), (4, 1))
    # the interleaved split ((2,2) x 4), ((4,2),(4,2),(2,2),(2,2)): S = 24 + 16 = 40 -> 65
    interleaved = candidates("kcp", 256, 1024, 0.01)
    assert (
        max(
            c.num_params
            for c in interleaved
            if c.label == "interleaved" and c.num_params <= 2621.44
        )
        == 2600
    )
    # CP: R * (32 + 32 + 16 + 16) = 96 R -> R = 27 (2,592)
    assert make_matrix("cp", 256, 1024, rank=0.01).num_params == 2592


def test_blocked_splits_example():
    ins, outs = blocked_splits([8, 20, 20, 18], [16, 4, 4, 4])
    assert ins == [[8, 1], [20, 1], [1, 20], [1, 18]]
    assert outs == [[8, 2], [4, 1], [4, 1], [4, 1]]
    assert [math.prod(s) for s in ins] == [8, 20, 20, 18]
    assert [math.prod(s) for s in outs] == [16, 4, 4, 4]


def test_aligned_layout_spends_the_budget_on_terms_of_full_matrices():
    # 3 x 80 inputs (frames x bands), 1,024 gates: J_2 = 8 makes 128 x 3 (384) nearest 8 x 80
    # (640) among the divisors of 1,024 (J_2 = 4: 768 against 320)
    assert aligned_splits([3, 80], 1024) == ([[3, 1], [1, 80]], [[128, 1], [1, 8]])
    assert aligned_splits([8, 20, 20, 18], 1024) == ([[160, 1], [1, 360]], [[64, 1], [1, 16]])
    # a term is 384 + 640 + 2 parameters; 0.01 * 245,760 = 2,457.6 -> P = 2, R = 1 (2,052)
    w = make_matrix("kcp", 240, 1024, rank=0.01, in_modes=[3, 80], layout="aligned")
    assert (w.terms, w.ranks, w.num_params) == (2, (1, 1), 2052)
    assert w.in_splits == ((3, 1), (1, 80)) and w.out_splits == ((128, 1), (1, 8))
    dense = w.to_dense().detach()
    blocks = dense.reshape(128, 8, 3, 80).permute(0, 2, 1, 3).reshape(384, 640)
    assert int(torch.linalg.matrix_rank(blocks)) <= 2  # a sum of two Kronecker products
    # the default layout is unchanged
    default = make_matrix("kcp", 240, 1024, rank=0.01, in_modes=[3, 80])
    assert default.out_splits == ((16, 2), (32, 1)) and default.terms == 1
    with pytest.raises(ValueError, match="KCP budget option"):
        make_matrix("tt", 240, 1024, rank=0.01, layout="aligned")
    with pytest.raises(ValueError, match="layout must be one of"):
        make_matrix("kcp", 240, 1024, rank=0.01, layout="diagonal")


@pytest.mark.parametrize("fmt", COMPRESSED)
def test_random_shapes_and_budgets(fmt):
    """The built matrix's own parameter count is at most the target (unless even the smallest
    configuration is above it), no candidate lies between it and the target, and it uses at
    least half the target once the uniform rank-2 configuration fits."""
    rng = np.random.default_rng(sum(map(ord, fmt)))
    for _ in range(12):
        n_in = int(rng.choice([6, 12, 13, 40, 96, 256, 700]))
        n_out = int(rng.choice([64, 128, 512, 1024]))
        budget = float(10 ** rng.uniform(-3, -0.3))
        target = budget * n_in * n_out
        w = make_matrix(fmt, n_in, n_out, rank=budget)
        assert w.num_params == sum(p.numel() for p in w.parameters())
        found = candidates(fmt, n_in, n_out, budget)
        smallest = min(c.num_params for c in found)
        assert w.num_params <= max(target, smallest), (n_in, n_out, budget)
        if w.num_params <= target:
            assert not [c for c in found if w.num_params < c.num_params <= target] or (
                fmt == "kcp"  # KCP keeps its preferred layout; the other may come closer
            )
        uniform2 = make_matrix(fmt, n_in, n_out, rank=2).num_params
        if uniform2 <= target:
            assert w.num_params >= 0.5 * target, (n_in, n_out, budget, w.num_params)


def test_fixed_options_are_kept():
    w = make_matrix("kcp", 256, 1024, rank=0.01, terms=5)
    assert w.terms == 5 and w.ranks == (7, 7) and w.num_params == 2345  # 5 * 7 * 67 (blocked)
    w = make_matrix("bt", 256, 1024, rank=0.01, blocks=2)
    assert w.blocks == 2 and w.num_params <= 2621.44
    w = make_matrix("tt", 256, 1024, rank=0.01, in_modes=[16, 16], out_modes=[32, 32])
    assert w.in_modes == (16, 16) and w.num_params == 512 * 2 * 2  # rank 2: 2 * 512 * 2
    nested = [[2, 2]] * 4
    w = make_matrix("kcp", 256, 1024, rank=0.01, in_modes=nested)
    assert w.in_splits == ((2, 2),) * 4


def test_dense_budget():
    assert make_matrix("dense", 8, 16, rank=1.0).num_params == 128
    with pytest.raises(ValueError, match="dense format stores every entry"):
        make_matrix("dense", 8, 16, rank=0.5)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, float("nan"), float("inf")])
def test_bad_budgets(bad):
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        make_matrix("tt", 64, 64, rank=bad)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        validate_budget(bad)


def test_int_ranks_are_not_budgets():
    assert make_matrix("tt", 64, 64, rank=1).ranks == (1, 1, 1, 1, 1)  # 4 cores
    with pytest.raises(TypeError, match="float in"):
        validate_budget(2)
    assert budget_options("cp", 64, 64, {"rank": np.float32(0.5)})["rank"] >= 1


def test_budget_below_the_smallest_configuration_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kcprnn"):
        w = make_matrix("tt", 13, 1024, rank=0.001)
    assert w.ranks == (1, 1, 1, 1) and "below the smallest" in caplog.text


def test_lstm_takes_budgets_for_both_matrices():
    m = LSTM(13, 256, format="tt", hidden_format="tt", rank=0.05, hidden_options={"rank": 0.05})
    wi, wh = m.cell(0).weight_ih, m.cell(0).weight_hh
    assert wi.num_params <= 0.05 * 13 * 1024 and wh.num_params <= 0.05 * 256 * 1024
    assert wh.num_params >= 0.5 * 0.05 * 256 * 1024


def test_configurations_lists_the_solution_first():
    assert kcprnn.configurations is configurations
    table = configurations(256, 1024, 0.01, ["tt", "kcp", "dense"], limit=3)
    assert set(table) == {"tt", "kcp", "dense"}
    for fmt in ("tt", "kcp"):
        first = table[fmt][0]
        built = make_matrix(fmt, 256, 1024, rank=0.01)
        assert first.num_params == built.num_params
        assert first.macs == built.macs(1) and first.macs > 0
        assert all(c.num_params <= 2621.44 for c in table[fmt])
        assert math.isclose(first.compression, 262144 / first.num_params)
    assert {c.label for c in table["kcp"]} == {"interleaved", "blocked", "aligned"}
    assert table["dense"][0].num_params == 262144


def test_budget_cli(capsys):
    assert cli_main(["budget", "256", "1024", "0.01", "--formats", "tt,kcp"]) == 0
    out = capsys.readouterr().out
    assert "2,621 parameters" in out and "rank=[7, 7, 6]" in out
    assert cli_main(["budget", "256", "1024", "1.5"]) == 2
    assert "must lie in (0, 1]" in capsys.readouterr().err
