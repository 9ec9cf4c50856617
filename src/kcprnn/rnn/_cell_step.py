"""The cells' steps: the weights a step reads, kept between calls until a parameter changes,
and what each way to run the step runs (their prices, and the choice between them:
:mod:`kcprnn.rnn._cell_route`).

Without autograd recording, a cell's step runs one of:

- torch's fused cell (``torch.lstm_cell``, ...) on its weights rebuilt dense and kept
  (:func:`dense_weights`);
- the compiled step (:class:`~kcprnn._cpu.native_step.CellStep`, float32 on the CPU where the
  kernels are built): the products of ``W_ih`` and ``W_hh`` as Kronecker sums (KCP, CP: a few
  small factor products instead of reading every weight) or as dense matrices, both biases
  and the cell's arithmetic in one call (:func:`native_step`);
- the formats' own products and the step functions of :mod:`kcprnn.rnn.steps` (where the
  kernels cannot run).

Under autograd a step runs torch's fused cell on the dense weights or the step functions on
the formats' products, KCP matrices through their Kronecker factor matrices
(:func:`shared_step`); the dense weights and the factor matrices are built once per version of
the weights with a graph of their own and shared by the steps (:class:`_Shared`, or, for KCP
factor matrices built in one node on the CPU, that node itself), so that a sequence
of steps builds and back-propagates through each matrix once. In the compiled step a step
whose predecessor's backward has run (one step, one backward: streaming training) takes small
KCP factor matrices built inside its own node instead (:func:`_train_operand`, :func:`marks`).

The kept objects are keyed by every parameter's storage and version counter, so an in-place
update (an optimizer step, ``load_state_dict``), a replaced parameter or a ``.data`` swap is
seen at the next call.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from .._cpu import native, native_factor
from .._cpu.native_rnn import KronArgs
from .._cpu.native_step import CellStep
from ..formats import FactorizedMatrix
from ..formats._base import CHAIN_ROWS
from . import _cell_train
from .kron import kron_apply, kron_terms
from .plan import dense_weight, kron_layout_cached
from .steps import State, gru_step, lstm_step, rnn_step

if TYPE_CHECKING:
    from .cells import RNNCellBase

__all__ = [
    "autocasting",
    "dense_weights",
    "kept",
    "needs_grad",
    "native_applies",
    "native_step",
    "shared_step",
    "weights_key",
]

_CPU = torch.device("cpu")
_T = TypeVar("_T")


def _matrices(cell: RNNCellBase) -> tuple[FactorizedMatrix, FactorizedMatrix]:
    """``cell``'s ``W_ih`` and ``W_hh`` from its ``_modules`` (faster than
    ``nn.Module.__getattr__``, which every step would pay)."""
    modules = cell._modules
    return modules["weight_ih"], modules["weight_hh"]  # type: ignore[return-value]


def _weights(cell: RNNCellBase) -> list[Tensor]:
    """The parameters of ``W_ih``, ``W_hh`` and the biases of ``cell`` (where each lives is
    looked up once per pair of matrices; the parameters themselves are read afresh, so a
    replaced one is seen)."""
    ih, hh = _matrices(cell)
    slots = cell._param_slots
    if slots is None or slots[0] is not ih or slots[1] is not hh:
        found = [(d._parameters, n) for m in (ih, hh) for d in m.modules() for n in d._parameters]
        found += [(cell._parameters, "bias_ih"), (cell._parameters, "bias_hh")]
        slots = cell._param_slots = (ih, hh, found)
    return [p for d, n in slots[2] if (p := d[n]) is not None]


def weights_key(cell: RNNCellBase) -> tuple[Any, ...]:
    """What the kept weights of ``cell`` depend on: the storage and version counter of every
    parameter of ``W_ih``, ``W_hh`` and the biases (a move or a new dtype gives new storage)."""
    return tuple([(p.data_ptr(), p._version) for p in _weights(cell)])


def _grad_key(cell: RNNCellBase) -> tuple[Any, ...]:
    """:func:`weights_key` and which parameters need gradients: what builds shared under
    autograd depend on."""
    return tuple([(p.data_ptr(), p._version, p.requires_grad) for p in _weights(cell)])


def needs_grad(cell: RNNCellBase) -> bool:
    """Whether any parameter of ``cell`` requires a gradient."""
    if cell.weight_hr is not None:
        return any(p.requires_grad for p in cell.parameters())
    return any([p.requires_grad for p in _weights(cell)])


def kept(cell: RNNCellBase, name: str, build: Callable[[], _T]) -> _T:
    """``build()`` (anything made from the weights of ``W_ih``, ``W_hh`` and the biases),
    kept by ``cell`` under ``name`` between calls without gradients until a parameter changes;
    built afresh under autograd (with its graph) and inside ``torch.compile`` (which traces the
    build into its graph)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    key = weights_key(cell)
    found = cell._kept.get(name)
    if found is None or found[0] != key:
        found = cell._kept[name] = (key, build())
    return found[1]


def marks(cell: RNNCellBase) -> dict[str, bool]:
    """How ``cell``'s training steps come: ``marks(cell)["pending"]`` is set by every step
    under autograd and cleared by the backward through it, so a step that finds it set is
    one of a sequence of steps with one backward (a loop over time), and one that finds it
    clear has had its predecessor's backward (streaming training: a step, its backward, the
    next step). The routes differ between the two: a sequence shares what it builds from the
    weights among its steps, a lone step pays for it in full."""
    found = cell._kept.get("marks")  # kept whatever the weights: keyed by nothing
    if found is None:
        found = cell._kept["marks"] = ((), {"pending": False})
    return found[1]


class _Shared(torch.autograd.Function):
    """Tensors built from a matrix's parameters once (``build(matrix)``: its dense rebuild, or
    the factor matrices of its Kronecker sum), with a graph of their own back to the
    parameters: every step that reads them adds its gradients to theirs, and one backward
    through the kept graph (retained: any number of backward passes may reach it) turns the
    sums into the parameters' gradients. A backward that records a graph
    (``create_graph=True``) builds afresh, so that second derivatives never reach the kept
    graph. In-place changes of the parameters after the build are reported by the backward as
    autograd reports them."""

    @staticmethod
    def forward(
        ctx: Any,
        build: Callable[[Any], Sequence[Tensor]],
        matrix: Any,
        steps: dict[str, bool] | None,
        *params: Tensor,
    ) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            outs = tuple(build(matrix))  # with their own graph
        ctx.outs, ctx.build, ctx.matrix, ctx.params = outs, build, matrix, params
        ctx.steps = steps
        return tuple([o.detach() for o in outs])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        outs, params = ctx.outs, ctx.params
        if ctx.steps is not None:
            ctx.steps["pending"] = False  # the steps that read the build are back-propagated
        if torch.is_grad_enabled():
            current = tuple([p for p in ctx.matrix.parameters() if p.requires_grad])
            if len(current) != len(params) or any(map(operator.is_not, current, params)):
                raise RuntimeError(
                    "kcprnn: second derivatives through a cell's kept weights need the "
                    "parameters the forward used, but the matrix's parameters were replaced"
                )
            outs = tuple(ctx.build(ctx.matrix))  # a graph of this backward's own
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            params,
            [g for _, g in pairs],
            retain_graph=True,
            create_graph=torch.is_grad_enabled(),
            allow_unused=True,
        )
        return (None, None, None, *got)


def _shared(
    build: Callable[[Any], Sequence[Tensor]],
    matrix: FactorizedMatrix,
    steps: dict[str, bool] | None = None,
) -> list[Tensor]:
    """``build(matrix)`` shared by every call under autograd until a parameter changes
    (:class:`_Shared`); built plainly when no parameter of ``matrix`` needs a gradient, and
    when each built tensor is one node that any number of backward passes may go through (a
    KCP matrix's factor matrices on the CPU: :mod:`kcprnn._cpu.native_factor`). The backward
    through the build clears ``steps["pending"]`` (:func:`marks`) when ``steps`` is given."""
    params = [p for p in matrix.parameters() if p.requires_grad]
    if matrix.format_name == "dense" or not params:
        return list(build(matrix))
    if build is _kron_build and _factors_in_one_node(matrix):
        return list(build(matrix))
    return list(_Shared.apply(build, matrix, steps, *params))


def _factors_in_one_node(matrix: FactorizedMatrix) -> bool:
    """Whether the factor matrices of the KCP ``matrix`` are built as one autograd node that
    keeps its inputs (:mod:`kcprnn._cpu.native_factor`)."""
    kcp: Any = matrix
    return all(native_factor.in_one_node(list(f)) for f in kcp.factors)


def _dense_build(matrix: FactorizedMatrix) -> tuple[Tensor]:
    return (dense_weight(matrix),)


def _kron_build(matrix: FactorizedMatrix) -> list[Tensor]:
    found = kron_layout_cached(matrix)
    assert found is not None
    built = kron_terms(matrix, found[0])
    assert built is not None
    return built[0]


def _sharing() -> bool:
    """Whether a call may share what it builds from the weights with other calls under
    autograd: not while ``torch.compile`` traces (it traces the builds) nor under
    ``torch.func`` transforms."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


_AUTOCAST = ("cpu", "cuda", "mps", "xpu")  # device types torch's autocast knows


def autocasting(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type."""
    return device.type in _AUTOCAST and torch.is_autocast_enabled(device.type)


def dense_weights(cell: RNNCellBase) -> tuple[Tensor, Tensor]:
    """``W_ih`` and ``W_hh`` dense, kept between calls until a parameter changes (dense
    matrices: their parameters themselves). Under autograd every call until then shares one
    rebuild with its graph (:class:`_Shared`): the steps of a sequence rebuild each matrix
    once and back-propagate through the rebuild once; inside ``torch.compile`` (traced) and
    under ``torch.func`` transforms they are rebuilt every call."""
    ih, hh = cell.weight_ih, cell.weight_hh
    if (ih.format_name == "dense" and hh.format_name == "dense") or not _sharing():
        return dense_weight(ih), dense_weight(hh)
    grad = torch.is_grad_enabled()
    key = _mode_key(cell)
    assert key is not None  # sharing holds here
    cached = cell._dense_cache
    if cached is None or cached[0] != key:
        cell._dense_cache = None  # the old weights go before the new ones are built
        p = next(hh.parameters())
        # built in the parameters' dtype whatever autocast says, as torch.nn keeps its weights
        # (its fused cell casts them at each call): what is kept serves inside and outside it
        off = torch.autocast(p.device.type, enabled=False) if autocasting(p.device) else None
        with off or contextlib.nullcontext():
            if grad:
                steps = marks(cell)
                pair = (_shared(_dense_build, ih, steps)[0], _shared(_dense_build, hh, steps)[0])
            else:
                pair = (dense_weight(ih), dense_weight(hh))
        cached = cell._dense_cache = (key, pair)
    return cached[1]


_Product = Callable[[Tensor], Tensor]


def _shares_kron(matrix: FactorizedMatrix) -> bool:
    """Whether the shared step multiplies ``matrix`` through its Kronecker factor matrices:
    a KCP matrix multiplied as a Kronecker sum."""
    return matrix.format_name == "kcp" and _is_kron(matrix)


def _kron_product(matrix: FactorizedMatrix) -> _Product | None:
    """Rows ``(b, i) -> (b, j)`` through the factor matrices of a KCP ``matrix``'s Kronecker
    sum, shared (:func:`_shared`); ``None`` for any other (a CP matrix's factor matrices are its
    parameters, nothing to share, and its own product is faster than ``R`` Kronecker terms)."""
    if not _shares_kron(matrix):
        return None
    mats = _shared(_kron_build, matrix)
    found = kron_layout_cached(matrix)
    assert found is not None
    layout = found[0]
    index = layout.indices(mats[0].device)
    return functools.partial(kron_apply, mats=mats, layout=layout, index=index)


def shared_step(cell: RNNCellBase, x: Tensor, state: State) -> State | None:
    """One step of ``cell`` under autograd with each KCP matrix multiplied through its
    factor matrices, built once per version of the weights and shared by the steps until then
    (the steps of a sequence build them once and back-propagate through the build once; each
    step's products are a few small GEMMs). In float32 on the CPU, with each matrix KCP, dense
    or another format's chain on a few rows (:func:`_chained`) and a narrow input, the whole
    step is one node on the compiled kernels (:func:`_compiled_step`). ``None`` where this
    does not apply: no KCP matrix nor a chain that runs in the compiled step, a projection, no
    gradient recorded, or no sharing (:func:`_sharing`)."""
    ih, hh = _matrices(cell)
    if cell.weight_hr is not None or not torch.is_grad_enabled() or not _sharing():
        return None
    kron = _shares_kron(ih) or _shares_kron(hh)
    if not (kron or _chained(ih, x.shape[0]) or _chained(hh, x.shape[0])):
        return None
    key = _grad_key(cell)
    compiled = _compiled_step(cell, ih, hh, x, state, key)
    if compiled is not None or not kron:
        return compiled
    found = cell._kept.get("shared products")
    if found is None or found[0] != key:
        cell._kept.pop("shared products", None)
        found = cell._kept["shared products"] = (key, (_kron_product(ih), _kron_product(hh)))
    ih_product, hh_product = found[1]
    bias = cell._parameters
    if ih_product is None:
        gx = cell.input_projection(x)  # (b, G h)
    else:
        gx = ih_product(x)  # (b, G h)
        if bias["bias_ih"] is not None:
            gx = gx + bias["bias_ih"]
    product = hh if hh_product is None else hh_product
    if cell.mode == "LSTM":
        return lstm_step(gx, state[0], state[1], product, bias["bias_hh"])
    if cell.mode == "GRU":
        return (gru_step(gx, state[0], product, bias["bias_hh"]),)
    nonlinearity = getattr(cell, "nonlinearity", "tanh")
    return (rnn_step(gx, state[0], product, bias["bias_hh"], nonlinearity),)


def _chained(matrix: FactorizedMatrix, rows: int) -> bool:
    """Whether ``matrix``'s product on ``rows`` rows may run as its chain in the compiled
    training step (:class:`~kcprnn.rnn._cell_train.ChainOperand`;
    :meth:`~kcprnn.formats.FactorizedMatrix.chain_for`)."""
    return matrix.chain_for(rows, training=True) is not None


def _train_operand(matrix: FactorizedMatrix, shared: bool, rows: int) -> _cell_train.Operand | None:
    """``matrix`` for the compiled training step on ``rows`` rows: a KCP matrix's factor
    matrices, built inside the step's node where they are small (:func:`_builds_in_step`)
    unless ``shared``, else, for a lone step on a few rows, its chain where that costs less
    (:func:`~kcprnn.rnn._cell_train.step_chain`), else in a node the steps share
    (:func:`_shared`); a dense matrix's weight; another format's chain (TT, TR, CP, Tucker,
    BT, HT: :class:`~kcprnn.rnn._cell_train.ChainOperand`, which the step runs on at most
    :data:`~kcprnn.formats.CHAIN_ROWS` rows); ``None`` where none applies."""
    if _shares_kron(matrix):
        found = kron_layout_cached(matrix)
        assert found is not None
        layout = found[0]
        kcp: Any = matrix
        groups = [list(kcp.factors[n]) for n in layout.order]
        if not shared and _builds_in_step(groups):
            return _cell_train.Operand.built(groups, layout)
        if not shared and _cell_train.step_chain(matrix, groups, rows) is not None:
            chain = _cell_train.ChainOperand.of(matrix)
            if chain is not None:
                return chain
        return _cell_train.Operand(_shared(_kron_build, matrix), layout)
    if matrix.format_name == "dense":
        return _cell_train.Operand([dense_weight(matrix)], None)
    if matrix._algorithm != "dense":
        return _cell_train.ChainOperand.of(matrix)
    return None


def _builds_in_step(groups: Sequence[Sequence[Tensor]]) -> bool:
    """Whether a step's node builds a KCP matrix's factor matrices from ``groups`` (each
    Kronecker factor's CP factors) itself and back-propagates through the builds in its own
    backward: the factor kernel takes every one and their work (``P R J I`` each) is at most
    :data:`~kcprnn.rnn._cell_train.BUILD_IN_STEP` (each step pays it, where a shared build is
    paid once per backward pass)."""
    if not all(native_factor.applies(g) for g in groups):
        return False
    return sum(native_factor.work(g) for g in groups) <= _cell_train.BUILD_IN_STEP


def _compiled_step(
    cell: RNNCellBase,
    ih: FactorizedMatrix,
    hh: FactorizedMatrix,
    x: Tensor,
    state: State,
    key: tuple[Any, ...],
) -> State | None:
    """The step of :func:`shared_step` as one autograd node on the compiled kernels
    (:mod:`kcprnn.rnn._cell_train`) where each matrix is KCP, dense or another format's chain
    on a few rows (:func:`_train_operand`), the input at most
    :data:`~kcprnn.rnn._cell_train.MAX_INPUT` wide, and every tensor float32 on the CPU;
    ``None`` elsewhere. Its operands are made once per version of the weights (``key``);
    ``ih``, ``hh``: the cell's matrices (:func:`_matrices`)."""
    if ih.in_features > _cell_train.MAX_INPUT:
        return None
    bias = cell._parameters
    if not _cell_train.applies(x, *state, bias["bias_ih"], bias["bias_hh"]):
        return None
    found = cell._kept.get("compiled step")
    if found is None or found[0] != key:
        cell._kept.pop("compiled step", None)
        found = cell._kept["compiled step"] = (key, {})
    kept: dict[tuple[bool, int], Any] = found[1]
    # a step of a sequence with one backward shares the factor matrices' build (one build
    # backward for all steps); a step back-propagated on its own builds small ones in its node
    steps = marks(cell)
    shared = steps["pending"]
    rows = min(x.shape[0], CHAIN_ROWS + 1)  # the operands differ only up to CHAIN_ROWS rows
    operands: Any = kept.get((shared, rows))
    if operands is None:
        a, b = _train_operand(ih, shared, rows), _train_operand(hh, shared, rows)
        runs = a is not None and b is not None and _cell_train.applies(*a.tensors, *b.tensors)
        operands = kept[(shared, rows)] = (a, b) if runs else False
    if operands is False:
        return None
    ih_op, hh_op = operands
    if not (ih_op.takes(x.shape[0]) and hh_op.takes(x.shape[0])):
        return None
    mode = _mode(cell)
    out = _cell_train.step(mode, ih_op, hh_op, x, state, bias["bias_ih"], bias["bias_hh"], steps)
    steps["pending"] = True  # until the step's backward runs
    cell._kept["stepped"] = (key, (shared, ih_op, hh_op, mode))  # for remember_step
    return out


def _mode_key(cell: RNNCellBase) -> tuple[Any, ...] | None:
    """What kept dense weights depend on in the current autograd mode: the parameters' storage
    and version counters, and under autograd which of them need gradients; ``None`` where
    nothing is kept (under ``torch.func`` transforms)."""
    if not torch.is_grad_enabled():
        return (False, weights_key(cell))
    return (True, _grad_key(cell)) if _sharing() else None


def _is_kron(matrix: FactorizedMatrix) -> bool:
    """Whether the compiled step multiplies ``matrix`` as a Kronecker sum."""
    return matrix.format_name in ("kcp", "cp") and matrix.algorithm != "dense"


def _kron_args(matrix: FactorizedMatrix) -> KronArgs:
    found = kron_layout_cached(matrix)
    assert found is not None
    built = kron_terms(matrix, found[0])
    assert built is not None
    mats, layout = built
    return KronArgs([a.detach() for a in mats], *layout.indices(_CPU))


def _operand(matrix: FactorizedMatrix, role: str) -> KronArgs | Tensor | None:
    """How the compiled step reads ``matrix``: its Kronecker sum, its dense weight (the
    parameter itself for a dense matrix, else rebuilt), or ``None`` for an input matrix in
    another format (the step is given its product)."""
    if _is_kron(matrix):
        return _kron_args(matrix)
    if matrix.format_name == "dense" or role == "hh":
        return dense_weight(matrix).detach().contiguous()
    return None


def _mode(cell: RNNCellBase) -> str:
    if cell.mode == "RNN":
        return "RNN_RELU" if getattr(cell, "nonlinearity", "tanh") == "relu" else "RNN_TANH"
    return cell.mode


def native_applies(cell: RNNCellBase, dtype: torch.dtype, cpu: bool) -> bool:
    """Whether the compiled step runs ``cell``: a Kronecker sum (KCP, CP) for ``W_ih`` or
    ``W_hh`` (a cell without one keeps torch's cell or the formats' products), no projection,
    tensors of ``dtype`` on the CPU (``cpu``) in float32, the kernels built. Autograd is the
    caller's check."""
    return (
        cell.weight_hr is None
        and (_is_kron(cell.weight_hh) or _is_kron(cell.weight_ih))
        and dtype == torch.float32
        and cpu
        and native.available()
    )


def native_step(cell: RNNCellBase) -> CellStep:
    """The compiled step of ``cell``'s current weights, prepared once per version of them.
    Call only without autograd recording, where :func:`native_applies` holds."""
    key = weights_key(cell)
    cached = cell._native_cache
    if cached is None or cached[0] != key:
        with torch.no_grad():
            ih = _operand(cell.weight_ih, "ih")
            hh = _operand(cell.weight_hh, "hh")
            step = CellStep(
                _mode(cell),
                cell.hidden_size,
                cell.input_size,
                ih,
                cell.bias_ih,
                hh,  # type: ignore[arg-type]
                cell.bias_hh,
            )
        cached = cell._native_cache = (key, step)
    return cached[1]
