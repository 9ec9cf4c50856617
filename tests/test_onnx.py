"""``torch.onnx.export(..., dynamo=True)`` of FactorizedLinear, LSTM, GRU and RNN in every
format: onnxruntime reproduces eager within 1e-4, and the file stores the factors (its size
follows the compression, not the dense matrix).

Skipped where onnx, onnxscript or onnxruntime are missing (the ``deploy`` extra).
"""

import logging
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kcprnn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# the exporter's own deprecation notices and its optional-dependency warnings
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

FORMAT_OPTIONS = {
    "dense": {},
    "kcp": {"rank": [2, 3], "terms": 2, "num_factors": 2},
    "cp": {"rank": 3},
    "tucker": {"rank": 2},
    "tt": {"rank": 3},
    "tr": {"rank": 2},
    "bt": {"rank": 2, "blocks": 2},
    "ht": {"rank": 2},
}
INPUT, HIDDEN, OUT = 24, 8, 16


class Every(nn.Module):
    """In every format: FactorizedLinear, an LSTM (batch-first; bidirectional with 2 layers for
    KCP), a GRU and a tanh RNN (time-major) on one input; the outputs in a fixed order."""

    def __init__(self) -> None:
        super().__init__()
        parts = {}
        for f, opts in sorted(FORMAT_OPTIONS.items()):
            parts[f] = nn.ModuleList(
                [
                    kcprnn.FactorizedLinear(INPUT, OUT, format=f, **opts),
                    kcprnn.LSTM(
                        INPUT,
                        HIDDEN,
                        2 if f == "kcp" else 1,
                        batch_first=True,
                        bidirectional=f == "kcp",
                        format=f,
                        **opts,
                    ),
                    kcprnn.GRU(INPUT, HIDDEN, format=f, **opts),
                    kcprnn.RNN(INPUT, HIDDEN, format=f, **opts),
                ]
            )
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for linear, lstm, gru, rnn in self.parts.values():  # type: ignore[misc]
            out.append(linear(x))
            y, (h, c) = lstm(x)
            out += [y, h, c]
            for m in (gru, rnn):
                y, h = m(x.transpose(0, 1))
                out += [y, h]
        return out


def export(model: nn.Module, x: torch.Tensor, path) -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert program is not None
    program.save(str(path))


def run(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def test_every_format_and_module_matches_onnxruntime(tmp_path):
    model = Every().eval()
    x = torch.randn(3, 4, INPUT)
    path = tmp_path / "every.onnx"
    export(model, x, path)
    with torch.no_grad():
        ref = model(x)
    got = run(path, x)
    kinds = ("linear", "lstm out", "lstm h", "lstm c", "gru out", "gru h", "rnn out", "rnn h")
    names = [f"{f} {k}" for f in sorted(FORMAT_OPTIONS) for k in kinds]
    assert len(got) == len(ref) == len(names)
    for name, a, b in zip(names, got, ref, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
    # the model's input is an input of the graph, not a constant: another batch runs too
    x2 = torch.randn(3, 4, INPUT)
    with torch.no_grad():
        ref2 = model(x2)
    for a, b in zip(run(path, x2), ref2, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


def test_file_stores_the_factors_not_the_dense_matrix(tmp_path):
    """A KCP LSTM's file is about the size of its parameters (the dense ``W_hh`` and the
    factors), far below the same LSTM with a dense ``W_ih``."""
    x = torch.randn(2, 3, 4096)
    sizes = {}
    for f, opts in (("kcp", {"rank": 2}), ("dense", {})):
        model = kcprnn.LSTM(4096, 64, batch_first=True, format=f, **opts).eval()
        path = tmp_path / f"{f}.onnx"
        export(model, x, path)
        sizes[f] = os.path.getsize(path)
        stored = sum(p.numel() for p in model.parameters()) * 4
        assert stored <= sizes[f] < stored + 200_000, (f, sizes[f], stored)
        initializers = onnx.load(str(path)).graph.initializer
        assert max(int(np.prod(t.dims)) for t in initializers) < 4096 * 256 or f == "dense"
        got = run(path, x)
        with torch.no_grad():
            ref = torch.utils._pytree.tree_leaves(model(x))
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    assert sizes["kcp"] * 10 < sizes["dense"]


class Recurrent(nn.Module):
    """A bidirectional 2-layer KCP LSTM, a TT GRU and a ReLU RNN with a KCP recurrent matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = kcprnn.LSTM(INPUT, HIDDEN, 2, batch_first=True, bidirectional=True)
        self.gru = kcprnn.GRU(INPUT, HIDDEN, batch_first=True, format="tt", rank=2)
        self.rnn = kcprnn.RNN(
            INPUT, HIDDEN, nonlinearity="relu", batch_first=True, hidden_format="kcp"
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y, (h, c) = self.lstm(x)
        out = [y, h, c]
        for m in (self.gru, self.rnn):
            y, h = m(x)
            out += [y, h]
        return out


def test_sequence_length_is_dynamic(tmp_path):
    """Exported with a symbolic length, the recurrences are ONNX ``Scan`` loops: one file runs
    any number of steps (the batch size stays the example's)."""
    model = Recurrent().eval()
    path = tmp_path / "dynamic.onnx"
    steps = torch.export.Dim("steps", min=2)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(3, 5, INPUT),),
            dynamo=True,
            verbose=False,
            dynamic_shapes=({1: steps},),
        )
    assert program is not None
    program.save(str(path))
    assert "Scan" in {node.op_type for node in onnx.load(str(path)).graph.node}
    for shape in ((3, 5), (3, 9), (3, 2)):
        x = torch.randn(*shape, INPUT)
        with torch.no_grad():
            ref = model(x)
        for a, b in zip(run(path, x), ref, strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4, err_msg=str(shape))
