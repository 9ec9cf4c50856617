"""Layer plans kept per shape (``kcprnn.rnn.plan.plan_layer``) and the dense weights the torch
route keeps between calls without gradients: kept while nothing they depend on changes, planned
or rebuilt afresh when it does (dtype, cost model, algorithm, a replaced matrix; parameter values
changed in place or by ``load_state_dict``), and always what an uncached call gives."""

import dataclasses

import pytest
import torch
from torch import nn

import kcprnn
from kcprnn._cpu import CostModel
from kcprnn._cpu.native_dense import small_product
from kcprnn.rnn import _cell_route, plan

INPUT, HIDDEN, STEPS, BATCH = 6, 8, 5, 3
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _counting(monkeypatch):
    calls = []
    real = plan.choose_route

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "choose_route", counted)
    return calls


def test_plans_are_kept_per_shape_and_replanned_when_inputs_to_the_prices_change(monkeypatch):
    torch.manual_seed(0)
    model = kcprnn.LSTM(INPUT, HIDDEN, bidirectional=True, format="kcp", hidden_format="cp")
    x = torch.randn(STEPS, BATCH, INPUT)
    calls = _counting(monkeypatch)
    model(x)
    model(x)
    assert len(calls) == 1  # one layer, planned once
    model(torch.randn(STEPS + 1, BATCH, INPUT))  # another shape: its own plan
    assert len(calls) == 2
    with torch.no_grad():  # inference is priced without the backward
        model(x)
    assert len(calls) == 3
    # a cost model that makes the structured loop dear: replanned, and it changes the route
    cells = [model.cell(0, d) for d in range(2)]
    before = plan.plan_layer("auto", cells, STEPS * BATCH, STEPS, True, True, model._plans)
    assert before.route == "structured"
    dear = CostModel(rnn_native_gemm=1e9, rnn_small_gemm=1e9)
    for c in cells:
        c.weight_hh.cost_model = dear
    model(x)
    assert len(calls) == 4
    after = plan.plan_layer("auto", cells, STEPS * BATCH, STEPS, True, True, model._plans)
    assert len(calls) == 4 and after.route == "torch"
    assert after == plan._make_plan("auto", cells, STEPS * BATCH, STEPS, True, True)
    # another algorithm, another dtype, a replaced matrix: each planned afresh
    for change in ("algorithm", "dtype", "matrix", "recurrence"):
        if change == "algorithm":
            model.cell(0, 0).weight_ih.algorithm = "dense"
        elif change == "dtype":
            model.double()
            x = x.double()
        elif change == "matrix":
            model.cell(0, 1).weight_hh = kcprnn.formats.make_matrix(
                "cp", HIDDEN, 4 * HIDDEN, rank=2, dtype=torch.float64
            )
        else:
            model.recurrence = "steps"
        count = len(calls)
        model(x)
        model(x)
        assert len(calls) == count + 1, change


def test_plan_cache_is_bounded():
    torch.manual_seed(0)
    model = kcprnn.GRU(INPUT, HIDDEN, format="tt", hidden_format="tt")
    for steps in range(1, plan.PLAN_CACHE_SIZE + 5):
        model(torch.randn(steps, 1, INPUT))
    assert 0 < len(model._plans) <= plan.PLAN_CACHE_SIZE


@pytest.mark.parametrize("fmt", ["cp", "tt", "kcp"])
def test_torch_route_without_gradients_follows_parameter_changes(fmt):
    torch.manual_seed(0)
    kw = {"format": fmt, "hidden_format": fmt, "dtype": torch.float64, "bidirectional": True}
    model = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    other = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    reference = kcprnn.LSTM(INPUT, HIDDEN, **kw)
    model.recurrence = "torch"
    reference.recurrence = "steps"  # no cached weights: one cell step at a time
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)

    def check():
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            got, want = model(x), reference(x)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, **TOL)

    check()
    with torch.no_grad():
        first = model(x)[0]
        assert torch.equal(model(x)[0], first)  # kept: the same weights give the same output
    model.load_state_dict(other.state_dict())
    check()
    with torch.no_grad():
        next(model.cell(0, 1).weight_hh.parameters()).mul_(1.5)  # in place
    check()
    factor = next(model.cell(0, 0).weight_ih.parameters())
    factor.data = factor.data * 0.5  # new storage
    check()
    model.float()
    reference.float()
    x = x.float()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_torch_route_with_gradients_rebuilds_every_call():
    # under autograd nothing is kept: the gradients reach the factors at every call
    torch.manual_seed(0)
    model = kcprnn.GRU(INPUT, HIDDEN, format="cp", hidden_format="cp", dtype=torch.float64)
    model.recurrence = "torch"
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        model(x)[0].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    ref = nn.GRU(INPUT, HIDDEN, dtype=torch.float64)
    assert isinstance(ref, nn.GRU)


def _speech_cp_lstm():
    # the speech layer (40 -> 512, one direction) with CP for both matrices, modes explicit
    return kcprnn.LSTM(
        40,
        512,
        format="cp",
        rank=4,
        in_modes=[5, 2, 2, 2],
        out_modes=[8, 8, 8, 4],
        hidden_format="cp",
        hidden_options={"rank": 4, "in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4]},
    )


def test_route_prices_with_the_large_products_on_onednn():
    """Where oneDNN runs the large products faster (``onednn_gemm`` below 1), each pass of a
    dense ``W_ih``'s product is priced on the cheaper library, and torch's LSTM kernel
    (oneDNN's RNN primitive) gets the same rate for its input products: written out by hand
    for the speech layer's ``W_ih`` (40 -> 4 x 512) over 1,600 and 4,800 rows."""
    mkl = CostModel(onednn_gemm=1.0)
    fast = mkl.replace(onednn_gemm=0.5)
    i, g = 40, 2048
    for rows in (1600, 4800):
        macs = rows * i * g
        faults = fast.fault * rows * g if rows * g > fast.rnn_torch_mmap else 0.0
        forward = min(macs, 0.5 * macs + fast.onednn_call + faults)
        copies = fast.onednn_copy * (rows * i + i * g)  # x.T and the (i, g) result
        weight = min(macs, 0.5 * macs + fast.onednn_call + copies)
        assert plan._dense_input(rows, i, g, False, fast) == forward
        assert plan._dense_input(rows, i, g, True, fast) == forward + macs + weight
        assert plan._dense_input(rows, i, g, True, mkl) == 3 * macs
    # 1,600 rows: the forward and the weight's gradient on oneDNN (the input's gradient is
    # priced at MKL's MACs); 4,800: the forward's 9.8 M-entry output is mapped fresh, so it
    # runs on MKL, and the weight's gradient (its small operand copied) on oneDNN
    assert plan._dense_input(1600, i, g, False, fast) < 1600 * i * g
    assert (
        plan._dense_input(1600, i, g, True, fast) - plan._dense_input(1600, i, g, False, fast)
        < 2 * 1600 * i * g
    )
    assert plan._dense_input(4800, i, g, False, fast) == 4800 * i * g
    assert plan._dense_input(4800, i, g, True, fast) < 3 * 4800 * i * g
    cells = [_speech_cp_lstm().cell(0)]
    slow, quick = (plan.layer_costs(cells, 1600, 100, True, False, m) for m in (mkl, fast))
    assert slow["torch"] - quick["torch"] == pytest.approx(0.5 * 1600 * i * g)
    saved = plan._dense_input(1600, i, g, False, mkl) - plan._dense_input(1600, i, g, False, fast)
    assert slow["dense"] - quick["dense"] == pytest.approx(saved)


def test_route_prices_by_hand():
    """The prices of the three routes of a CP LSTM layer at the speech point (T=300, B=16),
    written out from the cost model's fields (defaults) and the shapes."""
    cells = [_speech_cp_lstm().cell(0)]
    cm = CostModel(onednn_gemm=1.0)  # every large product on MKL (the built-in on Intel CPUs)
    rows, steps, g = 4800, 300, 2048
    # reconstruction MACs by halves (two modes each side, joined over the rank 4):
    # W_ih merged modes [40, 16, 16, 8], W_hh [64, 32, 32, 16]
    macs_ih = 4 * 40 * 16 + 4 * 16 * 8 + 4 * 40 * 2048
    macs_hh = 4 * 64 * 32 + 4 * 32 * 16 + 4 * 512 * 2048
    assert cells[0].weight_ih.reconstruction_macs() == macs_ih
    assert cells[0].weight_hh.reconstruction_macs() == macs_hh
    rebuild_ih = cm.rnn_rebuild * 40 * g + macs_ih
    rebuild_hh = cm.rnn_rebuild * 512 * g + macs_hh
    once = rows * 40 * g + rows * 512 * g  # one pass of the input and recurrent GEMMs
    # torch's LSTM kernel (oneDNN) also reorders both weights at every call
    reorder = cm.rnn_torch_lstm_call * (40 * g + 512 * g)
    torch_price = rebuild_ih + rebuild_hh + once + steps * cm.rnn_torch_step + reorder
    # the input product: W_ih rebuilt dense beats CP's own sweep (rnn_factorized_input per MAC
    # of cp_linear: 4 * 4800 * (2048 * 5 + 256 * 10 + 32 * 20 + 4 * 40))
    narrow = 1 + cm.rnn_structured_input / 40  # the narrow-input rate of any structured product
    structured_input = cm.rnn_factorized_input * narrow * 4 * rows * (10240 + 2560 + 640 + 160)
    assert plan._input_costs(cells[0], rows, False, cm)[0] == pytest.approx(structured_input)
    dense_input = rebuild_ih + rows * 40 * g
    assert dense_input < structured_input
    # the compiled dense loop: priced against torch's kernel for the recurrent work, plus its
    # own per-step calls
    recurrent = rows * 512 * g + steps * cm.rnn_torch_step
    dense_price = (
        dense_input + rebuild_hh + cm.rnn_dense_forward * recurrent + steps * cm.rnn_dense_step
    )
    # the compiled loop: per step, per gate unit, and its products as the kernel runs them:
    # factors (J x I) 8x8, 8x4, 8x4, 4x4 of 4 terms, applied in the order with the fewest MACs,
    # 0, 3, 1, 2 (pre, post = 1, 64; 128, 1; 8, 16; 64, 4): the second and fourth expanded over
    # their trailing axes of 1 and 4 (row mode), the second on scalars (width 4: 8x)
    work = 4 * rows * (8 * 8 * 64 + 128 * 4 * 4 * 8 + 8 * 4 * 8 * 16 + 64 * 4 * 8 * 4 * 4)
    assert work == 1_101_004_800
    # per step, 16 factor products (4 terms x 4 modes), each moving its intermediates: per row
    # and term, factor k maps pre * i * post entries to pre * j * post, in that order
    loop = steps * cm.rnn_native_step + rows * g * cm.rnn_native_gate
    loop += steps * 16 * cm.rnn_native_product
    traffic = 4 * rows * (16 * 64 + 128 * 8 + 8 * 12 * 16 + 64 * 12 * 4)
    assert traffic == 127_795_200
    structured_price = (
        dense_input + loop + cm.rnn_native_gemm * work + cm.rnn_native_traffic * traffic
    )
    got = plan.layer_costs(cells, rows, steps, True, False, cm)
    want = {"torch": torch_price, "dense": dense_price, "structured": structured_price}
    assert got == pytest.approx(want, rel=1e-12)
    assert plan.choose_route("auto", cells, rows, steps, True, False) == "structured"

    # training, without the factor gradients' price: the rebuilds' backward, two more passes
    # of torch's GEMMs and its steps' backward; the kernel's transposed products
    # (4x8, 8x4, 8x4 expanded 4x, 4x4 expanded and scalar)
    lean = cm.replace(rnn_native_grads=0.0)
    back_ih = cm.rnn_rebuild_backward * 40 * g + 2 * macs_ih
    back_hh = cm.rnn_rebuild_backward * 512 * g + 2 * macs_hh
    torch_train = (
        torch_price
        + (cm.rnn_torch_lstm_train - cm.rnn_torch_lstm_call) * (40 * g + 512 * g)
        + back_ih
        + back_hh
        + 2 * once
        + steps * cm.rnn_torch_step * cm.rnn_step_backward
        # its three input products (forward, both backward) priced above a GEMM's
        + 3 * (cm.rnn_torch_lstm_input - 1) * rows * 40 * g
    )
    dense_input_train = rebuild_ih + back_ih + 3 * rows * 40 * g
    # transposed (4x8, 4x8 and 8x8 as I x J, 4x4) in the order 1, 2, 0, 3 (pre, post = 8, 32;
    # 32, 4; 1, 64; 128, 1): the second expanded over 4, the last on scalars; the same traffic
    work_t = 4 * rows * (8 * 8 * 4 * 32 + 32 * 8 * 4 * 4 * 4 + 8 * 8 * 64 + 128 * 4 * 4 * 8)
    assert work_t == 865_075_200
    structured_train = (
        dense_input_train
        + loop
        + cm.rnn_native_gemm * work
        + loop
        + cm.rnn_native_backward_gemm * work_t
        + 2 * cm.rnn_native_traffic * traffic
    )
    dense_train = (
        dense_input_train
        + rebuild_hh
        + back_hh
        + cm.rnn_dense_forward * recurrent
        + cm.rnn_dense_backward * (2 * rows * 512 * g + steps * cm.rnn_torch_step * 2.0)
        + 2 * steps * cm.rnn_dense_step
    )
    got = plan.layer_costs(cells, rows, steps, True, True, lean)
    assert got["torch"] == pytest.approx(torch_train, rel=1e-12)
    assert got["dense"] == pytest.approx(dense_train, rel=1e-12)
    assert got["structured"] == pytest.approx(structured_train, rel=1e-12)
    # the factor gradients: the cheaper of the sweeps over all rows and the dense-first
    # contraction (one rows x 512 x 2048 GEMM, then the MTTKRP: the regrouping copy of the
    # 512 x 2048 gradient and 4 terms' products over it per factor, at KR_GRADS each)
    from kcprnn.rnn.kron import KR_GRADS, kron_grads_cost

    shapes = [(4, 8, 8), (4, 8, 4), (4, 8, 4), (4, 4, 4)]
    from_dense = 512 * g * (1 + KR_GRADS * 4 * 4)
    grads = min(kron_grads_cost(shapes, rows), rows * 512 * g + from_dense)
    full = plan.layer_costs(cells, rows, steps, True, True, cm)
    assert full["structured"] - got["structured"] == pytest.approx(cm.rnn_native_grads * grads)
    # with it, training prices the structured loop below the compiled dense loop on the
    # rebuilt weights, and that below torch's kernel on them, as measured for this layer
    # bidirectional (590, 739 and 786 ms per training step, 1 thread, Xeon VM)
    assert full["structured"] < full["dense"] < full["torch"]
    assert plan.choose_route("auto", cells, rows, steps, True, True) == "structured"
    # below rnn_min_rows rows per step the dense loop is priced as the loop on torch ops
    few = plan.layer_costs(cells, steps, steps, True, True, cm)
    assert few["dense"] > few["torch"]


def test_spikes_tt_input_product_prices_the_sweep():
    # SHD spikes (700 -> 256, T=250, B=16): TT's sweep over 700 inputs is slower than the
    # rebuilt dense GEMM, so the input product runs on W_ih rebuilt: torch's kernel without
    # gradients, the compiled dense loop in training
    cell = kcprnn.LSTM(700, 256, format="tt", hidden_format="tt").cell(0)
    cm = CostModel()
    structured, dense = plan._input_costs(cell, 4000, True, cm)
    assert structured == pytest.approx(
        3
        * cm.rnn_factorized_input
        * (1 + cm.rnn_structured_input / 700)
        * cell.weight_ih.macs(4000, training=True)
    )
    assert dense < structured
    assert plan.choose_route("auto", [cell], 4000, 250, True, True) == "dense"
    assert plan.input_is_dense(cell, 4000, True)
    assert plan.choose_route("auto", [cell], 4000, 250, True, False) == "torch"


def test_cp_input_product_in_training_pays_its_backward():
    # SHD spikes (700 -> 256): CP's own input product is the cheaper one forward, the rebuilt
    # dense one in training (its sweeps' backward: rnn_cp_input_training)
    cell = kcprnn.LSTM(700, 256, format="cp", rank=4).cell(0)
    cm = CostModel(onednn_gemm=1.0)  # the dense product on MKL
    forward, _ = plan._input_costs(cell, 8000, False, cm)
    training, _ = plan._input_costs(cell, 8000, True, cm)
    per_pass = cm.rnn_factorized_input * (1 + cm.rnn_structured_input / 700)
    assert forward == pytest.approx(per_pass * cell.weight_ih.macs(8000))
    rate = per_pass * cm.rnn_cp_input_training
    assert training == pytest.approx(3 * rate * cell.weight_ih.macs(8000, training=True))
    assert forward < plan._input_costs(cell, 8000, False, cm)[1]  # CP's own product forward
    assert training > plan._input_costs(cell, 8000, True, cm)[1]  # the rebuilt one in training
    # with the dense product on oneDNN at half MKL's time, the rebuilt one forward too
    fast = cm.replace(onednn_gemm=0.5)
    structured, dense = plan._input_costs(cell, 8000, False, fast)
    assert structured == forward and dense < structured
    assert plan.input_is_dense(cell, 8000, True) and plan.input_is_dense(cell, 8000, False) == (
        CostModel().onednn_gemm < 1
    )  # the built-in model of this machine decides


def test_gru_kernel_scales_torch_not_the_compiled_loop():
    """torch's GRU kernel is priced at rnn_torch_gru times its LSTM's for the same work; the
    compiled dense loop runs a GRU step at the LSTM's rate, so a dense GRU layer takes it with
    and without gradients. Without oneDNN the loop on torch ops is scaled like torch's."""
    torch.manual_seed(0)
    cells = [kcprnn.GRU(40, 512, format="dense").cell(0)]
    cm = CostModel(onednn_gemm=1.0)  # every large product on MKL
    rows, steps, g = 4800, 300, 1536
    once = rows * 40 * g + rows * 512 * g
    got = plan.layer_costs(cells, rows, steps, True, False, cm)
    assert got["torch"] == pytest.approx(cm.rnn_torch_gru * (once + steps * cm.rnn_torch_step))
    recurrent = rows * 512 * g + steps * cm.rnn_torch_step
    compiled = cm.rnn_dense_forward * recurrent + steps * cm.rnn_dense_step
    assert got["dense"] == pytest.approx(rows * 40 * g + compiled)
    train = plan.layer_costs(cells, rows, steps, True, True, cm)
    backward = 2 * once + steps * cm.rnn_torch_step * cm.rnn_step_backward
    assert train["torch"] - got["torch"] == pytest.approx(cm.rnn_torch_gru_backward * backward)
    assert plan.choose_route("auto", cells, rows, steps, True, True) == "dense"
    assert plan.choose_route("auto", cells, rows, steps, True, False) == "dense"
    plain = cm.replace(onednn=False)
    fused = cm.rnn_torch_gru * (rows * 512 * g + steps * cm.rnn_fused_step)
    got = plan.layer_costs(cells, rows, steps, True, False, plain)
    assert got["dense"] == pytest.approx(rows * 40 * g + fused)
    assert got["dense"] > got["torch"]


def test_cell_step_choice_follows_cost_model_and_dtype(monkeypatch):
    torch.manual_seed(0)
    # rank 1 (not the default budget): the factors beat reading a dense W at one row
    small = {"rank": 1, "hidden_options": {"rank": 1}}
    cell = kcprnn.LSTMCell(40, 512, format="kcp", hidden_format="kcp", **small)
    calls = []
    real = kcprnn.rnn.cells.cell_uses_dense

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kcprnn.rnn.cells, "cell_uses_dense", counted)
    with torch.no_grad():
        assert not cell._use_dense(1)  # one row: the factors beat reading a dense W
        assert not cell._use_dense(1)
        assert len(calls) == 1
        # a cost model under which the structured step is dear: chosen afresh, and dense
        dear = CostModel(rnn_structured_input=1e9, rnn_cell_op=1e12)
        cell.weight_ih.cost_model = dear
        cell.weight_hh.cost_model = dear
        assert cell._use_dense(1)
        assert len(calls) == 2
        cell.double()
        cell._use_dense(1)
        assert len(calls) == 3


def test_product_ops_counts_the_aten_operators_once():
    torch.manual_seed(0)
    tt = kcprnn.formats.make_matrix("tt", 512, 2048, rank=4)
    ht = kcprnn.formats.make_matrix("ht", 512, 2048, rank=4)
    dense = kcprnn.formats.make_matrix("dense", 512, 2048)
    n_tt, n_ht = plan.product_ops(tt), plan.product_ops(ht)
    assert plan.product_ops(dense) <= 4  # one product and its views
    assert 10 < n_tt < n_ht  # a core at a time; HT walks a tree of more nodes
    calls = []
    real = tt.forward
    tt.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    assert plan.product_ops(tt) == n_tt and not calls  # counted once per structure


def test_a_lone_training_step_prices_the_rebuilds_operators(monkeypatch):
    """A lone step's dense rebuild pays its operators (counted once by running it); the steps
    of a sequence share the rebuild and do not; a matrix past ``REBUILD_OPS_LIMIT`` is never
    rebuilt to be counted."""
    torch.manual_seed(0)
    cell = kcprnn.RNNCell(40, 512, format="tt", rank=4)
    n = plan.rebuild_ops(cell.weight_ih)
    assert n > 10  # the TT cores' contractions, reshapes and permutes
    cm = CostModel()
    # with a launch price of zero the only difference between lone and sequence is the count
    free = dataclasses.replace(cm, rnn_aten_op=0.0)
    monkeypatch.setattr(plan, "_model", lambda cells: free)
    shared = _cell_route.cell_trains_dense(cell, 1, lone=True)
    assert _cell_route.cell_trains_dense(cell, 1, lone=False) == shared
    monkeypatch.setattr(plan, "_model", lambda cells: cm)
    assert _cell_route.cell_trains_dense(cell, 1, lone=False) is True  # a shared rebuild
    assert _cell_route.cell_trains_dense(cell, 1, lone=True) is False  # its operators every step
    wide = kcprnn.RNNCell(4096, 2048, format="tt", rank=2)
    assert wide.weight_ih.in_features * wide.weight_ih.out_features > plan.REBUILD_OPS_LIMIT
    monkeypatch.setattr(plan, "dense_weight", lambda m: pytest.fail("rebuilt to be counted"))
    _cell_route.cell_trains_dense(wide, 1, lone=True)


@pytest.mark.parametrize("fmt", ["tt", "tr", "ht", "bt", "tucker"])
def test_cell_without_gradients_reads_kept_dense_weights_unless_the_input_is_wide(fmt):
    """At the speech size (40 -> 512) every format's product is tens of aten operators, dearer
    than torch's cell on the kept dense weights; at the video width (57,600 inputs) reading a
    dense ``W_ih`` (59 M weights) is far dearer than the factors."""
    torch.manual_seed(0)
    opts = {"format": fmt, "rank": 2, "hidden_format": fmt, "hidden_options": {"rank": 2}}
    speech = kcprnn.LSTMCell(40, 512, **opts)
    assert _cell_route.cell_uses_dense(speech, 1, training=False)
    assert _cell_route.cell_uses_dense(speech, 16, training=False)
    wide = kcprnn.LSTMCell(57600, 16, format=fmt, rank=2)
    assert not _cell_route.cell_uses_dense(wide, 1, training=False)


def test_short_lstm_sequences_leave_torchs_kernel():
    """torch's LSTM kernel reorders its weights at every call (about 1 ms at 40 -> 512), which
    a sequence of a few steps does not amortize: ``auto`` runs those on the compiled dense loop
    and keeps long ones on torch's kernel. The GRU kernel pays no such price."""
    torch.manual_seed(0)
    cm = CostModel()
    off = cm.replace(rnn_torch_lstm_call=0.0)
    cells = [kcprnn.LSTM(40, 512, format="dense").cell(0)]
    short = plan.layer_costs(cells, 16, 1, True, False, cm)
    reorder = short["torch"] - plan.layer_costs(cells, 16, 1, True, False, off)["torch"]
    assert reorder == pytest.approx(cm.rnn_torch_lstm_call * (40 + 512) * 2048)
    assert short["dense"] < short["torch"]
    long = plan.layer_costs(cells, 16 * 300, 300, True, False, cm)
    assert long["torch"] < long["dense"]
    training = plan.layer_costs(cells, 16, 1, True, True, cm)  # dearer in training
    untrained = plan.layer_costs(cells, 16, 1, True, True, off.replace(rnn_torch_lstm_train=0.0))
    assert training["torch"] - untrained["torch"] == pytest.approx(
        cm.rnn_torch_lstm_train * (40 + 512) * 2048
    )
    # the paper's layer, dense: reordering 59 M input weights twice a call costs torch's kernel
    # more than the dense loop's slower recurrence
    wide = [kcprnn.LSTM(57600, 256, format="dense").cell(0)]
    assert plan.choose_route("auto", wide, 96, 6, True, True) == "dense"
    gru = [kcprnn.GRU(40, 512, format="dense").cell(0)]
    assert plan.layer_costs(gru, 16, 1, True, False, cm) == plan.layer_costs(
        gru, 16, 1, True, False, off
    )
    without_onednn = cm.replace(onednn=False)  # e.g. another device: no reorder priced
    assert (
        plan.layer_costs(cells, 16, 1, True, False, without_onednn)["torch"]
        == (
            plan.layer_costs(
                cells, 16, 1, True, False, without_onednn.replace(rnn_torch_lstm_call=0)
            )["torch"]
        )
    )


def test_lstm_training_keeps_torchs_kernel_while_its_workspace_is_reused():
    """torch's LSTM trains faster than the compiled loop while its workspace (about 12 floats
    per row and hidden unit) stays under glibc's 32 MiB mmap threshold, and pays fresh pages at
    every call above it: ``auto`` trains 50 steps of batch 16 at hidden 256 on torch's kernel
    and 300 steps on the loop. The GRU's kernel keeps the loop at both lengths."""
    torch.manual_seed(0)
    cm = CostModel()
    cells = [kcprnn.LSTM(40, 256, format="dense").cell(0)]
    assert 16 * 50 * 256 * cm.rnn_torch_workspace < cm.rnn_torch_mmap
    assert 16 * 300 * 256 * cm.rnn_torch_workspace > cm.rnn_torch_mmap
    assert plan.choose_route("auto", cells, 16 * 50, 50, True, True) == "torch"
    assert plan.choose_route("auto", cells, 16 * 300, 300, True, True) == "dense"
    short = plan.layer_costs(cells, 16 * 50, 50, True, True, cm)
    cold = plan.layer_costs(cells, 16 * 50, 50, True, True, cm.replace(rnn_dense_warm=1.0))
    assert short["torch"] == cold["torch"] and short["dense"] > cold["dense"]
    gru = [kcprnn.GRU(40, 256, format="dense").cell(0)]
    assert plan.choose_route("auto", gru, 16 * 50, 50, True, True) == "dense"


def test_kcp_input_product_pays_for_its_output_entries():
    # 40 -> 2,048 gates over 4,800 rows: the structured product's gather and bias pass over the
    # gate tensor (rnn_kcp_output per entry and pass) make W_ih rebuilt dense the cheaper one;
    # without that term the MACs alone would keep it structured. 700 inputs stay structured.
    cm = CostModel(onednn_gemm=1.0)  # the dense product on MKL (the built-in on Intel CPUs)
    narrow = kcprnn.LSTM(40, 512, format="kcp", rank=4).cell(0)
    for training, passes in ((False, 1), (True, 3)):
        structured, dense = plan._input_costs(narrow, 4800, training, cm)
        macs = narrow.weight_ih.macs(4800, training=training)
        output = passes * 4800 * 2048 * cm.rnn_kcp_output
        rate = plan.structured_rate(narrow.weight_ih, cm)
        assert structured == pytest.approx(passes * rate * macs + output)
        assert dense < structured
        assert passes * rate * macs < dense  # the MACs alone
    assert plan.input_is_dense(narrow, 4800, False)
    free = CostModel(rnn_kcp_output=0.0)
    assert (
        plan._input_costs(narrow, 4800, False, free)[0]
        < plan._input_costs(narrow, 4800, False, free)[1]
    )
    wide = kcprnn.LSTM(700, 256, format="kcp", rank=4).cell(0)
    assert not plan.input_is_dense(wide, 3200, False)
    assert not plan.input_is_dense(wide, 8000, True)


def test_kernel_order_is_the_cheapest_as_the_kernel_applies_it():
    """The structured loop is priced in the order the compiled kernel applies the factors: the
    fewest MACs, the last factor first on a tie. The default KCP W_hh of an LSTM 40 -> 512
    (factors 2x16 and 1024x32) costs 16*2*32 + 2*32*1024 = 66,560 MACs a row first-first and
    16*32*1024 + 16*2*1024 = 557,056 last-first; its layer runs 3x faster structured than on
    torch's kernel without gradients (69 against 210 ms, bidirectional, T=300, batch 16)."""
    assert plan._kernel_order((16, 32), (2, 1024)) == ((0, 1, 32), (1, 2, 1))
    assert plan._kernel_order((4, 4), (4, 4)) == ((1, 4, 1), (0, 1, 4))  # a tie: last first
    assert plan._kernel_work((16, 32), (2, 1024), 1, 1) == 16 * 2 * 32 + 2 * 32 * 1024
    torch.manual_seed(0)
    model = kcprnn.LSTM(40, 512, bidirectional=True, format="kcp", hidden_format="kcp")
    layout, _ = plan.kron_layout_cached(model.cell(0, 0).weight_hh)
    assert (layout.in_sizes, layout.out_sizes) == ((16, 32), (2, 1024))
    cells = [model.cell(0, d) for d in range(2)]
    assert plan.choose_route("auto", cells, 4800, 300, True, False) == "structured"


@pytest.mark.parametrize(
    ("mode", "hidden", "small"),
    [("RNN", 256, (True, True)), ("GRU", 128, (True, True)), ("LSTM", 128, (True, False))],
)
def test_dense_loop_prices_small_products_without_the_packed_call(mode, hidden, small):
    """A W_hh (and W_hh.T in training) within native_dense's small-product limits runs on
    torch.mm: the dense loop's price drops by rnn_dense_packed_call per step for each."""
    torch.manual_seed(0)
    cells = [getattr(kcprnn, mode)(40, hidden, format="dense", hidden_format="dense").cell(0)]
    cm = CostModel()
    g = cells[0].weight_hh.out_features
    assert (small_product(hidden, g), small_product(g, hidden)) == small
    rows, steps = 6400, 100  # an LSTM workspace beyond rnn_torch_mmap: no rnn_dense_warm
    assert rows * hidden * cm.rnn_torch_workspace >= cm.rnn_torch_mmap
    for training, count in [(False, small[0]), (True, small[0] + small[1])]:
        got = plan.layer_costs(cells, rows, steps, True, training, cm)["dense"]
        full = plan.layer_costs(
            cells, rows, steps, True, training, cm.replace(rnn_dense_packed_call=0.0)
        )
        assert full["dense"] - got == pytest.approx(steps * cm.rnn_dense_packed_call * count)


def test_torch_lstm_training_prices_its_input_products_above_a_gemm():
    """In training (only), torch's LSTM kernel pays rnn_torch_lstm_input per MAC of its three
    input products; its GRU kernel does not."""
    cm, rows, steps = CostModel(), 1600, 100
    for mode, extra in [("LSTM", 3 * (cm.rnn_torch_lstm_input - 1) * rows * 700 * 512), ("GRU", 0)]:
        cells = [getattr(kcprnn, mode)(700, 128, format="dense", hidden_format="dense").cell(0)]
        plain = cm.replace(rnn_torch_lstm_input=1.0)
        for training in (False, True):
            got = plan.layer_costs(cells, rows, steps, True, training, cm)["torch"]
            base = plan.layer_costs(cells, rows, steps, True, training, plain)["torch"]
            assert got - base == pytest.approx(extra if training else 0.0)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_dense_loop_factor_scales_only_its_mode_and_phase(mode):
    """``rnn_dense_<mode>`` multiplies the compiled dense loop's price without gradients and
    ``rnn_dense_<mode>_train`` in training (what ``kcprnn calibrate`` measures per machine);
    torch's kernel keeps its price, and the other modes' factors change nothing. A loop
    priced at four times its fitted cost hands a dense layer to torch's kernel."""
    torch.manual_seed(0)
    cells = [getattr(kcprnn, mode)(40, 256, format="dense").cell(0)]
    rows, steps = 4800, 300
    name = "rnn_dense_" + mode.lower()
    others = {f: 3.0 for f in _DENSE_FIELDS if not f.startswith(name)}
    for training, field in ((False, name), (True, name + "_train")):
        cm = CostModel()
        base = plan.layer_costs(cells, rows, steps, True, training, cm)
        fixed = plan.layer_costs(cells, rows, steps, True, training, cm.replace(**{field: 0.0}))
        doubled = plan.layer_costs(cells, rows, steps, True, training, cm.replace(**{field: 2.0}))
        assert doubled["torch"] == base["torch"] == fixed["torch"]
        assert doubled["dense"] - base["dense"] == pytest.approx(base["dense"] - fixed["dense"])
        assert base["dense"] - fixed["dense"] > 0.5 * base["dense"]  # the loop, not W_ih
        assert plan.layer_costs(cells, rows, steps, True, training, cm.replace(**others)) == base
        slow = plan.layer_costs(cells, rows, steps, True, training, cm.replace(**{field: 4.0}))
        assert min(slow, key=slow.__getitem__) == "torch"


_DENSE_FIELDS = [f"rnn_dense_{m}{s}" for m in ("lstm", "gru", "rnn") for s in ("", "_train")]


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_torch_kernels_on_mkl_pay_its_rate(mode):
    """torch's GRU and Elman kernels multiply on MKL: where oneDNN's GEMMs take half MKL's time
    (``onednn_gemm = 0.5``) their products are priced at twice the MACs (the LSTM's kernel,
    oneDNN's, only gains on its input product); at one row a step the steps' products are
    matrix-vector products and keep their price, the weight gradient over all rows does not."""
    cell = getattr(kcprnn, mode)(40, 256, format="dense").cell(0)
    g = cell.weight_hh.out_features
    fast, slow = CostModel(onednn_gemm=1.0), CostModel(onednn_gemm=0.5)
    scale, scale_backward = plan._torch_scales(mode, fast)
    for rows, steps in [(4800, 300), (1000, 1000)]:
        inputs, recurrent = rows * 40 * g, max(rows, steps * fast.rnn_min_rows) * 256 * g

        def extra(training: bool, rows: int = rows, steps: int = steps) -> float:
            fast_cost, slow_cost = (
                plan.layer_costs([cell], rows, steps, True, training, cm)["torch"]
                for cm in (fast, slow)
            )
            return slow_cost - fast_cost

        if mode == "LSTM":
            assert extra(False) == pytest.approx(-0.5 * inputs)
            continue
        per_step = recurrent if rows >= steps * fast.rnn_min_rows else 0
        assert extra(False) == pytest.approx(scale * (inputs + per_step))
        backward = 2 * (inputs + per_step) + (recurrent - per_step)
        assert extra(True) == pytest.approx(scale * (inputs + per_step) + scale_backward * backward)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_torch_step_weight_gradients_at_few_rows(mode):
    """Below rnn_min_rows rows a step, torch's GRU and Elman backward takes each step's W_hh
    gradient as a fresh product and sums it: training pays rnn_torch_step_grad per entry of
    W_hh a step there (the LSTM's kernel, inference and 16 rows a step do not)."""
    cell = getattr(kcprnn, mode)(40, 256, format="dense").cell(0)
    g = cell.weight_hh.out_features
    priced, free = CostModel(), CostModel(rnn_torch_step_grad=0.0)
    for rows, steps, training in [(1000, 1000, True), (1000, 1000, False), (4800, 300, True)]:
        extra = (
            plan.layer_costs([cell], rows, steps, True, training, priced)["torch"]
            - plan.layer_costs([cell], rows, steps, True, training, free)["torch"]
        )
        charged = training and mode != "LSTM" and rows < steps * priced.rnn_min_rows
        per_entry = priced.rnn_torch_step_grad if charged else 0.0
        assert extra == pytest.approx(steps * 256 * g * per_entry)
