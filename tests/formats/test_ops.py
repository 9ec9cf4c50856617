"""Shared GEMM primitives: the blocked weight gradient of ``tall_linear``."""

import torch
import torch.nn.functional as F

from kcprnn.formats._ops import TALL_BLOCKS, tall_linear, weight_grad


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
