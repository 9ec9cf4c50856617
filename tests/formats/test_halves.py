"""The dense reconstructions by halves (CP, Tucker, BT, HT: ``kcprnn.formats._halves``): the same
matrix and the same factor gradients as the format's own product applied to the identity, in
float64, and the multiply-accumulates the planners price, counted by hand."""

import pytest
import torch

import kcprnn
from kcprnn.formats._halves import join_halves, kron_rows

TOL = {"rtol": 1e-10, "atol": 1e-12}

CASES = [
    ("cp", (512, 2048), {"in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4], "rank": 4}),
    ("cp", (60, 84), {"num_modes": 3, "rank": 3}),
    ("cp", (24, 40), {"num_modes": 1, "rank": 2}),
    ("tucker", (512, 2048), {"in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4], "rank": 4}),
    ("tucker", (60, 84), {"num_modes": 3, "rank": [2, 3, 4]}),
    ("tucker", (24, 40), {"num_modes": 1, "rank": 5}),
    ("bt", (96, 30), {"num_modes": 2, "rank": [2, 3], "blocks": 3}),
    ("bt", (2 * 3 * 2 * 2 * 2, 3 * 2 * 2 * 2 * 2), {"num_modes": 5, "rank": 2, "blocks": 2}),
    ("ht", (512, 2048), {"in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4], "rank": 4}),
    ("ht", (60, 84), {"num_modes": 3, "rank": [2, 3, 2, 3]}),
    ("ht", (24, 40), {"num_modes": 2, "rank": 3}),
]


@pytest.mark.parametrize(("fmt", "shape", "options"), CASES)
def test_to_dense_by_halves_matches_the_product_with_gradients(fmt, shape, options):
    torch.manual_seed(0)
    w = kcprnn.formats.make_matrix(fmt, *shape, dtype=torch.float64, **options)
    eye = torch.eye(w.in_features, dtype=torch.float64)
    want = w(eye).T  # the factorized product: an independent code path
    got = w.to_dense()
    assert got.shape == (w.out_features, w.in_features) and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)
    probe = torch.randn_like(want)
    params = list(w.parameters())
    got_grads = torch.autograd.grad((got * probe).sum(), params)
    want_grads = torch.autograd.grad((w(eye).T * probe).sum(), params)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_reconstruction_macs_by_hand():
    # speech W_hh: in [8, 4, 4, 4], out [8, 8, 8, 4], merged (J_d I_d) = [64, 32, 32, 16];
    # halves of two modes each, joined over the rank: CP 4 (64 * 32) + 4 (32 * 16) + 4 * 2^20
    modes = {"in_modes": [8, 4, 4, 4], "out_modes": [8, 8, 8, 4]}
    cp = kcprnn.formats.make_matrix("cp", 512, 2048, rank=4, **modes)
    assert cp.reconstruction_macs() == 4 * 64 * 32 + 4 * 32 * 16 + 4 * 512 * 2048
    # Tucker rank 4: the modes applied last to first, each over one rank; mode 4 on the core
    # 4^3 * (16 * 4), mode 3: 4^2 * (32 * 4) * 16, mode 2: 4 * (32 * 4) * (32 * 16), then the
    # first factor over R_1 on the whole matrix: 4 * 2^20
    tucker = kcprnn.formats.make_matrix("tucker", 512, 2048, rank=4, **modes)
    want = 4**3 * 16 * 4 + 4**2 * 32 * 4 * 16 + 4 * 32 * 4 * 32 * 16 + 4 * 512 * 2048
    assert tucker.reconstruction_macs() == want
    bt = kcprnn.formats.make_matrix("bt", 512, 2048, rank=4, blocks=2, **modes)
    assert bt.reconstruction_macs() == 2 * want


def test_join_and_kron_rows_by_definition():
    torch.manual_seed(0)
    left = torch.randn(3, 2, 4, dtype=torch.float64)
    right = torch.randn(3, 5, 3, dtype=torch.float64)
    want = sum(torch.kron(left[s], right[s]) for s in range(3))
    torch.testing.assert_close(join_halves(left, right), want, **TOL)
    a = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    b = torch.randn(2, 2, 3, 1, dtype=torch.float64)
    got = kron_rows([a, b])  # (2, 6, 6, 4)
    for t in range(2):
        for s in range(3):
            for u in range(2):
                torch.testing.assert_close(got[t, 2 * s + u], torch.kron(a[t, s], b[t, u]))
