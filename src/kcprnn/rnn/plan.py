"""How a recurrent layer runs: the routes and their prices under the cost model.

A layer (all directions of one of the stacked layers) runs one of these routes:

- ``"torch"``: every weight rebuilt dense (:func:`dense_weight`, once per call; gradients
  reach the factors through it; without gradients the cells keep the rebuilt weights) and
  torch's own fused recurrence (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
  ``torch.rnn_relu``) over both directions; any input, packed or not.
- ``"dense"``: the input product of all steps (in ``W_ih``'s format, or on ``W_ih`` rebuilt
  dense where that is cheaper: :func:`input_is_dense`), then kcprnn's fused loop
  (:mod:`kcprnn.rnn.fused`) with ``W_hh`` dense (rebuilt once per sequence if factorized).
- ``"structured"``: as ``"dense"``, but ``W_hh`` multiplied as a Kronecker sum
  (:mod:`kcprnn.rnn.kron`: KCP and CP) at every step; in float32 on the CPU the whole loop is
  one call of the compiled kernel (:mod:`kcprnn._cpu.native`), which the model prices when it
  plans for the kernels (``CostModel.kernels``; planning never builds them).
- ``"steps"``: the input product, then one cell step at a time under autograd
  (:func:`~kcprnn.rnn.scan`); what remains for sequences of different lengths when torch's
  kernel is not chosen, and under ``torch.compile``.

``"auto"`` takes the cheapest available route by :func:`layer_costs`, in multiply-accumulate
equivalents of the :class:`~kcprnn._cpu.CostModel` (its ``rnn_*`` fields): the dense rebuild is
priced per call for ``W_ih`` and per sequence for ``W_hh`` (its backward apart), torch's kernel
per pass of its GEMMs and per step (GRU and Elman kernels scaled against the LSTM's; the LSTM's
also per weight element a call, for oneDNN's reorders), the compiled dense loop against torch's
LSTM kernel for the same work plus its own calls per step (from ``rnn_min_rows`` rows per step;
below them, and without the kernels, as the loop on torch ops; dearer in LSTM training while
torch's workspace stays small enough for glibc to reuse it), the compiled structured loop per
step, per gate unit of every row and per MAC of its products (forward and transposed apart),
then its factor gradients. A module keeps every layer's :class:`LayerPlan` per input shape
(:func:`plan_layer`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .._cpu import CostModel, default_cost_model
from .._cpu.native_dense import small_product
from .._cpu.ops import gemm_price, linear_terms, weight_grad_terms
from ..formats import FactorizedMatrix
from ._options import _first_parameter
from .kron import (
    KronLayout,
    kron_grads_price,
    kron_layout_of,
    kron_matmul_macs,
    kron_matmul_ops,
    rebuild,
)

if TYPE_CHECKING:
    from .cells import RNNCellBase

__all__ = [
    "ROUTES",
    "LayerPlan",
    "choose_route",
    "dense_loop_scale",
    "dense_weight",
    "input_is_dense",
    "kron_layout_cached",
    "layer_costs",
    "plan_layer",
    "product_ops",
    "REBUILD_OPS_LIMIT",
    "rebuild_ops",
    "structured_rate",
]

ROUTES = ("auto", "torch", "dense", "structured", "steps")


def dense_weight(matrix: FactorizedMatrix) -> Tensor:
    """``matrix`` dense ``(out_features, in_features)`` with autograd to its factors, by its
    format's fastest rebuild: a KCP matrix through :func:`~kcprnn.rnn.kron.rebuild` (the
    Kronecker products of its factor matrices, then two gathers), every other format through
    its ``to_dense`` (CP, HT, TT and TR as two halves joined by one GEMM; Tucker and BT mode by
    mode, then the first factor; a dense matrix is its parameter itself)."""
    if matrix.format_name == "kcp":
        return rebuild(matrix)
    return matrix.to_dense()


_LAYOUTS: dict[tuple[Any, ...], tuple[KronLayout, int] | None] = {}


def kron_layout_cached(matrix: FactorizedMatrix) -> tuple[KronLayout, int] | None:
    """:func:`~kcprnn.rnn.kron.kron_layout_of`, kept per format, number of modes and factor
    shapes (which determine a KCP or CP layout: every factor is ``(..., J, I)`` in the modes'
    order), so that a layer pays its index bookkeeping once, not at every call."""
    if matrix.format_name not in ("kcp", "cp"):
        return None
    key = (
        matrix.format_name,
        matrix.num_modes,
        tuple(tuple(p.shape) for p in matrix.parameters()),
    )
    found = _LAYOUTS.get(key, False)
    if found is False:
        if len(_LAYOUTS) >= 256:
            _LAYOUTS.clear()
        found = _LAYOUTS[key] = kron_layout_of(matrix)
    return found  # type: ignore[return-value]


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


_OPS: dict[tuple[Any, ...], int] = {}


def product_ops(matrix: FactorizedMatrix) -> int:
    """How many aten operators one product of ``matrix`` launches (on one row, without
    gradients; at least 1): each costs a launch and its Python whatever its size, which on a
    cell step's few rows outweighs the arithmetic (a rank-4 TT product of a 512 x 2,048 matrix
    is about 50 of them, HT about 135). Counted once per format, algorithm and factor shapes,
    by running the product under a counting dispatch mode; kernels called outside the
    dispatcher (KCP's compiled products) count as none. A format's one-row chain is counted as
    its own product (the price stays that of the steps on more rows)."""
    return _count_ops(matrix, "product")


REBUILD_OPS_LIMIT = 1 << 22
"""Largest matrix (elements) whose rebuild's operators
:func:`kcprnn.rnn._cell_route.cell_trains_dense` counts (by running the rebuild once,
:func:`rebuild_ops`); past it the rebuild's price per element (``rnn_rebuild``, 4 units
forward) outweighs any operator count, and counting would build a matrix of that size for
nothing (57,600 x 1,024: 236 MB)."""


def rebuild_ops(matrix: FactorizedMatrix) -> int:
    """How many aten operators :func:`dense_weight` launches for ``matrix`` (at least 1; its
    backward launches about as many): on a cell step's few rows a rebuild's launches, not its
    multiply-adds, are its cost. Counted once per format and factor shapes, as
    :func:`product_ops`."""
    return _count_ops(matrix, "rebuild")


def _count_ops(matrix: FactorizedMatrix, what: str) -> int:
    params = list(matrix.parameters())
    key = (
        what,
        type(matrix),
        matrix.algorithm,
        matrix.in_features,
        matrix.out_features,
        tuple((tuple(p.shape), p.dtype, p.device) for p in params),
    )
    found = _OPS.get(key)
    if found is None:
        p = params[0] if params else None
        x = torch.zeros(
            1,
            matrix.in_features,
            dtype=None if p is None else p.dtype,
            device=None if p is None else p.device,
        )
        # the format's own product: the one-row chain (FactorizedMatrix.chain_spec) is a
        # compiled call, priced here as the product it stands in for
        own = matrix.algorithm != "dense" and matrix.chain_spec() is not None
        with torch.no_grad(), _OpCounter() as counter:
            if what == "rebuild":
                dense_weight(matrix)
            else:
                matrix.matmul(x) if own else matrix(x)
        if len(_OPS) >= 256:
            _OPS.clear()
        found = _OPS[key] = max(counter.count, 1)
    return found


def _rebuild(matrix: FactorizedMatrix, training: bool, cm: CostModel) -> float:
    """Price of rebuilding ``matrix`` dense once (:func:`dense_weight`), with its backward in
    training (nothing for a dense matrix): per element of ``W`` and per MAC of the
    reconstruction, twice the MACs backward."""
    if matrix.format_name == "dense":
        return 0.0
    elements = matrix.in_features * matrix.out_features
    macs = matrix.reconstruction_macs()
    forward = cm.rnn_rebuild * elements + macs
    if not training:
        return forward
    return forward + cm.rnn_rebuild_backward * elements + 2 * macs


def structured_rate(matrix: FactorizedMatrix, cm: CostModel) -> float:
    """Price of one MAC of ``matrix``'s structured product, relative to a large GEMM's."""
    return 1.0 + cm.rnn_structured_input / matrix.in_features


def _input_costs(
    cell: RNNCellBase, rows: int, training: bool, cm: CostModel
) -> tuple[float, float]:
    """Prices of ``W_ih x`` over ``rows`` rows: in ``W_ih``'s own format (KCP's products by the
    width of their inputs, :func:`structured_rate`, plus ``rnn_kcp_output`` per output entry;
    the other formats' sweeps at
    ``rnn_factorized_input`` times that per MAC: at 123 to 1,024 inputs HT, CP and TT sweeps
    trained 1.1-2x slower than the rebuilt product), and on ``W_ih`` rebuilt dense (the same for
    a dense matrix)."""
    ih = cell.weight_ih
    passes = 3 if training else 1
    dense = _rebuild(ih, training, cm) + _dense_input(
        rows, ih.in_features, ih.out_features, training, cm
    )
    if ih.format_name == "dense" or ih.algorithm == "dense":
        return dense, dense
    rate = structured_rate(ih, cm)
    output = 0.0
    if ih.format_name == "kcp":
        output = passes * rows * ih.out_features * cm.rnn_kcp_output
    else:
        rate *= cm.rnn_factorized_input
    if ih.format_name == "cp" and training:
        rate *= cm.rnn_cp_input_training
    return passes * rate * ih.macs(rows, training=training) + output, dense


def _dense_input(rows: int, i: int, g: int, training: bool, cm: CostModel) -> float:
    """The price of a dense ``W_ih`` ``(g, i)`` times ``rows`` rows
    (:func:`~kcprnn.rnn.fused.input_projection`): the forward and, in training, both gradients,
    the input's on oneDNN and the others on MKL or oneDNN, whichever prices lower
    (:func:`~kcprnn._cpu.ops.gemm_price`)."""
    forward = gemm_price(*linear_terms(rows, i, g), cm)
    if not training:
        return forward
    return forward + rows * i * g + gemm_price(*weight_grad_terms(rows, g, i), cm)


def input_is_dense(cell: RNNCellBase, rows: int, training: bool) -> bool:
    """Whether the input product of ``rows`` rows is cheaper on ``W_ih`` rebuilt dense than in
    its format (always ``False`` for a dense matrix: it is multiplied as it is)."""
    if cell.weight_ih.format_name == "dense":
        return False
    structured, dense = _input_costs(cell, rows, training, _model([cell]))
    return dense < structured


def layer_costs(
    cells: Sequence[RNNCellBase],
    rows: int,
    steps: int,
    equal_lengths: bool,
    training: bool,
    cost_model: CostModel | None = None,
) -> dict[str, float]:
    """The price of every route available to the layer of ``cells`` (one per direction) over
    ``rows`` rows in ``steps`` time steps; ``equal_lengths``: all sequences have ``steps``
    steps (the fused loops need it); ``training``: gradients will be computed."""
    cm = default_cost_model() if cost_model is None else cost_model
    cell = cells[0]
    fused_ok = equal_lengths and cell.weight_hr is None
    costs = {"torch": 0.0, "dense": 0.0, "structured": 0.0}
    for c in cells:
        hh = c.weight_hh
        g, p = hh.out_features, hh.in_features
        many_rows = rows >= steps * cm.rnn_min_rows  # at least rnn_min_rows rows a step
        recurrent_once = max(rows, steps * cm.rnn_min_rows) * p * g
        weights: list[FactorizedMatrix] = [c.weight_ih, hh]
        if c.weight_hr is not None:
            weights.append(c.weight_hr)
        # torch's own kernel: one pass of its GEMMs and steps forward, two backward, each
        # scaled by what its kernel for this mode costs over its LSTM's (and so kcprnn's fused
        # dense loop, which does the same per-step work; the compiled structured loop is not)
        inputs = rows * c.weight_ih.in_features * g
        once = float(inputs + recurrent_once)
        if c.mode == "LSTM" and cm.onednn:  # oneDNN's RNN primitive: its input products too
            once -= (1.0 - min(cm.onednn_gemm, 1.0)) * inputs
        if c.weight_hr is not None:
            once += rows * c.weight_hr.in_features * p
        scale, scale_backward = _torch_scales(c.mode, cm)
        # its products as they run: those over all rows (the input's, the weight gradients)
        # and, from rnn_min_rows rows a step, each step's, at its MKL rate (_torch_mkl)
        mkl = _torch_mkl(c.mode, cm)
        step_mkl = mkl if many_rows else 1.0
        products = mkl * (once - recurrent_once) + step_mkl * recurrent_once
        products_backward = 2 * products + (mkl - step_mkl) * recurrent_once
        costs["torch"] += sum(_rebuild(m, training, cm) for m in weights) + scale * (
            products + steps * cm.rnn_torch_step
        )
        if c.mode == "LSTM" and cm.onednn:  # its weight reorders at every call
            reorder = cm.rnn_torch_lstm_train if training else cm.rnn_torch_lstm_call
            costs["torch"] += reorder * sum(m.in_features * m.out_features for m in weights)
        if training:
            costs["torch"] += scale_backward * (
                products_backward + steps * cm.rnn_torch_step * cm.rnn_step_backward
            )
            if c.mode == "LSTM" and cm.onednn:  # its input products, slower than a GEMM's
                costs["torch"] += 3 * (cm.rnn_torch_lstm_input - 1) * inputs
            elif c.mode != "LSTM" and not many_rows:  # W_hh's gradients, step by step
                costs["torch"] += steps * p * g * cm.rnn_torch_step_grad
        ih = min(_input_costs(c, rows, training, cm))
        if cm.kernels and cm.onednn and many_rows:
            # the compiled dense loop, priced against torch's LSTM kernel plus its own steps
            torch_like = recurrent_once + steps * cm.rnn_torch_step
            fused = cm.rnn_dense_forward * torch_like + steps * cm.rnn_dense_step
            fused -= steps * cm.rnn_dense_packed_call * small_product(p, g)
            if training:
                backward = 2 * recurrent_once + steps * cm.rnn_torch_step * cm.rnn_step_backward
                fused += cm.rnn_dense_backward * backward + steps * cm.rnn_dense_step
                fused -= steps * cm.rnn_dense_packed_call * small_product(g, p)
                if c.mode == "LSTM" and rows * p * cm.rnn_torch_workspace < cm.rnn_torch_mmap:
                    fused *= cm.rnn_dense_warm  # torch's workspace is reused, without faults
            fused *= dense_loop_scale(c.mode, training, cm)
        else:  # kcprnn's fused loop on torch ops, one pass
            fused = recurrent_once + steps * cm.rnn_fused_step
            if training:
                backward = 2 * recurrent_once + steps * cm.rnn_fused_step * cm.rnn_step_backward
                fused = scale * fused + scale_backward * backward
            else:
                fused = scale * fused
        costs["dense"] += ih + _rebuild(hh, training, cm) + fused
        kron = kron_layout_cached(hh)
        if kron is None:
            costs.pop("structured", None)
            continue
        layout, terms = kron
        if "structured" in costs:
            costs["structured"] += ih + _structured_loop(
                layout, terms, rows, g, steps, training, cm
            )
    if not fused_ok:
        costs.pop("dense")
        costs.pop("structured", None)
    return costs


def dense_loop_scale(mode: str, training: bool, cm: CostModel) -> float:
    """The cost model's factor on the compiled dense loop's price for a ``mode`` layer
    (``rnn_dense_lstm``, ``rnn_dense_gru_train``, ...): how this machine runs the loop
    against torch's kernel, next to the machine the other fields were fitted on."""
    name = "rnn_dense_" + ("lstm" if mode == "LSTM" else "gru" if mode == "GRU" else "rnn")
    return float(getattr(cm, name + "_train" if training else name))


def _torch_scales(mode: str, cm: CostModel) -> tuple[float, float]:
    """Forward and backward price of torch's recurrent kernel for ``mode`` relative to its
    LSTM's (the cost model's ``rnn_torch_*`` fields)."""
    if mode == "GRU":
        return cm.rnn_torch_gru, cm.rnn_torch_gru_backward
    if mode == "RNN":
        return cm.rnn_torch_rnn, cm.rnn_torch_rnn_backward
    return 1.0, 1.0


def _torch_mkl(mode: str, cm: CostModel) -> float:
    """How much more torch's recurrent kernel for ``mode`` pays per multiply-add of its
    products than its LSTM's: the GRU and Elman kernels multiply on MKL, the LSTM's is
    oneDNN's RNN primitive, so where oneDNN's GEMMs run faster than MKL's (``onednn_gemm``
    below 1: MKL's generic kernels on a CPU that is not Intel's) they cost
    ``1 / onednn_gemm`` as much again; elsewhere 1."""
    if mode == "LSTM" or not (cm.onednn and cm.onednn_gemm < 1.0):
        return 1.0
    return 1.0 / cm.onednn_gemm


def _structured_loop(
    layout: KronLayout,
    terms: int,
    rows: int,
    gates: int,
    steps: int,
    training: bool,
    cm: CostModel,
) -> float:
    """Price of the structured loop over ``rows`` rows in ``steps`` steps (``gates`` outputs
    of ``W_hh``): the compiled kernel's where the model plans for it (per step, per gate unit
    of every row and per multiply-add of its products, forward and backward priced apart; then
    the factor gradients over all rows at once, the cheaper of the sweeps and the dense-first
    contraction), else one torch launch per factor product and gather of every step. Each
    factor product of a compiled step also pays for its setup and for the elements it moves
    (``rnn_native_product``, ``rnn_native_traffic``)."""
    macs = kron_matmul_macs(layout, terms, rows)
    per_step = 1 + cm.rnn_step_backward * training
    if cm.kernels:
        ins, outs = layout.in_sizes, layout.out_sizes
        loop = steps * cm.rnn_native_step + rows * gates * cm.rnn_native_gate
        loop += steps * terms * len(ins) * cm.rnn_native_product
        traffic = cm.rnn_native_traffic * _kernel_traffic(ins, outs, terms, rows)
        forward = loop + cm.rnn_native_gemm * _kernel_work(ins, outs, terms, rows) + traffic
        if not training:
            return forward
        backward = loop + cm.rnn_native_backward_gemm * _kernel_work(outs, ins, terms, rows)
        backward += cm.rnn_native_traffic * _kernel_traffic(outs, ins, terms, rows)
        shapes = [(terms, j, i) for i, j in zip(ins, outs, strict=True)]
        grads = kron_grads_price(shapes, rows, cm)
        return forward + backward + cm.rnn_native_grads * grads
    passes = 3 if training else 1
    ops = kron_matmul_ops(layout, terms)
    return (
        passes * cm.rnn_small_gemm * macs
        + steps * (cm.rnn_fused_step + ops * cm.rnn_kron_op) * per_step
    )


KERNEL_WIDTH = 16
"""Floats per vector the compiled kernel is priced for."""


@functools.lru_cache(maxsize=256)
def _kernel_order(
    in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]
) -> tuple[tuple[int, int, int], ...]:
    """``(k, pre, post)`` for each factor ``k`` in the order the compiled kernel applies them
    (``KronPlan::cheapest_order`` in ``native_kron.h``): of all orders of up to six factors, the
    one with the fewest multiply-adds, the last factor first where several tie. Factor ``k``
    multiplies a ``(rows pre, I_k, post)`` array, the factors applied before it at their output
    sizes."""
    n = len(in_sizes)

    def macs(order: Sequence[int]) -> int:
        cur, total = list(in_sizes), 0
        for k in order:
            total += math.prod(cur[:k]) * math.prod(cur[k + 1 :]) * in_sizes[k] * out_sizes[k]
            cur[k] = out_sizes[k]
        return total

    best = list(range(n - 1, -1, -1))
    if n <= 6:
        least = macs(best)
        for order in itertools.permutations(range(n)):
            if (m := macs(order)) < least:
                least, best = m, list(order)
    cur, steps = list(in_sizes), []
    for k in best:
        steps.append((k, math.prod(cur[:k]), math.prod(cur[k + 1 :])))
        cur[k] = out_sizes[k]
    return tuple(steps)


def _kernel_traffic(
    in_sizes: Sequence[int], out_sizes: Sequence[int], terms: int, rows: int
) -> int:
    """Elements the compiled kernel's factor products read and write over ``rows`` rows: factor
    ``k`` maps an intermediate of ``pre * I_k * post`` entries per row and term to one of
    ``pre * J_k * post`` (:func:`_kernel_order`)."""
    total = 0
    for k, pre, post in _kernel_order(tuple(in_sizes), tuple(out_sizes)):
        total += pre * (in_sizes[k] + out_sizes[k]) * post
    return terms * rows * total


@functools.lru_cache(maxsize=256)
def kron_step_work(in_sizes: tuple[int, ...], out_sizes: tuple[int, ...], terms: int) -> float:
    """Multiply-adds per row of one product of the compiled kernel's Kronecker sum
    (``KronPlan`` in ``native_kron.h``), as it runs them (its factors in
    :func:`_kernel_order`): a factor followed by fewer trailing entries than a vector (and small
    enough) multiplies by its expansion over them (that many times the MACs, whole vectors along
    the outputs), one followed by none by dot products along its inputs, any other along its
    trailing axis; what is left after the whole vectors runs as scalars, at an eighth of the
    rate."""
    total = 0.0
    for k, pre, post in _kernel_order(in_sizes, out_sizes):
        i, j = in_sizes[k], out_sizes[k]
        work = terms * pre * i * j * post
        if post < KERNEL_WIDTH and (i * post) * (j * post) <= 1 << 16:
            work, width = work * post, j * post  # row mode, expanded
        else:
            width = i if post == 1 else post
        full = width // KERNEL_WIDTH * KERNEL_WIDTH
        total += work * (full + 8 * (width - full)) / width
    return total


def _kernel_work(in_sizes: Sequence[int], out_sizes: Sequence[int], terms: int, rows: int) -> float:
    """:func:`kron_step_work` over ``rows`` rows."""
    return rows * kron_step_work(tuple(in_sizes), tuple(out_sizes), terms)


def choose_route(
    route: str,
    cells: Sequence[RNNCellBase],
    rows: int,
    steps: int,
    equal_lengths: bool,
    training: bool,
) -> str:
    """The route the layer of ``cells`` runs: ``route`` itself where it applies, the cheapest
    by :func:`layer_costs` for ``"auto"``. A fused route that cannot run falls back: to
    ``"dense"`` for ``"structured"`` on a recurrent matrix that is not a Kronecker sum, to
    ``"torch"`` for sequences of different lengths or an LSTM projection."""
    if route in ("torch", "steps"):
        return route
    costs = layer_costs(cells, rows, steps, equal_lengths, training, _model(cells))
    if route == "auto":
        return min(costs, key=lambda r: costs[r])
    if route == "structured" and "structured" not in costs:
        route = "dense"
    return route if route in costs else "torch"


@dataclass(frozen=True)
class LayerPlan:
    """How one layer runs: its ``route`` (as :func:`choose_route` gives it) and, per cell,
    whether the input product runs on ``W_ih`` rebuilt dense (:func:`input_is_dense`)."""

    route: str
    dense_inputs: tuple[bool, ...]


PLAN_CACHE_SIZE = 64
"""Plans a module keeps (:func:`plan_layer`); the cache is emptied when it is full."""


def plan_layer(
    route: str,
    cells: Sequence[RNNCellBase],
    rows: int,
    steps: int,
    equal_lengths: bool,
    training: bool,
    cache: dict[tuple[Any, ...], LayerPlan] | None = None,
) -> LayerPlan:
    """The :class:`LayerPlan` of the layer of ``cells`` (arguments as :func:`choose_route`),
    looked up in ``cache`` (a module's own dict) when one is given.

    A plan depends on the shapes and on what the prices read, never on parameter values, so
    the key is the arguments plus, per matrix, the matrix itself (a replaced one plans
    afresh), its algorithm and cost model, the dtype and device of its parameters, and the
    default cost model (``$KCPRNN_COST_MODEL``). Nothing is cached without ``cache`` (as
    :func:`~kcprnn._compile_module.walks_every_layer` plans while tracing) or under
    ``torch.compile``."""
    if torch.compiler.is_compiling() or cache is None:
        return _make_plan(route, cells, rows, steps, equal_lengths, training)
    key = (route, rows, steps, equal_lengths, training, _signature(cells))
    found = cache.get(key)
    if found is None:
        found = _make_plan(route, cells, rows, steps, equal_lengths, training)
        if len(cache) >= PLAN_CACHE_SIZE:
            cache.clear()
        cache[key] = found
    return found


def _make_plan(
    route: str,
    cells: Sequence[RNNCellBase],
    rows: int,
    steps: int,
    equal_lengths: bool,
    training: bool,
) -> LayerPlan:
    chosen = choose_route(route, cells, rows, steps, equal_lengths, training)
    dense = tuple(
        chosen not in ("torch", "steps") and input_is_dense(c, rows, training) for c in cells
    )
    return LayerPlan(chosen, dense)


def _signature(cells: Sequence[RNNCellBase]) -> tuple[Any, ...]:
    """What a layer's plan depends on besides its arguments (see :func:`plan_layer`)."""
    out: list[Any] = [default_cost_model()]
    for c in cells:
        for m in (c.weight_ih, c.weight_hh, c.weight_hr):
            if m is None:
                continue
            p = _first_parameter(m)  # what next(m.parameters()) gives, without the generator
            out += (
                m,
                m.algorithm,
                m._cost_model,
                None if p is None else p.dtype,
                None if p is None else p.device,
            )
    return tuple(out)


def _model(cells: Sequence[RNNCellBase]) -> CostModel:
    """The cost model of the layer: its recurrent matrix's, for its device and dtype."""
    return cells[0].weight_hh.planning_model()
