"""The recurrent modules' default sizes: a cell's compressed matrices with no ``rank`` share one
parameter budget (1/32 of their dense parameters, no matrix above 1/4 of itself), solved per
matrix as a float ``rank`` would be (kcprnn.budget)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn.budget import (
    DEFAULT_BUDGET,
    DEFAULT_CAP,
    DEFAULT_WIDE_COUNT,
    DEFAULT_WIDE_FLOOR,
    SOLVED_FORMATS,
    split_budget,
)
from kcprnn.formats import make_matrix

IH, HH = 1024 * 13, 1024 * 256  # an LSTM with 13 inputs and 256 hidden units


def test_split_budget_hand_computed():
    # 275,456 / 32 = 8,608 in all; half (4,304) is above 1/4 of W_ih (3,328): W_ih at 1/4,
    # W_hh the remaining 5,280 = 5,280 / 262,144 of itself
    assert split_budget([IH, HH]) == [0.25, 5280 / HH]
    assert split_budget([HH, IH]) == [5280 / HH, 0.25]
    # equal sizes: the budget each
    assert split_budget([HH, HH, HH]) == [1 / 32] * 3
    # uncapped unequal sizes: the same parameter count each
    shares = split_budget([1000, 3000], budget=0.1)
    assert shares[0] * 1000 == pytest.approx(200) and shares[1] * 3000 == pytest.approx(200)
    # two capped in turn: 0.5 * 1,110 = 555; 1/2 of 10 is 5, 1/2 of 100 is 50; 500 left
    assert split_budget([10, 100, 1000], budget=0.5, cap=0.5) == [0.5, 0.5, 0.5]
    assert split_budget([10, 100, 10_000], budget=0.1, cap=0.5) == pytest.approx(
        [0.5, 0.5, (1011 - 55) / 10_000]
    )


def test_split_budget_of_a_given_base():
    # 1/32 of 524,288 = 16,384: 8,192 each, whatever the sizes above it
    assert split_budget([59_000_000, HH], base=2 * HH) == [8192 / 59_000_000, 8192 / HH]
    with pytest.raises(ValueError, match="base must be a positive int"):
        split_budget([10, 20], base=0)


@pytest.mark.parametrize("bad", [[], [0, 5], [3.5], [True]])
def test_split_budget_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="sizes must be positive ints"):
        split_budget(bad)


def test_split_budget_rejects_bad_budgets():
    with pytest.raises(ValueError, match="must lie in"):
        split_budget([10, 20], budget=1.5)


@pytest.mark.parametrize("fmt", sorted(SOLVED_FORMATS))
def test_lstm_default_is_the_solved_pair_budget(fmt):
    # no rank: each matrix is what its share as a float rank builds, and the pair is at least
    # 32x smaller than dense
    torch.manual_seed(0)
    cell = kcprnn.LSTM(13, 256, format=fmt, hidden_format=fmt).cell(0)
    ih = make_matrix(fmt, 13, 1024, rank=DEFAULT_CAP)
    hh = make_matrix(fmt, 256, 1024, rank=5280 / HH)
    assert cell.weight_ih.num_params == ih.num_params <= 3328
    assert cell.weight_hh.num_params == hh.num_params <= 5280
    assert (IH + HH) / (ih.num_params + hh.num_params) >= 32
    assert cell.weight_ih.extra_repr() == ih.extra_repr()
    assert cell.weight_hh.extra_repr() == hh.extra_repr()


def test_kcp_default_hand_computed():
    # W_ih 1024 x 13 blocked: in ((13,1),(1,1),(1,1)), out ((8,2),(8,1),(8,1)): S = 104 + 8 + 8
    # + 2 + 1 + 1 = 124, floor(3,328 / 124) = 26 -> 3,224; W_hh blocked (S = 67, see
    # test_budget): floor(5,280 / 67) = 78 -> 5,226
    cell = kcprnn.LSTMCell(13, 256, format="kcp", hidden_format="kcp")
    assert cell.weight_ih.ranks == (26, 26) and cell.weight_ih.num_params == 3224
    assert cell.weight_ih.out_splits == ((8, 2), (8, 1), (8, 1))
    assert cell.weight_hh.ranks == (78, 78) and cell.weight_hh.num_params == 5226
    assert cell.weight_hh.in_splits == ((4, 1), (4, 1), (1, 4), (1, 4))


def test_explicit_options_win_and_keep_the_other_share():
    cell = kcprnn.LSTMCell(13, 256, format="kcp", hidden_format="tt", rank=2)
    assert cell.weight_ih.ranks == (2, 2)
    # W_hh keeps the share it has next to a compressed W_ih
    assert cell.weight_hh.num_params == make_matrix("tt", 256, 1024, rank=5280 / HH).num_params
    cell = kcprnn.LSTMCell(13, 256, format="tt", hidden_format="tt", hidden_options={"rank": 3})
    assert cell.weight_hh.ranks == (1, 3, 3, 3, 1)
    assert cell.weight_ih.num_params == make_matrix("tt", 13, 1024, rank=0.25).num_params
    # fixed options other than rank are kept; only the rank is solved
    cell = kcprnn.LSTMCell(13, 256, format="kcp", hidden_format="kcp", hidden_options={"terms": 3})
    assert cell.weight_hh.terms == 3 and cell.weight_hh.num_params <= 5280


def test_a_wide_input_counts_at_most_twice_the_hidden_matrix():
    # 57,600 inputs: W_ih counts DEFAULT_WIDE_COUNT = 2 times W_hh's 262,144 toward the total,
    # so the pair stores 1/32 of 786,432 = 24,576 parameters, 12,288 each
    assert DEFAULT_WIDE_COUNT == 2
    cell = kcprnn.LSTMCell(57_600, 256, format="tt", hidden_format="tt")
    wide = 1024 * 57_600
    ih = make_matrix("tt", 57_600, 1024, rank=12_288 / wide)
    hh = make_matrix("tt", 256, 1024, rank=12_288 / HH)
    assert cell.weight_ih.num_params == ih.num_params <= 12_288
    assert cell.weight_hh.num_params == hh.num_params <= 12_288
    # with a dense W_hh, W_ih alone gets 1/32 of twice W_hh's size
    cell = kcprnn.LSTMCell(57_600, 256, format="kcp")
    assert (
        cell.weight_ih.num_params == make_matrix("kcp", 57_600, 1024, rank=16_384 / wide).num_params
    )


@pytest.mark.parametrize(
    ("n_in", "hidden", "each", "wide"),
    [
        # the spike stand-in: W_ih 512 x 700 = 358,400 counts as 2 x 65,536; 1/32 of 196,608
        # is 6,144, 3,072 each; then W_ih is raised to the floor, 1/32 of itself (11,200 is
        # fewer than 12,288)
        (700, 128, 3072, 11_200),
        # W_ih 1024 x 400 = 409,600 counts in full: 1/32 of 671,744 = 20,992, 10,496 each;
        # W_ih raised to the floor's 12,288 (1/32 of itself would be 12,800)
        (400, 256, 10_496, 12_288),
        # W_ih 1024 x 1,000 counts as 2 x 262,144: 12,288 each, already at the floor
        (1000, 256, 12_288, 12_288),
    ],
)
def test_a_wider_input_raises_the_budget_up_to_the_bound(n_in, hidden, each, wide):
    ih_size, hh_size = 4 * hidden * n_in, 4 * hidden * hidden
    assert (min(ih_size, 2 * hh_size) + hh_size) / 32 == 2 * each
    assert wide == max(each, min(DEFAULT_WIDE_FLOOR, ih_size / 32))
    cell = kcprnn.LSTMCell(n_in, hidden, format="tt", hidden_format="tt")
    ih = make_matrix("tt", n_in, 4 * hidden, rank=wide / ih_size)
    hh = make_matrix("tt", hidden, 4 * hidden, rank=each / hh_size)
    assert cell.weight_ih.num_params == ih.num_params <= wide
    assert cell.weight_hh.num_params == hh.num_params <= each


@pytest.mark.parametrize("fmt", ["kcp", "tt", "ht"])
def test_only_a_matrix_wider_than_w_hh_gets_the_floor(fmt):
    """The floor lifts a wide ``W_ih`` only: a narrow one (FSDD's 13, speech's 40 inputs), a
    ``W_hh`` and a ``W_ih`` of ``W_hh``'s size keep the split's share."""
    assert DEFAULT_WIDE_FLOOR == 12_288
    for n_in, hidden in ((13, 256), (40, 256), (256, 256)):
        cell = kcprnn.LSTMCell(n_in, hidden, format=fmt, hidden_format=fmt)
        shares = split_budget([4 * hidden * n_in, 4 * hidden * hidden])
        for m, share, n in zip(
            (cell.weight_ih, cell.weight_hh), shares, (n_in, hidden), strict=True
        ):
            assert m.num_params == make_matrix(fmt, n, 4 * hidden, rank=share).num_params
    wide = kcprnn.LSTMCell(700, 128, format=fmt, hidden_format=fmt)
    assert 11_200 * 0.9 < wide.weight_ih.num_params <= 11_200


def test_dense_matrices_are_outside_the_budget():
    # the default hidden_format is dense: W_ih alone stores 1/32 of itself
    cell = kcprnn.LSTMCell(256, 256, format="tt")
    assert cell.weight_hh.num_params == HH
    assert cell.weight_ih.num_params == make_matrix("tt", 256, 1024, rank=DEFAULT_BUDGET).num_params
    dense = kcprnn.LSTMCell(13, 256, format="dense", hidden_format="dense")
    assert dense.weight_ih.num_params == IH and dense.weight_hh.num_params == HH


@pytest.mark.parametrize(("cls", "gates"), [(kcprnn.GRU, 3), (kcprnn.RNN, 1)])
def test_gru_and_rnn_count_their_gates(cls, gates):
    cell = cls(40, 128, format="tt", hidden_format="tt").cell(0)
    shares = split_budget([gates * 128 * 40, gates * 128 * 128])
    assert cell.weight_ih.num_params == (
        make_matrix("tt", 40, gates * 128, rank=shares[0]).num_params
    )
    assert cell.weight_hh.num_params == (
        make_matrix("tt", 128, gates * 128, rank=shares[1]).num_params
    )


def test_projection_is_in_the_budget():
    cell = kcprnn.LSTMCell(64, 256, format="tt", hidden_format="tt", proj_size=128)
    shares = split_budget([1024 * 64, 1024 * 128, 128 * 256])
    for m, (n_in, n_out), share in zip(
        (cell.weight_ih, cell.weight_hh, cell.weight_hr),
        [(64, 1024), (128, 1024), (256, 128)],
        shares,
        strict=True,
    ):
        assert m.num_params == make_matrix("tt", n_in, n_out, rank=share).num_params


def test_every_layer_solves_its_own_budget():
    lstm = kcprnn.LSTM(13, 256, num_layers=2, format="tt", hidden_format="tt")
    second = lstm.cell(1)
    shares = split_budget([HH, HH])  # the second layer's input is the hidden state
    assert second.weight_ih.num_params == (make_matrix("tt", 256, 1024, rank=shares[0]).num_params)


def test_from_torch_decomposes_into_the_default_structure():
    # the decomposition gets the options the default solved (a TT-SVD may then clip ranks
    # that the matrix cannot fill); KCP keeps them exactly
    torch.manual_seed(0)
    ref = nn.LSTM(13, 256)
    for fmt in ("tt", "kcp"):
        ours = kcprnn.LSTM.from_torch(ref, format=fmt, hidden_format=fmt).cell(0)
        built = kcprnn.LSTM(13, 256, format=fmt, hidden_format=fmt).cell(0)
        assert ours._matrix_options == built._matrix_options
        assert "rank" in ours._matrix_options["ih"][1]
    ours = kcprnn.LSTM.from_torch(ref, format="kcp", hidden_format="kcp").cell(0)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in built.parameters()]


def test_the_default_does_not_warn_for_tiny_cells(caplog):
    # a 3 -> 5 cell is below every format's smallest configuration: it is used, silently
    with caplog.at_level(logging.WARNING, logger="kcprnn"):
        cell = kcprnn.LSTMCell(3, 5, format="tt", hidden_format="tt")
    assert cell(torch.randn(2, 3))[0].shape == (2, 5)
    assert not [r for r in caplog.records if "budget" in r.getMessage()]
