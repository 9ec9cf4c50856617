"""Values the layers build from their weights (the dense ``W_ih`` of a dense input product, the
factor matrices of a Kronecker-sum ``W_hh``, a rebuilt dense ``W_hh``) are kept between calls
without gradients and rebuilt when a parameter changes: in place, through ``load_state_dict`` or
by replacing ``.data``. Checked against the same module's output under autograd, which always
rebuilds, and against a fresh copy of the module."""

from __future__ import annotations

import copy

import pytest
import torch

import kcprnn

CASES = [
    ("LSTM", "kcp", "kcp"),  # structured W_hh: kept factor matrices
    ("GRU", "dense", "kcp"),  # dense W_ih product: kept W_ih
    ("LSTM", "dense", "tt"),  # W_hh rebuilt dense, fused loop or torch's kernel
    ("RNN", "cp", "cp"),
]


def _model(mode: str, fmt: str, hidden_fmt: str) -> torch.nn.Module:
    torch.manual_seed(3)
    cls = getattr(kcprnn, mode)
    return cls(12, 16, format=fmt, hidden_format=hidden_fmt, bidirectional=True)


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[0]


@pytest.mark.parametrize("mode,fmt,hidden_fmt", CASES)
def test_kept_values_follow_every_kind_of_change(mode: str, fmt: str, hidden_fmt: str) -> None:
    model = _model(mode, fmt, hidden_fmt)
    x = torch.randn(7, 3, 12)
    with torch.no_grad():
        first = _out(model, x)
        torch.testing.assert_close(_out(model, x), first)  # kept: the same result again
    torch.testing.assert_close(_out(model, x).detach(), first)  # autograd rebuilds: agrees

    # in place
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
        changed = _out(model, x)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, _out(copy.deepcopy(model), x).detach())

    # load_state_dict (copies into the existing tensors)
    other = _model(mode, fmt, hidden_fmt)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.load_state_dict(other.state_dict())
        loaded = _out(model, x)
        torch.testing.assert_close(loaded, _out(other, x))
    assert not torch.allclose(loaded, changed)

    # a replaced .data
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.flip(-1).clone()
        swapped = _out(model, x)
        torch.testing.assert_close(swapped, _out(copy.deepcopy(model), x))
    assert not torch.allclose(swapped, loaded)


def test_kept_values_never_leak_into_autograd() -> None:
    model = _model("LSTM", "kcp", "kcp")
    x = torch.randn(5, 2, 12)
    with torch.no_grad():
        model(x)  # fills the kept values
    out = _out(model, x)
    assert out.requires_grad
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell"])
def test_repeated_cell_steps_follow_every_change(mode: str) -> None:
    """A cell stepping without gradients repeats its last dense step's weights while nothing
    changed; every change (in place, replaced ``.data``, a new algorithm, another batch size
    or dtype, gradients on) is seen at the next step. Checked against ``torch.nn``'s cell on
    the rebuilt weights."""
    torch.manual_seed(5)
    cell = getattr(kcprnn, mode)(6, 8, format="tt", hidden_format="tt", rank=2)
    ref = getattr(torch.nn, mode)(6, 8)

    def expected(x, hx):
        with torch.no_grad():
            ref.weight_ih.copy_(cell.weight_ih.to_dense())
            ref.weight_hh.copy_(cell.weight_hh.to_dense())
            ref.bias_ih.copy_(cell.bias_ih)
            ref.bias_hh.copy_(cell.bias_hh)
            return ref(x, hx)

    def state(b, dtype=torch.float32):
        h = torch.randn(b, 8, dtype=dtype)
        return (h, torch.randn(b, 8, dtype=dtype)) if mode == "LSTMCell" else h

    x, hx = torch.randn(3, 6), state(3)
    with torch.no_grad():
        first = cell(x, hx)
        assert cell._repeat is not None  # the dense step, remembered
        torch.testing.assert_close(cell(x, hx), first)
        torch.testing.assert_close(first, expected(x, hx))
        next(cell.weight_hh.parameters()).mul_(0.5)  # in place
        torch.testing.assert_close(cell(x, hx), expected(x, hx))
        cell.bias_ih.data = cell.bias_ih.data + 1.0  # replaced .data
        torch.testing.assert_close(cell(x, hx), expected(x, hx))
        x2, hx2 = torch.randn(5, 6), state(5)  # another batch size
        torch.testing.assert_close(cell(x2, hx2), expected(x2, hx2))
        cell.weight_ih.algorithm = "dense"  # another algorithm: planned afresh
        torch.testing.assert_close(cell(x2, hx2), expected(x2, hx2))
    out = cell(x, hx)  # gradients on: rebuilt under autograd
    grads = out[0] if mode == "LSTMCell" else out
    grads.sum().backward()
    assert all(p.grad is not None for p in cell.weight_hh.parameters())
    cell.double()
    ref.double()
    x64, hx64 = x.double(), state(3, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cell(x64, hx64), expected(x64, hx64))
        with pytest.raises(ValueError, match="input_size"):
            cell(torch.randn(3, 7, dtype=torch.float64), hx64)  # still checked after a repeat
