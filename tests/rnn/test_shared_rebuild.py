"""A KCP or CP matrix rebuilt dense (:func:`kcprnn.rnn.kron.rebuild`) against the format's own
reconstruction."""

from __future__ import annotations

import pytest
import torch

import kcprnn
from kcprnn.formats.kcp import kcp_to_dense
from kcprnn.rnn import kron
from kcprnn.rnn.kron import rebuild

TOL = {"rtol": 1e-10, "atol": 1e-10}

MATRICES = [
    ("kcp", 40, 96, {"rank": 3}),
    ("kcp", 48, 96, {"rank": [2, 3], "terms": 2}),
    ("kcp", 48, 96, {"rank": 2, "terms": 2, "num_factors": 3}),
    ("kcp", 64, 256, {"rank": 2, "num_factors": 4}),
    ("kcp", 48, 96, {"rank": 2, "num_factors": 1, "terms": 2}),
    ("kcp", 160, 96, {"in_modes": [[2, 4], [4, 5]], "out_modes": [[4, 4], [2, 3]], "terms": 3}),
    ("kcp", 160, 96, {"in_modes": [[8, 1], [1, 20]], "out_modes": [[4, 2], [1, 12]]}),
    ("cp", 24, 40, {"rank": 3}),
]


def _matrix(fmt, n_in, n_out, options):
    torch.manual_seed(0)
    w = kcprnn.formats.make_matrix(fmt, n_in, n_out, dtype=torch.float64, **options)
    with torch.no_grad():
        for p in w.parameters():
            p.normal_()  # no zero factors or terms: every entry and gradient is checked
    return w


def _reference(w):
    if w.format_name == "kcp":
        return kcp_to_dense(w._factor_list())
    return w.to_dense()


@pytest.mark.parametrize("limit", [kron.REBUILD_GATHER_LIMIT, 0], ids=["gather", "permute"])
@pytest.mark.parametrize(("fmt", "n_in", "n_out", "options"), MATRICES)
def test_rebuild_matches_the_formats_reconstruction(fmt, n_in, n_out, options, limit, monkeypatch):
    monkeypatch.setattr(kron, "REBUILD_GATHER_LIMIT", limit)
    w = _matrix(fmt, n_in, n_out, options)
    got, want = rebuild(w), _reference(w)
    assert got.shape == (n_out, n_in)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn(n_out, n_in, dtype=torch.float64)
    params = list(w.parameters())
    for a, b in zip(
        torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, **TOL)


class _Rebuild(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self):
        return rebuild(self.w)


@pytest.mark.parametrize("limit", [kron.REBUILD_GATHER_LIMIT, 0], ids=["gather", "permute"])
def test_rebuild_gradcheck(limit, monkeypatch):
    monkeypatch.setattr(kron, "REBUILD_GATHER_LIMIT", limit)
    module = _Rebuild(_matrix("kcp", 12, 16, {"rank": 2, "terms": 2}))
    names = [n for n, _ in module.named_parameters()]

    def pure(*values):
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), ())

    inputs = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(pure, inputs)
