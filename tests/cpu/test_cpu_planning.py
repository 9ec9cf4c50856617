"""The cost model as the formats see it: planning and counting never build the compiled
kernels and do not depend on whether they can be built; a kernel that cannot be built (no
compiler, a compiler past its timeout, ``KCPRNN_NATIVE=0``) leaves the same plan running on
torch ops; the model a module plans with follows its device and dtype and the environment."""

from __future__ import annotations

import logging
import os
import platform
import stat

import pytest
import torch

from kcprnn import cli
from kcprnn._cpu import cost, native
from kcprnn._cpu.cost import CostModel, default_cost_model
from kcprnn.formats.kcp import KCPMatrix, kcp_plan
from kcprnn.formats.kcp.layout import GatherMode
from kcprnn.formats.kcp.walk import sequential_walk

UCF_IN, UCF_OUT = ((2, 4), (4, 5), (4, 5), (3, 6)), ((4, 4), (2, 2), (2, 2), (2, 2))
BIG_IN = ((4, 4), (4, 5), (4, 5), (6, 6))
SMALL_IN, SMALL_OUT = ((2, 3), (3, 2), (2, 2)), ((2, 1), (1, 2), (2, 2))  # interleaved, 144
X86 = platform.machine().lower() in ("x86_64", "amd64")


def ucf11(rank: int = 4, **kw) -> KCPMatrix:
    return KCPMatrix(57600, 1024, in_modes=UCF_IN, out_modes=UCF_OUT, rank=rank, **kw)


def counts(w: KCPMatrix) -> list:
    return [
        w.num_params,
        *[w.macs(rows, training=t) for rows in (1, 16, 96, 1024) for t in (False, True)],
        *[w.matmul_macs(rows, training=t) for rows in (1, 96) for t in (False, True)],
        *[w.plan(rows) for rows in (1, 96, 1024)],
    ]


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything builds or loads the compiled kernels."""
    calls: list[str] = []
    monkeypatch.setattr(native, "build", lambda *a, **k: calls.append("build"))
    monkeypatch.setattr(native, "_library", lambda: calls.append("library"))
    return calls


@pytest.mark.parametrize("state", ["unbuildable", "disabled", "built"])
def test_counting_and_planning_never_build_the_kernels(state, monkeypatch, no_build):
    """MAC counts, parameter counts and plans are the same whether the kernels are built, can
    not be built, or are disabled by ``KCPRNN_NATIVE=0``, and asking for them builds nothing."""
    reference = counts(ucf11())  # (spies installed: the reference built nothing either)
    if state == "disabled":
        monkeypatch.setenv("KCPRNN_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {} if state != "unbuildable" else {"lib": None})
    assert counts(ucf11()) == reference
    assert no_build == []


def test_an_unbuildable_kernel_runs_the_same_plan_on_torch(monkeypatch):
    """The float32 plan of an interleaved layout gathers with the compiled kernel; with no
    kernel the same plan (same MACs) runs on torch ops and gives the dense product."""
    torch.manual_seed(0)
    w = KCPMatrix(144, 16, in_modes=SMALL_IN, out_modes=SMALL_OUT, rank=3, algorithm="sequential")
    model = w.planning_model().replace(swap=1e12, permute=1e12, narrow_penalty=1e12)
    w.cost_model = model
    x = torch.randn(5, 144)
    ref = x.double() @ w.to_dense().double().T
    with torch.no_grad():
        plan = w.plan(5)
        steps = sequential_walk(w.in_splits, w.out_splits, 1, plan.order, model).steps
        assert GatherMode.NATIVE in {s.gather for s in steps}
        macs = w.matmul_macs(5)
        monkeypatch.setattr(native, "_state", {"lib": None, "error": "no compiler (test)"})
        gathered = []
        monkeypatch.setattr(native, "gather", lambda *a: gathered.append(1))
        assert w.plan(5) == plan and w.matmul_macs(5) == macs
        y = w(x)
    assert gathered == []
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not X86, reason="the kernels are for x86-64")
def test_a_compiler_past_its_timeout_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    slow = tmp_path / "slow-c++"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(slow))
    monkeypatch.setenv("KCPRNN_BUILD_TIMEOUT", "0.2")
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.INFO, logger="kcprnn"):
        assert not native.available()
        assert not native.available()  # decided once per process
    info = native.info()
    assert info["available"] is False and "0.2 s build timeout" in str(info["error"])
    records = [r for r in caplog.records if r.name == "kcprnn"]
    assert len(records) == 1 and "torch ops" in records[0].getMessage()
    x, weight = torch.randn(4096, 360), torch.randn(2, 360)
    from kcprnn._cpu import ops

    torch.testing.assert_close(ops._tall_forward(x, weight, CostModel()), x @ weight.t())
    assert cli.main(["build"]) == 1


def test_build_command_reports_failure(monkeypatch, capsys):
    monkeypatch.setenv("KCPRNN_NATIVE", "0")
    assert cli.main(["build"]) == 1
    assert "KCPRNN_NATIVE=0" in capsys.readouterr().err


@pytest.mark.skipif(not X86 or native._compiler() is None, reason="needs a C++ compiler")
def test_build_command_builds_and_prints_the_library(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(tmp_path))
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    (built,) = os.listdir(tmp_path)
    assert out.startswith(str(tmp_path / built)) and "-bit vectors" in out


def test_float64_and_cuda_modules_plan_without_the_cpu_kernels():
    """A float64 (or non-CPU) module is priced without the float32 CPU kernel and oneDNN
    savings: it plans with ``for_device``'s model, not the float32 CPU one."""
    fast, slow = CostModel(), CostModel().replace(kernels=False, onednn=False)
    w32, w64 = ucf11(), ucf11(dtype=torch.float64)
    assert w32.planning_model() is fast or w32.planning_model() == fast
    assert w64.planning_model() == slow
    assert fast.for_device("cuda", torch.float32) == slow
    assert fast.for_device(torch.device("cpu"), torch.float16) == slow
    for rows in (1, 96):
        for training in (False, True):
            args = (rows, UCF_IN, UCF_OUT, (4, 4), 1, "auto", training, not training)
            assert w32._plan(rows, training, not training, w32.planning_model()) == kcp_plan(
                *args, cost_model=fast
            )
            assert w64._plan(rows, training, not training, w64.planning_model()) == kcp_plan(
                *args, cost_model=slow
            )
    # the float32 walk gathers with the compiled kernel; the float64 one cannot
    p32, p64 = w32.plan(96, training=False), w64.plan(96, training=False)
    gathers = [
        {s.gather for s in sequential_walk(UCF_IN, UCF_OUT, 1, p.order, m).steps}
        for p, m in ((p32, fast), (p64, slow))
    ]
    assert GatherMode.NATIVE in gathers[0] and GatherMode.NATIVE not in gathers[1]
    assert p32.kernel_saving > 0 and p64.kernel_saving == 0


def test_matmul_macs_counts_the_plan_of_the_mode_asked_for():
    """``matmul_macs(rows, training=...)`` does not depend on the caller's grad mode: training
    is the plan with the factors differentiated, inference the plan under ``no_grad``."""
    model = CostModel().replace(native_gather=1e12)  # torch's gathers: the two modes differ
    w = KCPMatrix(230400, 1024, in_modes=BIG_IN, out_modes=UCF_OUT, rank=2, cost_model=model)
    train = w.plan(96)  # grad enabled, factors require grad
    with torch.no_grad():
        infer = w.plan(96)
        assert w.matmul_macs(96, training=True) == train.macs
        assert w.matmul_macs(96) == infer.macs
    assert (train.algorithm, infer.algorithm) == ("sequential", "parallel")
    assert w.matmul_macs(96, training=True) == train.macs != infer.macs == w.matmul_macs(96)
    assert w.macs(96, training=True) == train.macs and w.flops(96) == infer.macs


def test_default_cost_model_follows_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "model.json"
    mine = CostModel().replace(gather_chunk=1234, row=99.0)
    mine.save(path)
    monkeypatch.setenv("KCPRNN_COST_MODEL", str(path))
    assert default_cost_model() == mine
    w = ucf11()
    assert w.cost_model == mine and w.planning_model() == mine
    with torch.no_grad():
        assert w.plan(96) == kcp_plan(
            96, UCF_IN, UCF_OUT, (4, 4), 1, "auto", False, True, cost_model=mine
        )
    CostModel().replace(row=5.0).save(path)
    assert default_cost_model().row == 5.0  # read again when the file changes
    monkeypatch.setenv("KCPRNN_COST_MODEL", "builtin")
    assert default_cost_model() == CostModel()


@pytest.fixture
def machine_cache(monkeypatch, tmp_path):
    """An empty kernel cache folder with no ``$KCPRNN_COST_MODEL``, looked up afresh."""
    monkeypatch.setenv("KCPRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KCPRNN_COST_MODEL")
    cost.forget_machine_model()
    yield tmp_path
    cost.forget_machine_model()


def test_this_machines_model_is_the_default_unless_the_environment_names_one(
    machine_cache, monkeypatch
):
    assert default_cost_model() == CostModel()  # nothing saved yet
    assert cost.default_cost_model_source() == "builtin"
    path = cost.machine_model_path()
    assert path.parent == machine_cache and path.name.startswith("cost-model-")
    mine = CostModel().replace(row=77.0, rnn_dense_gru=1.5)
    mine.save(path)
    assert default_cost_model() == CostModel()  # looked up once per process ...
    cost.forget_machine_model()
    assert default_cost_model() == mine  # ... until told to look again
    assert cost.default_cost_model_source() == str(path)
    other = machine_cache / "other.json"
    CostModel().replace(row=3.0).save(other)
    monkeypatch.setenv("KCPRNN_COST_MODEL", str(other))
    assert default_cost_model().row == 3.0 and cost.default_cost_model_source() == str(other)
    monkeypatch.setenv("KCPRNN_COST_MODEL", "builtin")
    assert default_cost_model() == CostModel() and cost.default_cost_model_source() == "builtin"


@pytest.mark.parametrize("change", ["torch", "kernels"])
def test_this_machines_model_is_keyed_by_cpu_torch_and_kernels(machine_cache, monkeypatch, change):
    first = cost.machine_model_path()
    cost._machine_key.cache_clear()
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    else:  # a kernel source edited
        edited = machine_cache / "native_cells.h"
        edited.write_bytes(native.HEADERS[-1].read_bytes() + b"\n// edited\n")
        monkeypatch.setattr(native, "HEADERS", (*native.HEADERS[:-1], edited))
    try:
        assert cost.machine_model_path() != first
        assert cost.machine_model_path().parent == first.parent
    finally:
        cost._machine_key.cache_clear()


def test_a_broken_machine_model_is_refused_naming_the_file(machine_cache):
    path = cost.machine_model_path()
    path.write_text('{"row": 1.0, "no_such_field": 2}')
    with pytest.raises(ValueError, match="no_such_field") as info:
        default_cost_model()
    assert str(path) in str(info.value) and "kcprnn calibrate --save" in str(info.value)
    path.write_text('{"row": ')  # cut short
    with pytest.raises(ValueError, match=str(path)):
        default_cost_model()


def test_cost_model_values_are_hashable_and_compare_by_value():
    a, b = CostModel(), CostModel()
    assert a == b and hash(a) == hash(b)
    c = a.replace(permute=61.0)
    assert c != a and CostModel.from_dict(c.to_dict()) == c
    assert a.backward_ratio("parallel") == a.backward_parallel
    with pytest.raises(ValueError, match="algorithm must be"):
        a.backward_ratio("dense")
