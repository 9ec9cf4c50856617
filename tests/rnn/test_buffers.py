"""The buffers the fused recurrences reuse between calls (kcprnn/_cpu/buffers.py) and the pooled
input projection: a buffer is handed out again only once nothing refers to it, results kept by
the caller are never overwritten by later calls, and the fused layers give the same numbers
(against float64 references) with every buffer pooled, call after call, with changing shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import kcprnn
from kcprnn._cpu import buffers as _buffers
from kcprnn._cpu import native
from kcprnn.rnn.fused import fused_sequence, input_projection
from kcprnn.rnn.kron import kron_terms


@pytest.fixture
def pool_everything(monkeypatch):
    """Every buffer pooled (the pool's lower size limit off), starting from an empty pool."""
    monkeypatch.setattr(_buffers, "POOL_MIN", 0)
    _buffers.release_buffers()
    yield
    _buffers.release_buffers()


def _empty(*shape: int) -> torch.Tensor:
    return _buffers.pooled_empty(shape, torch.float32, torch.device("cpu"))


def test_a_buffer_is_reused_only_once_nothing_refers_to_it(pool_everything):
    a = _empty(4, 5)
    ptr = a.data_ptr()
    b = _empty(4, 5)  # a is alive: another buffer
    assert b.data_ptr() != ptr
    view = a[1:]
    del a
    assert _empty(20).data_ptr() not in (ptr, b.data_ptr())  # a view keeps the storage
    del view
    c = _empty(2, 10)  # same size, any shape
    assert c.data_ptr() == ptr and c.shape == (2, 10) and c.is_contiguous()
    assert c.untyped_storage().nbytes() == 20 * 4  # exactly its size
    d = _empty(3, 5)  # another size: a new buffer
    assert d.data_ptr() not in (ptr, b.data_ptr())


def test_pool_holds_at_most_pool_max_elements(pool_everything, monkeypatch):
    monkeypatch.setattr(_buffers, "POOL_MAX", 100)
    a = _empty(60)
    b = _empty(60)  # over the limit with a alive: allocated outside the pool
    assert len(_buffers._pool()) == 1
    ptr_b = b.data_ptr()
    del a, b
    c = _empty(80)  # the unused 60-element buffer is dropped to make room
    assert len(_buffers._pool()) == 1 and _buffers._pool()[0].numel() == 80
    assert c.data_ptr() != ptr_b
    assert _empty(101).numel() == 101 and len(_buffers._pool()) == 1  # larger than the pool
    _buffers.release_buffers()
    assert _buffers._pool() == []


def test_dropping_a_buffer_behind_others_of_other_sizes(pool_everything, monkeypatch):
    # the dropped buffer is not the pool's first: list.remove would compare tensors of
    # different sizes elementwise and raise
    monkeypatch.setattr(_buffers, "POOL_MAX", 100)
    keep = _empty(10)
    big = _empty(60)
    ptr_keep = keep.data_ptr()
    del big
    c = _empty(50)  # 10 + 60 + 50 > 100: the unused 60 goes, the 10 in use stays
    assert [b.numel() for b in _buffers._pool()] == [10, 50]
    assert _buffers._pool()[0].data_ptr() == ptr_keep and c.numel() == 50


def test_small_and_other_device_requests_are_not_pooled(monkeypatch):
    _buffers.release_buffers()
    monkeypatch.setattr(_buffers, "POOL_MIN", 64)
    assert _empty(8, 7).shape == (8, 7) and _buffers._pool() == []
    meta = _buffers.pooled_empty((8, 8), torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and _buffers._pool() == []
    with torch.inference_mode():
        t = _empty(8, 8)
    assert not t.is_inference() and len(_buffers._pool()) == 1
    _buffers.release_buffers()


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_input_projection_matches_linear(shape, bias, pool_everything):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    got = input_projection(x, w, b)
    want = F.linear(x, w, b)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)
    )
    assert torch.autograd.gradcheck(lambda *a: input_projection(*a), leaves)


def test_input_projection_results_kept_by_the_caller_stay(pool_everything):
    torch.manual_seed(1)
    w = torch.randn(6, 5)
    x1, x2 = torch.randn(8, 5), torch.randn(8, 5)
    first = input_projection(x1, w)
    second = input_projection(x2, w)  # first is alive: another buffer
    torch.testing.assert_close(first, x1 @ w.T)
    torch.testing.assert_close(second, x2 @ w.T)
    ptr = second.data_ptr()
    del second
    third = input_projection(x1, w)  # reuses the freed buffer
    assert third.data_ptr() == ptr
    torch.testing.assert_close(first, x1 @ w.T)


def test_input_projection_falls_back_to_linear_errors():
    with pytest.raises(RuntimeError):
        input_projection(torch.randn(3, 4), torch.randn(5, 6))
    got = input_projection(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4).double())
    assert got.shape == (3, 5)


needs_kernel = pytest.mark.skipif(
    not native.available(), reason="the compiled kernel cannot be built"
)


@needs_kernel
@pytest.mark.parametrize(("mode", "gates"), [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_fused_kernel_with_pooled_buffers_across_calls(mode, gates, pool_everything):
    """Calls of changing lengths and batches, every buffer pooled: each call's outputs and
    gradients match the float64 torch loop, and the outputs of earlier calls, kept, stay."""
    torch.manual_seed(2)
    hidden = 12
    w = kcprnn.formats.make_matrix("kcp", hidden, gates * hidden, dtype=torch.float64)
    found = kron_terms(w)
    assert found is not None
    mats64, spec = found
    mats64 = [m.detach() for m in mats64]
    kept = []
    for steps, batch, reverse in [(5, 3, False), (5, 3, True), (7, 2, False), (5, 3, False)]:
        gx = torch.randn(steps * batch, gates * hidden, dtype=torch.float64)
        bias = torch.randn(gates * hidden, dtype=torch.float64)
        state = [
            torch.randn(batch, hidden, dtype=torch.float64) for _ in range(1 + (mode == "LSTM"))
        ]
        results = []
        for dtype in (torch.float64, torch.float32):
            leaves = [t.to(dtype).requires_grad_() for t in (gx, bias, *state, *mats64)]
            x, b, st, ms = (
                leaves[0],
                leaves[1],
                leaves[2 : 2 + len(state)],
                leaves[2 + len(state) :],
            )
            out, final = fused_sequence(mode, x, tuple(st), ms, b, reverse, spec)
            loss = (out * out).sum() + sum(f.sum() for f in final)
            results.append([out.detach(), *torch.autograd.grad(loss, leaves)])
        for a, b in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)
        kept.append((results[1][0], results[0][0]))
    for out32, out64 in kept:  # later calls did not write into earlier outputs
        torch.testing.assert_close(out32.double(), out64, rtol=2e-4, atol=2e-4)
    assert _buffers._pool()  # the buffers were pooled


@needs_kernel
@pytest.mark.parametrize("packed", [False, True])
def test_module_with_pooled_buffers_matches_steps(packed, pool_everything):
    """A two-layer bidirectional KCP LSTM with dropout on the structured route, every buffer
    pooled, run twice (the second call on reused buffers) and on a packed batch of equal
    lengths: the float64 model stepping through autograd gives the same outputs and
    gradients."""
    torch.manual_seed(3)
    model = kcprnn.LSTM(
        6, 16, num_layers=2, bidirectional=True, dropout=0.3, format="kcp", hidden_format="kcp"
    )
    model.recurrence = "structured"
    ref = copy.deepcopy(model).double()
    ref.recurrence = "steps"
    x = torch.randn(9, 4, 6)
    for call in range(2):
        results = []
        for m, inp in ((model, x), (ref, x.double())):
            if packed:
                inp = pack_padded_sequence(inp, [9] * 4)
            torch.manual_seed(5 + call)  # the same dropout masks
            out, (h, c) = m(inp)
            out = out.data if packed else out
            loss = (out * out).sum() + h.sum() + c.sum()
            results.append([out, h, c, *torch.autograd.grad(loss, list(m.parameters()))])
        for a, b in zip(results[0], results[1], strict=True):
            torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_fused_layers_with_the_large_products_on_onednn_match_torch(monkeypatch, tmp_path, mode):
    """A dense bidirectional layer on kcprnn's compiled loop with its input projection, that
    product's weight gradient and ``W_hh``'s gradient on oneDNN (a model that prices them there
    at any size: ``onednn_gemm`` 0.5, no call or copy cost), in float32, against ``torch.nn``'s
    layer in float64: outputs and every gradient; oneDNN called for the input projection's
    forward."""
    from kcprnn._cpu import ops
    from kcprnn._cpu.cost import CostModel

    if not (ops.onednn_available() and native.available()):
        pytest.skip("needs oneDNN and the compiled kernels")
    path = tmp_path / "model.json"
    CostModel(onednn_gemm=0.5, onednn_call=0.0, onednn_copy=0.0).save(path)
    monkeypatch.setenv("KCPRNN_COST_MODEL", str(path))
    calls = []
    real = ops._ONEDNN_LINEAR
    monkeypatch.setattr(ops, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(6)
    t, b, i, h = 5, 16, 12, 8
    ref = getattr(torch.nn, mode)(i, h, bidirectional=True, dtype=torch.float64)
    ours = getattr(kcprnn, mode).from_torch(copy.deepcopy(ref).float(), format="dense")
    ours.recurrence = "dense"  # the compiled loop, whatever the prices say about torch's kernel
    x = torch.randn(t, b, i, dtype=torch.float64)
    seed = torch.randn(t, b, 2 * h, dtype=torch.float64)
    got, _ = ours(x.float())
    (got * seed.float()).sum().backward()
    want, _ = ref(x)
    (want * seed).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for name, p in ref.named_parameters():
        role = name.split("_l0")[0]  # weight_ih, weight_hh, bias_ih or bias_hh
        mine = getattr(ours.cell(0, int(name.endswith("_reverse"))), role)
        mine = mine.weight if role.startswith("weight") else mine  # a matrix's dense parameter
        torch.testing.assert_close(mine.grad.double(), p.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert (t * b, i) in calls  # the input projection's forward ran on oneDNN
