"""The route of a cell's step: torch's fused cell on dense weights, or the formats' products
(the compiled step, the step functions on torch operations), each priced in the units of the
cost model (:class:`~kcprnn._cpu.CostModel`: the compiled step as ``rnn_native_call`` op
launches of ``rnn_cell_op`` plus its products and gate arithmetic; torch's cell by its
``rnn_torch_cell`` and ``rnn_cell_*`` fields). What each route runs is in
:mod:`kcprnn.rnn._cell_step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._cpu import CostModel, native
from ..formats import FactorizedMatrix
from . import _cell_train, plan
from ._cell_step import (
    _builds_in_step,
    _is_kron,
    _matrices,
    _shares_kron,
    marks,
    native_applies,
)
from .plan import kron_layout_cached

if TYPE_CHECKING:
    from .cells import RNNCellBase

__all__ = ["cell_uses_dense", "compiled_trains", "step_costs"]


def _dense_product(elements: int, batch: int, weight: float, row: float) -> float:
    return elements * (weight + row * batch)


def _native_product(matrix: FactorizedMatrix, role: str, batch: int, cm: CostModel) -> float:
    """Price of one of the compiled step's products over ``batch`` rows."""
    elements = matrix.in_features * matrix.out_features
    if _is_kron(matrix):
        found = kron_layout_cached(matrix)
        assert found is not None
        layout, terms = found
        work = batch * plan.kron_step_work(layout.in_sizes, layout.out_sizes, terms)
        gathers = batch * layout.in_features * (layout.in_index is not None)
        return cm.rnn_native_gemm * work + cm.rnn_cell_gather * gathers
    if matrix.format_name == "dense" or role == "hh":
        return _dense_product(elements, batch, cm.rnn_native_weight, cm.rnn_native_row)
    # another format's own product, from Python
    ops = plan.product_ops(matrix)
    return ops * cm.rnn_aten_op + cm.rnn_factorized_input * matrix.macs(batch)


def _cell_product(matrix: FactorizedMatrix, batch: int, cm: CostModel) -> float:
    """Price of ``matrix``'s dense product inside torch's fused cell."""
    elements = matrix.in_features * matrix.out_features
    return _dense_product(elements, batch, cm.rnn_cell_weight, cm.rnn_cell_row)


def _torch_cell(cell: RNNCellBase, batch: int, cm: CostModel) -> float:
    """Price of one step of torch's fused cell on ``cell``'s kept dense weights."""
    return cm.rnn_torch_cell + sum(
        _cell_product(m, batch, cm) for m in (cell.weight_ih, cell.weight_hh)
    )


def _own_products(cell: RNNCellBase, batch: int, cm: CostModel) -> float:
    """Price of one step through the formats' own products on torch operations: each product
    its aten operators (:func:`~kcprnn.rnn.plan.product_ops`, ``rnn_aten_op`` each) and its
    MACs at the structured rate, a dense matrix as in torch's cell, plus the step's Python and
    gate arithmetic."""
    price = cm.rnn_torch_cell + cm.rnn_step_ops * cm.rnn_aten_op
    for m in (cell.weight_ih, cell.weight_hh):
        if m.format_name == "dense" or m.algorithm == "dense":
            price += _cell_product(m, batch, cm)
            continue
        rate = plan.structured_rate(m, cm)
        if m.format_name != "kcp":
            rate *= cm.rnn_factorized_input
        price += plan.product_ops(m) * cm.rnn_aten_op + rate * m.macs(batch)
    return price


def step_costs(cell: RNNCellBase, batch: int, cm: CostModel) -> dict[str, float]:
    """Prices of one step of ``cell`` on ``batch`` rows without gradients: ``"dense"`` (torch's
    fused cell on the kept dense weights) and ``"native"`` (the compiled step)."""
    ih, hh = cell.weight_ih, cell.weight_hh
    gates = hh.out_features
    compiled = (
        cm.rnn_native_call * cm.rnn_cell_op
        + batch * gates * cm.rnn_native_gate
        + _native_product(ih, "ih", batch, cm)
        + _native_product(hh, "hh", batch, cm)
    )
    return {"dense": _torch_cell(cell, batch, cm), "native": compiled}


def cell_uses_dense(cell: RNNCellBase, batch: int, training: bool) -> bool:
    """Whether one step of ``cell`` on ``batch`` rows is cheaper on its dense weights and
    torch's fused cell than through its formats' products (ties go to torch): without
    gradients against the compiled step where it can run (:func:`step_costs`), else against
    the products on torch operations; in training by
    :func:`kcprnn.rnn.plan.cell_trains_dense`."""
    if training:
        lone = not marks(cell)["pending"]  # its predecessor's backward has run
        ops = _cell_train.STEP_OPS if lone and compiled_trains(cell) else None
        return plan.cell_trains_dense(cell, batch, ops, lone)
    if cell.weight_hr is not None:
        return False
    cm = cell.weight_hh.planning_model()
    p = cell.bias_hh if cell.bias_hh is not None else next(cell.weight_hh.parameters(), None)
    if p is not None and native_applies(cell, p.dtype, p.is_cpu):
        costs = step_costs(cell, batch, cm)
        return costs["dense"] <= costs["native"]
    return _torch_cell(cell, batch, cm) <= _own_products(cell, batch, cm)


def compiled_trains(cell: RNNCellBase) -> bool:
    """Whether a training step of ``cell`` runs the compiled step with every KCP matrix built
    in its node (:func:`_builds_in_step`): no projection, each matrix KCP or dense (at least
    one KCP), an input of at most :data:`~kcprnn.rnn._cell_train.MAX_INPUT`, float32 on the CPU
    with the kernels built."""
    ih, hh = _matrices(cell)
    if cell.weight_hr is not None or ih.in_features > _cell_train.MAX_INPUT:
        return False
    if not (_shares_kron(ih) or _shares_kron(hh)):
        return False
    for m in (ih, hh):
        if _shares_kron(m):
            found = kron_layout_cached(m)
            assert found is not None
            kcp: Any = m
            if not _builds_in_step([list(kcp.factors[n]) for n in found[0].order]):
                return False
        elif m.format_name != "dense":
            return False
    p = next(hh.parameters(), None)
    return p is not None and p.dtype == torch.float32 and p.is_cpu and native.available()
