"""The compiled tall-skinny kernels (``kcprnn._cpu.native``): the product and the weight
gradient in both instruction sets against float64, strided inputs and outputs, threads, the build
cache, the fallbacks and their use by KCP."""

from __future__ import annotations

import itertools
import math
import os
import platform

import pytest
import torch

import kcprnn
from kcprnn._cpu import native as _native
from kcprnn._cpu import ops as _ops
from kcprnn._cpu.cost import CostModel
from kcprnn.formats.kcp import sequential as kcp_module
from kcprnn.formats.kcp.layout import inner_orders
from kcprnn.formats.kcp.walk import sequential_walk

DEFAULT = CostModel()

BUILDABLE = _native._compiler() is not None and platform.machine().lower() in ("x86_64", "amd64")
needs_build = pytest.mark.skipif(not BUILDABLE, reason="needs a C++ compiler on x86-64")
AVX512 = "avx512f" in _native._cpu_signature()

ISAS = {  # -march for each instruction set the source has a path for
    256: "-march=x86-64-v3",  # AVX2 + FMA: runs on this CPU too
    512: "-march=native",
}


def _flags(march: str) -> tuple[str, ...]:
    return tuple(march if f == "-march=native" else f for f in _native.FLAGS)


@pytest.fixture(scope="module", params=sorted(ISAS))
def lib(request, tmp_path_factory):
    if not BUILDABLE:
        pytest.skip("needs a C++ compiler on x86-64")
    if request.param == 512 and not AVX512:
        pytest.skip("this CPU has no AVX-512")
    path = _native.build(_flags(ISAS[request.param]), tmp_path_factory.mktemp("kernels"))
    library = _native.load(path)
    assert library.kcprnn_tall_isa() == request.param
    return library


@pytest.fixture
def use(lib, monkeypatch):
    """Make ``lib`` the process's kernel for one test."""
    monkeypatch.setattr(_native, "_state", {"lib": lib, "path": "test"})
    return lib


def record_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` for one test; returns the list of its results, one per call."""
    real = getattr(module, name)
    results: list = []

    def wrapper(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


SHAPES = [  # (B, E, f, g): tails of both vector widths, odd g, blocks of 8 rows crossing B
    (1, 1, 1, 1),
    (1, 7, 5, 2),
    (2, 9, 16, 3),
    (3, 5, 17, 4),
    (4, 3, 8, 5),
    (2, 40, 33, 7),
    (5, 13, 360, 2),
    (1, 100, 31, 8),
    (3, 1, 100, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_the_float64_product_with_strides(use, shape):
    n_b, n_e, f, g = shape
    x = torch.randn(n_b, n_e + 2, f + 3)[:, 1 : n_e + 1, 2 : f + 2]  # (B, E, f): strided rows
    w = torch.randn(f, g).t()  # (g, f), not contiguous
    ref = torch.einsum("bek,gk->beg", x.double(), w.double())  # (B, E, g)
    out = torch.full((n_b, n_e, g), float("nan"))
    _native.tall_matmul(x, w, out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * f**0.5)
    # the transposed layout (B, g, E), written through strides
    out_t = torch.full((n_b, g, n_e), float("nan"))
    _native.tall_matmul(x, w, out_t.transpose(1, 2))
    torch.testing.assert_close(out_t.transpose(1, 2).double(), ref, rtol=1e-5, atol=1e-5 * f**0.5)


GRAD_SHAPES = [  # (m, f, g): vector tails, chunks of 4 vectors and single ones, tiles of 64 rows
    (1, 1, 1),
    (3, 5, 2),
    (7, 16, 3),
    (65, 17, 4),
    (130, 100, 5),
    (200, 360, 2),
    (64, 64, 8),
]


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_weight_grad_kernel_matches_the_float64_product(use, shape):
    m, f, g = shape
    x = torch.randn(m, f + 3)[:, 1 : f + 1]  # (m, f): strided rows
    grad = torch.randn(g, m).t()  # (m, g): column-major
    ref = grad.double().t() @ x.double()  # (g, f)
    out = _native.tall_weight_grad(grad, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * m**0.5)


def test_weight_grad_rejects_mismatched_rows(use):
    with pytest.raises(ValueError, match=r"grad \(4, 2\), x \(5, 3\)"):
        _native.tall_weight_grad(torch.randn(4, 2), torch.randn(5, 3))


def test_weight_grad_uses_the_kernel_where_it_fits(use, monkeypatch):
    calls = record_calls(monkeypatch, _native, "tall_weight_grad")
    x = torch.randn(4096, 90)
    grad = torch.randn(4096, 3)
    ref = grad.double().t() @ x.double()
    torch.testing.assert_close(_ops.weight_grad(grad, x).double(), ref, rtol=1e-5, atol=1e-3)
    assert len(calls) == 1
    _ops.weight_grad(grad.double(), x.double())  # float64: blocked products
    _ops.weight_grad(torch.randn(4096, 16), x)  # too many outputs
    _ops.weight_grad(grad, x, DEFAULT.replace(kernels=False))  # not planned for
    assert len(calls) == 1


def test_kernel_follows_torch_threads(use):
    x = torch.randn(1, 4096, 40)
    w = torch.randn(3, 40)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_native.tall_matmul(x, w, torch.empty(1, 4096, 3)))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # rows never split a sum
    torch.testing.assert_close(outs[0], x @ w.t(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(4096, 3)
    ref = grad.double().t() @ x[0].double()
    try:
        for n in (1, 2, 3):  # one partial sum per thread
            torch.set_num_threads(n)
            out = _native.tall_weight_grad(grad, x[0])
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


def test_tall_matmul_rejects_mismatched_shapes(use):
    with pytest.raises(ValueError, match=r"out \(2, 3, 5\)"):
        _native.tall_matmul(torch.randn(2, 3, 4), torch.randn(4, 4), torch.empty(2, 3, 5))


def test_tall_forward_uses_the_kernel_where_it_fits(use, monkeypatch):
    calls = record_calls(monkeypatch, _native, "tall_matmul")
    x = torch.randn(4096, 360)
    w = torch.randn(2, 360)
    torch.testing.assert_close(_ops._tall_forward(x, w, DEFAULT), x @ w.t(), rtol=1e-5, atol=1e-4)
    assert len(calls) == 1
    # too many outputs, float64, too small: torch's products
    _ops._tall_forward(x, torch.randn(DEFAULT.native_max_out + 1, 360), DEFAULT)
    _ops._tall_forward(x.double(), w.double(), DEFAULT)
    _ops._tall_forward(x[:8], w, DEFAULT)
    _ops._tall_forward(x, w, DEFAULT.replace(kernels=False))  # not planned for: MKL
    assert len(calls) == 1
    # with a gradient, the autograd Function's forward runs on it, its backward on torch
    w.requires_grad_()
    seed = torch.randn(4096, 2)
    (grad,) = torch.autograd.grad(_ops.tall_linear(x, w), (w,), seed)
    assert len(calls) == 2
    torch.testing.assert_close(grad, seed.t() @ x, rtol=1e-4, atol=1e-3)


def test_kcp_with_and_without_the_kernel(use, monkeypatch):
    """Blocked KCP runs its first GEMM on the kernel, written transposed for the next step's
    swap, in inference and inside the one-node training forward; results and gradients match
    torch's path and the dense reconstruction."""
    layer = kcprnn.FactorizedLinear(
        7200,
        256,
        format="kcp",
        in_modes=[[8, 1], [10, 1], [1, 10], [1, 9]],
        out_modes=[[4, 2], [4, 1], [4, 1], [2, 1]],
        rank=2,
        algorithm="sequential",
    )
    x = torch.randn(12, 7200)
    seed = torch.randn(12, 256)
    transposed = record_calls(monkeypatch, kcp_module, "tall_forward_transposed")

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            out = layer(x)
        grads = torch.autograd.grad(layer(x), list(layer.parameters()), seed)
        return out, list(grads)

    fast, fast_grads = run()
    assert len(transposed) == 2  # inference and training forward
    assert all(t is not None for t in transposed)
    layer.weight.cost_model = DEFAULT.replace(kernels=False)  # torch's products
    transposed.clear()
    slow, slow_grads = run()
    assert len(transposed) == 2 and all(t is None for t in transposed)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ref = torch.nn.functional.linear(x.double(), layer.to_dense().double(), layer.bias.double())
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-4)


GATHER_CASES = [  # (shape, perm): runs of 6 (UCF11 interleaved), 1, over a vector, size-1 axes
    ((3, 2, 4, 4, 5, 3, 6), (0, 1, 3, 5, 2, 4, 6)),
    ((2, 5, 7), (0, 2, 1)),
    ((4, 3, 37), (0, 1, 2)),
    ((2, 3, 1, 20, 5), (0, 3, 2, 1, 4)),
    ((1, 17), (0, 1)),
    ((2, 2, 3, 2, 3, 2, 3), (0, 6, 5, 4, 3, 2, 1)),
    ((3, 4, 1, 1), (0, 3, 1, 2)),
]


@pytest.mark.parametrize("case", GATHER_CASES)
def test_gather_copies_any_permuted_view(use, case):
    shape, perm = case
    base = torch.randn(shape[0] + 1, *[n + 1 for n in shape[1:]])
    x = base[(slice(1, None), *[slice(0, n) for n in shape[1:]])]  # strided rows
    view = x.permute(*perm)
    out = torch.full(view.shape, float("nan"))
    _native.gather(view, out)
    assert torch.equal(out, view.contiguous())


def test_gather_rejects_mismatched_shapes(use):
    with pytest.raises(ValueError, match=r"out \(2, 4, 3\)"):
        _native.gather(torch.randn(2, 3, 4), torch.empty(2, 4, 3))
    with pytest.raises(ValueError, match="contiguous: False"):
        _native.gather(torch.randn(2, 3, 4), torch.empty(2, 4, 3).transpose(1, 2))


INNER_SHAPES = [  # (B, E, a, c, k, o, m): tails of o (tiles of 4) and of m (vectors, tiles)
    (1, 1, 1, 1, 1, 1, 1),
    (2, 3, 8, 20, 4, 4, 128),
    (3, 2, 3, 5, 2, 3, 17),
    (1, 4, 2, 7, 3, 5, 70),
    (2, 1, 4, 3, 1, 16, 9),
    (1, 2, 5, 2, 2, 6, 33),
]


@pytest.mark.parametrize("shape", INNER_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_inner_kernel_matches_the_float64_product(use, shape, layout):
    """``inner_rows``: step 1 ``u = z[a, :] . s[k, o, :]``, step 2 ``y[o, m] = sum_(a, k)
    p[m, a k] u[a, k, o]``, plus the bias, written through offset tables; a random
    permutation of the outputs (scattered: element by element) or the plain layout (vectors)."""
    n_b, n_e, a, c, k, o, m = shape
    width = _native.width()
    z = torch.randn(n_b, n_e + 1, a * c + 2)[:, 1:, 1 : a * c + 1]  # (B, E, a c): strided rows
    suffix = torch.randn(k, o, c)
    prefix = torch.randn(m, a * k)
    bias = torch.randn(n_e * o * m)
    u = torch.einsum("beac,koc->beako", z.double().reshape(n_b, n_e, a, c), suffix.double())
    y = torch.einsum("mq,beqo->beom", prefix.double(), u.reshape(n_b, n_e, a * k, o))
    flat = torch.arange(n_e * o * m).view(n_e, o, m)  # (e, o, m): the plain layout
    if layout == "scattered":  # the axes in the order (m, o, e): m varies slowest
        flat = torch.arange(n_e * o * m).view(m, o, n_e).permute(2, 1, 0)
    off = (flat[:, 0, 0], flat[0, :, 0], flat[0, 0, :])
    lane = torch.arange(m) % width
    runs = bool(torch.equal(off[2] - off[2][torch.arange(m) - lane], lane))
    assert runs == (layout == "contiguous" or m == 1 or n_e * o == 1)
    st = suffix.permute(2, 0, 1).reshape(c, k * o).contiguous()  # (c, k o)
    pt = prefix.t().contiguous()  # (a k, m)
    for b in (None, bias):
        out = torch.full((n_b, n_e * o * m), float("nan"))
        _native.inner_rows(z, st, k, pt, out, off, runs, b)
        ref = torch.empty(n_b, n_e * o * m, dtype=torch.float64)
        ref[:, flat.reshape(-1)] = (y + (0 if b is None else b.double()[flat])).reshape(n_b, -1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_inner_rows_rejects_mismatched_shapes(use):
    offsets = (
        torch.zeros(2, dtype=torch.long),
        torch.zeros(3, dtype=torch.long),
        torch.zeros(5, dtype=torch.long),
    )
    with pytest.raises(ValueError, match=r"prefix_t \(7, 5\)"):
        _native.inner_rows(
            torch.randn(1, 2, 12),
            torch.randn(4, 6),
            2,
            torch.randn(7, 5),
            torch.empty(1, 30),
            offsets,
            True,
        )


@pytest.mark.parametrize(
    "modes",
    [
        # blocked UCF11 shape, scaled down: a narrow suffix, contiguous vectors of outputs
        ([[8, 1], [10, 1], [1, 10], [1, 9]], [[4, 2], [4, 1], [4, 1], [2, 1]]),
        # outputs interleaved element by element (scattered offsets)
        ([[2, 1], [3, 1], [1, 5], [1, 4]], [[2, 2], [3, 2], [1, 1], [2, 1]]),
        # a wide suffix (o >= 16): the torch path lays rows out (e, m, o)
        ([[2, 1], [16, 1], [1, 30]], [[2, 2], [16, 1], [2, 1]]),
    ],
)
def test_kcp_inner_product_with_and_without_the_kernel(use, monkeypatch, modes):
    """The sequential walk's last step, the last factor's CP product, runs on the kernel with
    the final reordering and the bias under no_grad and inference_mode, for every order, cut
    and mode order, matching torch's path and the dense product; training keeps torch's path."""
    in_modes, out_modes = modes
    fin = math.prod(a * b for a, b in in_modes)
    fout = math.prod(a * b for a, b in out_modes)
    torch.manual_seed(0)
    layer = kcprnn.FactorizedLinear(
        fin, fout, format="kcp", in_modes=in_modes, out_modes=out_modes, rank=3
    )
    w = layer.weight
    factors = [list(f) for f in w.factors]
    x = torch.randn(5, fin)
    ref = torch.nn.functional.linear(x.double(), layer.to_dense().double(), layer.bias.double())
    used = record_calls(monkeypatch, kcp_module, "_inner_native")
    runs = 0
    for order in itertools.permutations(range(2)):
        steps, _, _ = sequential_walk(w.in_splits, w.out_splits, 1, order, DEFAULT)
        if steps[-1].post != 1:
            continue
        ins = [w.in_splits[d][order[-1]] for d in range(len(in_modes))]
        for inner_order, split in inner_orders(ins):
            if split == 0:
                continue

            def run(bias=None, order=order, split=split, inner_order=inner_order, model=DEFAULT):
                return kcp_module.kcp_linear_sequential(
                    x, factors, order, split, bias=bias, inner_order=inner_order, cost_model=model
                )

            with torch.no_grad():
                fast = run(layer.bias)
                fast_nobias = run()
            with torch.inference_mode():
                fast_inf = run(layer.bias)
            assert len(used) == 3 and all(u is not None for u in used)
            used.clear()
            run(layer.bias).sum().backward()  # training: torch's path
            assert not used
            with torch.no_grad():  # kernels not planned for: torch's path
                slow = run(layer.bias, model=DEFAULT.replace(kernels=False))
            assert len(used) == 1 and used[0] is None
            used.clear()
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast_inf, slow, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast_nobias + layer.bias, slow, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast.double(), ref, rtol=1e-4, atol=1e-4)
            runs += 1
    assert runs >= 2


@needs_build
def test_build_is_cached_and_atomic(tmp_path):
    flags = _flags(ISAS[256])
    path = _native.build(flags, tmp_path)
    stamp = path.stat().st_mtime_ns
    assert _native.build(flags, tmp_path) == path
    assert path.stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    other = _native.build((*flags, "-DKCPRNN_TEST_VARIANT"), tmp_path)
    assert other != path  # the flags are part of the key


@needs_build
def test_build_failure_names_the_compiler_error(tmp_path):
    with pytest.raises(RuntimeError, match="no-such-option"):
        _native.build((*_native.FLAGS, "-fno-such-option"), tmp_path)
    assert os.listdir(tmp_path) == []


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("KCPRNN_NATIVE", "0")
    assert not _native.available()
    assert _native.info() == {"available": False, "error": "disabled by KCPRNN_NATIVE=0"}
    x = torch.randn(4096, 360)
    w = torch.randn(2, 360)
    assert not _ops.native_fits(x, w)
    torch.testing.assert_close(_ops._tall_forward(x, w, DEFAULT), x @ w.t(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="KCPRNN_NATIVE=0"):
        _native.tall_matmul(x[None], w, torch.empty(1, 4096, 2))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(tmp_path / "k"))
    assert _native.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KCPRNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _native.cache_dir() == tmp_path / "kcprnn"
