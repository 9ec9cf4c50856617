"""The route of a cell's step: torch's fused cell on dense weights, or the formats' products
(the compiled step, the step functions on torch operations), each priced in the units of the
cost model (:class:`~kcprnn._cpu.CostModel`: the compiled step as ``rnn_native_call`` op
launches of ``rnn_cell_op`` plus its products and gate arithmetic; torch's cell by its
``rnn_torch_cell`` and ``rnn_cell_*`` fields). What each route runs is in
:mod:`kcprnn.rnn._cell_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._cpu import CostModel, native, native_factor
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

__all__ = ["cell_trains_dense", "cell_uses_dense", "step_costs"]


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
    :func:`cell_trains_dense`."""
    if training:
        lone = not marks(cell)["pending"]  # its predecessor's backward has run
        kinds = _compiled_operands(cell) if lone else None
        # the KCP matrices whose factor matrices the compiled step builds in a node of their own
        apart = [m for m, in_step in (kinds or {}).items() if not in_step]
        ops = _cell_train.STEP_OPS if kinds is not None and not apart else None
        return cell_trains_dense(cell, batch, ops, lone, apart)
    if cell.weight_hr is not None:
        return False
    cm = cell.weight_hh.planning_model()
    p = cell.bias_hh if cell.bias_hh is not None else next(cell.weight_hh.parameters(), None)
    if p is not None and native_applies(cell, p.dtype, p.is_cpu):
        costs = step_costs(cell, batch, cm)
        return costs["dense"] <= costs["native"]
    return _torch_cell(cell, batch, cm) <= _own_products(cell, batch, cm)


def _compiled_operands(cell: RNNCellBase) -> dict[FactorizedMatrix, bool] | None:
    """For a cell whose lone training steps run the compiled step with its KCP matrices'
    factor matrices (no projection, each matrix KCP or dense, at least one KCP, an input of at
    most :data:`~kcprnn.rnn._cell_train.MAX_INPUT`, float32 on the CPU with the kernels built),
    each KCP matrix and whether the step builds its factor matrices in its own node
    (:func:`_builds_in_step`; else they are built in a node of their own at every step, or the
    matrix runs as its chain); ``None`` for any other cell."""
    ih, hh = _matrices(cell)
    if cell.weight_hr is not None or ih.in_features > _cell_train.MAX_INPUT:
        return None
    kinds: dict[FactorizedMatrix, bool] = {}
    for m in (ih, hh):
        if _shares_kron(m):
            found = kron_layout_cached(m)
            assert found is not None
            kcp: Any = m
            kinds[m] = _builds_in_step([list(kcp.factors[n]) for n in found[0].order])
        elif m.format_name != "dense":
            return None
    p = next(hh.parameters(), None)
    if not kinds or p is None or p.dtype != torch.float32 or not p.is_cpu:
        return None
    return kinds if native.available() else None


def cell_trains_dense(
    cell: RNNCellBase,
    batch: int,
    ops: int | None = None,
    lone: bool = False,
    apart: Sequence[FactorizedMatrix] = (),
) -> bool:
    """Whether one training step of ``cell`` on ``batch`` rows is cheaper with its weights
    rebuilt dense (under autograd) and torch's fused cell than through the formats' products
    (without gradients: :func:`cell_uses_dense`); ``ops``: the
    operations each compressed matrix's product launches forward and backward (16 on torch
    operations, the default; fewer in the compiled step, and for a format's one-row chain,
    :mod:`kcprnn.formats._chain`, priced at the chain's own multiply-adds). A ``lone`` step (its
    predecessor's backward has run: :func:`~kcprnn.rnn._cell_step.marks`) pays the rebuild's
    operators forward and backward itself (:func:`~kcprnn.rnn.plan.rebuild_ops`,
    ``rnn_aten_op`` each), which on a few rows cost more than its arithmetic; the steps of a
    sequence share them. ``apart``: the KCP matrices whose factor matrices a lone compiled
    step builds in a node of their own (too large to build in the step's node), priced by
    :func:`_apart_price` unless they run as their chain."""
    if cell.weight_hr is not None:
        return False
    cm = plan._model([cell])
    structured = 0.0
    dense = 0.0
    for m in (cell.weight_ih, cell.weight_hh):
        elements = m.in_features * m.out_features
        dense += 3 * max(batch, cm.rnn_min_rows) * elements
        dense += plan._rebuild(m, True, cm)
        if lone and m.format_name != "dense" and elements <= plan.REBUILD_OPS_LIMIT:
            dense += cm.rnn_aten_op * 2 * plan.rebuild_ops(m)  # its operators, as many backward
        if m.format_name == "dense" or m.algorithm == "dense":
            structured += 3 * max(batch, cm.rnn_min_rows) * m.in_features * m.out_features
        else:
            chain = m.chain_for(batch, training=True) if native.available() else None
            if (chain is not None or m in apart) and m.format_name == "kcp":
                kcp: Any = m
                order = kron_layout_cached(m)[0].order  # type: ignore[index]
                groups = [list(kcp.factors[n]) for n in order]
                # on lone steps, where cheaper than the build
                chain = _cell_train.step_chain(m, groups, batch) if lone else None
                if chain is None and m in apart:
                    structured += _apart_price(m, groups, batch, cm)
                    continue
            # the one-row chain: its own multiply-adds, a compiled call each way
            macs = m.macs(batch, training=True) if chain is None else chain.macs(batch)
            structured += 3 * plan.structured_rate(m, cm) * macs
            launches = 8 * 2 if ops is None else ops
            structured += cm.rnn_cell_op * (launches if chain is None else _cell_train.STEP_OPS)
    return dense <= structured


def _apart_price(
    matrix: FactorizedMatrix, groups: Sequence[Sequence[Tensor]], batch: int, cm: CostModel
) -> float:
    """Price of a KCP ``matrix`` in a lone compiled training step whose factor matrices are
    built from ``groups`` (each Kronecker factor's CP factors) in a node of their own: that
    node's two calls (forward, backward) and the step's, the builds' ``P R J I`` once forward
    and twice backward, and the step's Kronecker product on ``batch`` rows forward and twice
    backward (:func:`~kcprnn.rnn.plan.kron_step_work`)."""
    found = kron_layout_cached(matrix)
    assert found is not None
    layout, terms = found
    work = sum(native_factor.work(g) for g in groups)
    product = batch * plan.kron_step_work(layout.in_sizes, layout.out_sizes, terms)
    calls = 2 + _cell_train.STEP_OPS
    return cm.rnn_cell_op * calls + 3 * work + 3 * cm.rnn_native_gemm * product
