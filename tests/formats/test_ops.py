"""Shared GEMM primitives (``kcprnn._cpu.ops``): the blocked weight gradient of ``tall_linear``,
``linear_nt``, and their routing by the cost model."""

import pytest
import torch
import torch.nn.functional as F

from kcprnn._cpu import ops as _ops
from kcprnn._cpu.cost import CostModel
from kcprnn._cpu.ops import linear_nt, tall_linear, weight_grad

TALL_BLOCKS = CostModel().tall_blocks


def test_weight_grad_with_a_remainder_block():
    torch.manual_seed(0)
    rows = 64 * TALL_BLOCKS + 5  # blocked, plus 5 rows in the remainder
    g = torch.randn(rows, 3, dtype=torch.float64)
    x = torch.randn(rows, 7, dtype=torch.float64)
    torch.testing.assert_close(weight_grad(g, x), g.t() @ x, rtol=1e-12, atol=1e-12)
    small = slice(0, 10)  # below the blocking threshold: one plain GEMM
    torch.testing.assert_close(weight_grad(g[small], x[small]), g[small].t() @ x[small])


def test_tall_linear_gradients_match_linear():
    torch.manual_seed(1)
    x = torch.randn(64 * TALL_BLOCKS + 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    out = tall_linear(x, w)
    ref = F.linear(x, w)
    torch.testing.assert_close(out, ref)
    seed = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w), seed)
    want = torch.autograd.grad(ref, (x, w), seed)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # only the weight needs a gradient (the usual case: x is the data)
    (gw,) = torch.autograd.grad(tall_linear(x.detach(), w), (w,), seed)
    torch.testing.assert_close(gw, want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 256, 1024), (96, 1024, 256), (0, 8, 4), (3, 0, 5)])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_nt_matches_the_float64_product(shape, strided):
    # float32 (oneDNN where torch has it) against the product in float64
    torch.manual_seed(2)
    m, k, n = shape
    a = torch.randn(k, m).t() if strided else torch.randn(m, k)  # (m, k)
    b = torch.randn(k, n).t() if strided else torch.randn(n, k)  # (n, k)
    out = linear_nt(a, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), a.double() @ b.double().t(), rtol=1e-5, atol=1e-4)


def test_linear_nt_falls_back_to_mm(monkeypatch):
    torch.manual_seed(3)
    a, b = torch.randn(5, 7), torch.randn(4, 7)
    fast = linear_nt(a, b)
    monkeypatch.setattr(_ops, "_ONEDNN_LINEAR", None)  # a torch build without oneDNN
    torch.testing.assert_close(linear_nt(a, b), a @ b.t(), rtol=0, atol=0)
    torch.testing.assert_close(linear_nt(a, b), fast)
    a64 = a.double()  # float64 never goes to oneDNN
    torch.testing.assert_close(linear_nt(a64, b.double()), a64 @ b.double().t(), rtol=0, atol=0)


def test_linear_nt_keeps_autograd_when_a_gradient_is_needed():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(2, 4)
    (g,) = torch.autograd.grad(linear_nt(a, b).sum(), (a,))
    torch.testing.assert_close(g, b.sum(0).expand(3, 4))


@pytest.mark.parametrize("width", [20, 200])
def test_weight_grad_in_float32_matches_float64(width):
    torch.manual_seed(4)
    g = torch.randn(64 * TALL_BLOCKS + 7, 3)
    x = torch.randn(64 * TALL_BLOCKS + 7, width)
    ref = g.double().t() @ x.double()
    torch.testing.assert_close(weight_grad(g, x).double(), ref, rtol=1e-5, atol=1e-3)


def test_blocked_weight_grad_follows_the_cost_model(monkeypatch):
    """The blocking thresholds come from the model passed in: fewer rows than
    ``tall_min_rows`` is one GEMM, else ``tall_blocks`` partial products (spied on ``bmm``)."""
    torch.manual_seed(5)
    g = torch.randn(100, 3, dtype=torch.float64)
    x = torch.randn(100, 7, dtype=torch.float64)
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.shape[0]) or real(a, b))
    plain = _ops.blocked_weight_grad(g, x)  # default: 100 rows is below the threshold
    blocked = _ops.blocked_weight_grad(g, x, CostModel().replace(tall_min_rows=64, tall_blocks=8))
    assert calls == [8]
    torch.testing.assert_close(plain, g.t() @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked, g.t() @ x, rtol=1e-12, atol=1e-12)


def test_routing_never_builds_the_kernel(monkeypatch):
    """``native_covers`` (what planning asks) answers from the model alone."""
    from kcprnn._cpu import native

    monkeypatch.setattr(native, "_library", lambda: pytest.fail("planning built the kernel"))
    model = CostModel()
    assert _ops.native_covers(15360, 360, 2, model)
    assert not _ops.native_covers(15360, 360, 2, model.replace(kernels=False))
    assert not _ops.native_covers(15360, 360, model.native_max_out + 1, model)
    assert not _ops.native_covers(8, 8, 2, model)  # below native_min_size


@pytest.mark.parametrize(
    ("cpuinfo", "generic"),
    [
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512bw\n", True),
        ("vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512bw\n", False),
        ("vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n", False),
        ("vendor_id\t: HygonGenuine\nflags\t\t: fpu avx512f\n", True),
        ("", False),
    ],
)
def test_mkl_generic_path_is_read_from_vendor_and_flags(cpuinfo, generic):
    """oneDNN is planned for the large products only where MKL lacks its AVX-512 kernels: an
    AVX-512 CPU that is not Intel's (``avx512fma`` or a vendor named later do not count as
    Intel's)."""
    from kcprnn._cpu.cost import _mkl_generic_avx512

    assert _mkl_generic_avx512(cpuinfo) is generic


def test_gemm_price_follows_the_model():
    """MKL's price is the MACs; oneDNN's (where the model says it runs faster) adds its call,
    the copies of transposed operands and the page faults of blocks beyond glibc's heap, and
    the cheaper one is the price."""
    mkl_only = CostModel(onednn_gemm=1.0)
    fast = CostModel(onednn_gemm=0.5, onednn_call=1000.0, onednn_copy=2.0, fault=40.0)
    macs = 3200 * 700 * 1024  # the spike layer's input projection
    assert _ops.gemm_price(macs, (3200 * 1024,), 0, mkl_only) == macs
    assert _ops.gemm_price(macs, (3200 * 1024,), 0, fast) == macs * 0.5 + 1000.0
    copied = 3200 * 1724
    assert _ops.gemm_price(macs, (1,), copied, fast) == macs * 0.5 + 1000.0 + 2.0 * copied
    big = fast.rnn_torch_mmap + 1  # mapped fresh at every call
    assert _ops.gemm_price(1000 * big, (big,), 0, fast) == 500 * big + 1000.0 + 40.0 * big
    assert _ops.gemm_price(big, (big,), 0, fast) == big  # the faults outweigh the gain: MKL
    assert _ops.gemm_price(1500, (1,), 0, fast) == 1500  # the call outweighs it
    assert not _ops.onednn_gemm_wins(macs, (1,), 0, fast, torch.float64)
    assert _ops.onednn_gemm_wins(macs, (1,), 0, fast, torch.float32) is _ops.onednn_available()
    assert not _ops.onednn_gemm_wins(macs, (1,), 0, fast.replace(onednn=False), torch.float32)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls of oneDNN's product (skips where torch has none)."""
    if not _ops.onednn_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    real = _ops._ONEDNN_LINEAR

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(_ops, "_ONEDNN_LINEAR", counted)
    return calls


@pytest.mark.parametrize("gain", [1.0, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_input_projection_on_either_library_matches_linear(monkeypatch, onednn_calls, gain, bias):
    """A fused layer's input projection with the model sending its forward and weight gradient
    to MKL (``onednn_gemm`` 1) or to oneDNN (0.5, no call or copy cost): values and all three
    gradients against ``F.linear`` in float64, and oneDNN called for exactly the products the
    model sends there (the input's gradient always)."""
    from kcprnn.rnn import fused

    model = CostModel(onednn_gemm=gain, onednn_call=0.0, onednn_copy=0.0)
    monkeypatch.setattr(fused, "default_cost_model", lambda: model)
    torch.manual_seed(4)
    x = torch.randn(6, 5, 12, requires_grad=True)  # (t, b, i)
    w = torch.randn(32, 12, requires_grad=True)  # (g, i)
    b = torch.randn(32, requires_grad=True) if bias else None
    leaves = [x, w] + ([b] if bias else [])
    got = fused.input_projection(x, w, b)
    seed = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, seed)
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    want = F.linear(*x64) if bias else F.linear(x64[0], x64[1])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for g, w64 in zip(grads, torch.autograd.grad(want, x64, seed.double()), strict=True):
        torch.testing.assert_close(g.double(), w64, rtol=1e-5, atol=1e-4)
    # forward (x rows), the input's gradient (seed rows), the weight's (as (x.T @ seed).T)
    expected = [(30, 12), (30, 32), (12, 30)] if gain < 1 else [(30, 32)]
    assert onednn_calls == expected


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_recurrent_weight_grad_on_either_library(monkeypatch, onednn_calls, gain):
    """``W_hh``'s gradient over a sequence's rows, past ``recurrent_grad_mm_rows`` (``mm`` on
    the built-in model) unless oneDNN prices lower: the float64 product either way."""
    from kcprnn.rnn import _fused_base

    model = CostModel(onednn_gemm=gain, onednn_call=0.0, onednn_copy=0.0, recurrent_grad_mm_rows=0)
    monkeypatch.setattr(_fused_base, "default_cost_model", lambda: model)
    torch.manual_seed(5)
    grad, h_prev = torch.randn(96, 64), torch.randn(96, 16)
    got = _fused_base._recurrent_weight_grad(grad, h_prev)
    torch.testing.assert_close(
        got.double(), grad.double().t() @ h_prev.double(), rtol=1e-5, atol=1e-4
    )
    assert onednn_calls == ([(16, 96)] if gain < 1 else [])  # (h_prev.T @ grad).T


@pytest.mark.parametrize(("g", "f"), [(64, 16), (16, 64)])
def test_weight_grad_onednn_copies_the_narrower_operand(onednn_calls, g, f):
    """``grad.T @ x`` on oneDNN with the narrower operand as the inner product's source (the one
    oneDNN copies transposed): ``(x.T @ grad).T`` for fewer inputs than gate rows, else
    ``grad.T @ x``; the float64 product either way, contiguous."""
    model = CostModel(onednn_gemm=0.5, onednn_call=0.0, onednn_copy=0.0)
    torch.manual_seed(6)
    grad, x = torch.randn(96, g), torch.randn(96, f)
    got = _ops.weight_grad_onednn(grad, x, model)
    assert got is not None and got.is_contiguous() and got.shape == (g, f)
    torch.testing.assert_close(got.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-4)
    assert onednn_calls == [(min(g, f), 96)]
