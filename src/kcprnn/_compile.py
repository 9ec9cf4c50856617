"""``torch.compile`` and ``torch.export`` support.

Under ``torch.compile`` (not exporting), a format's product and a fused recurrence run as opaque
custom operators (namespace ``kcprnn``): the compiler sees one node with a shape function
(``register_fake``) and a backward (``register_autograd``, itself a custom operator), and the
node runs the eager code (planner, tuned and compiled kernels) at run time. Inductor then compiles
only the graph around them, which takes seconds at any layer size.

- ``kcprnn::product(x, bias, params, key, out_features, need_grad, need_x)``:
  ``matrix(x, bias)`` for the :class:`~kcprnn.formats.FactorizedMatrix` registered under
  ``key``. Without gradients it runs without autograd (the inference plan, with its cached
  small matrices); with them it runs the eager training product under autograd from fresh
  leaves and keeps that autograd graph under a token (its second output), which the backward
  ``kcprnn::product_backward`` differentiates: the compiled training step does the eager
  forward and backward work, no more. A graph not kept (a second backward, or more than
  :data:`_KEEP_LIMIT` forwards awaiting their backward) is recomputed.
- ``kcprnn::recurrence(gates_x, h0, c0, bias, weight, mode, reverse, relu, needs)``:
  :func:`~kcprnn.rnn.fused_sequence` with a dense recurrent weight, its graph kept the same
  way for ``kcprnn::recurrence_backward`` (the hand-written backward through time).
- ``kcprnn::rnn``: a whole recurrent module's eager forward (:mod:`kcprnn._compile_module`);
  ``kcprnn::layer_kcp`` (:mod:`kcprnn._compile_kcp`, :mod:`kcprnn._compile_layer`) a
  direction's KCP walk and fused recurrence where eager runs every layer so, its small
  matrices built in the graph and its bodies called without autograd.

The operators' inputs are saved for the backward, so the compiled graph keeps them alive and
unchanged while a kept graph reads them.

``key`` names a live module (:func:`module_key`, evaluated once while tracing); the module's
parameters are passed too, so that the graph depends on them and the gradients reach them.

Under ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``) nothing opaque is
used: a KCP product is its Kronecker factors applied in turn by batched matmuls, any other
format's ``F.linear`` on the matrix rebuilt from its factors inside the graph
(:func:`exported_product`), so the factors are the stored weights; recurrent layers step
through time in plain operators (:func:`compiled_route`).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .formats import FactorizedMatrix
    from .rnn.cells import RNNCellBase

__all__ = [
    "compiled_product",
    "compiled_recurrence",
    "compiled_route",
    "exported_product",
    "module_key",
]

_MODULES: dict[int, weakref.ref[nn.Module]] = {}


@torch.compiler.assume_constant_result
def module_key(module: nn.Module) -> int:
    """An integer naming ``module`` for the custom operators, registered weakly. Evaluated once
    while tracing (its result is a constant of the graph, guarded by the module itself)."""
    key = id(module)
    ref = _MODULES.get(key)
    if ref is None or ref() is not module:
        for k in [k for k, r in _MODULES.items() if r() is None]:
            del _MODULES[k]
        _MODULES[key] = weakref.ref(module)
    return key


def _module(key: int) -> Any:
    ref = _MODULES.get(key)
    module = None if ref is None else ref()
    if module is None:
        raise RuntimeError(
            f"kcprnn custom operator: no live module under key={key} (the compiled graph "
            "outlived the module it was traced from)"
        )
    return module


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


@contextmanager
def _parameters(
    module: nn.Module, params: Sequence[Tensor], swap: bool = False
) -> Iterator[nn.Module]:
    """``module`` computing with ``params`` (in ``module.parameters()`` order): the module
    itself where they are its own parameters (same memory) and not ``swap``, else with them
    swapped in for the duration."""
    own = list(module.parameters())
    if len(own) != len(params):
        raise ValueError(
            f"{type(module).__name__} has {len(own)} parameters, got {len(params)} tensors"
        )
    if not swap and all(_same(a, b) for a, b in zip(own, params, strict=True)):
        yield module
        return
    names = [name for name, _ in module.named_parameters()]
    with torch.nn.utils.stateless._reparametrize_module(
        module, dict(zip(names, params, strict=True))
    ):
        yield module


_AUTOGRAD_KEYS = [
    getattr(torch._C.DispatchKey, name)
    for name in ("Autograd", "AutogradFunctionality", "AutogradNestedTensor", "AutogradOther")
    if hasattr(torch._C.DispatchKey, name)
]


@contextmanager
def _autograd() -> Iterator[None]:
    """Autograd recording inside an operator's kernel, which the dispatcher runs with the
    autograd keys excluded (a backward operator recomputes its forward under autograd)."""
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in _AUTOGRAD_KEYS]
    for k in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k, was in zip(_AUTOGRAD_KEYS, excluded, strict=True):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, was)


def _storages(inputs: Sequence[Tensor | None]) -> set[int]:
    """The addresses of the storages of ``inputs`` (for :func:`_fresh`)."""
    return {i.untyped_storage().data_ptr() for i in inputs if i is not None}


def _fresh(t: Tensor, inputs: Sequence[Tensor | None] | set[int]) -> Tensor:
    """``t`` contiguous and sharing no memory with ``inputs`` (tensors, or their
    :func:`_storages`): custom operators may not return views of their inputs."""
    t = t.contiguous()
    storages = inputs if isinstance(inputs, set) else _storages(inputs)
    if t.untyped_storage().data_ptr() in storages:
        t = t.clone()
    return t


# --- autograd graphs kept from a forward operator for its backward ----------------------------

_KEPT: OrderedDict[int, Any] = OrderedDict()
_KEEP_LIMIT = 64
_TOKENS = itertools.count(1)


def _keep(outputs: Sequence[Tensor], wrt: Sequence[Tensor]) -> Tensor:
    """Keep the autograd graph from ``wrt`` to ``outputs`` for the backward operator; returns
    its token (a 0-d int64 tensor, an output of the forward operator). The graph is dropped
    with the token (when the autograd graph that saved it is freed), and at most
    :data:`_KEEP_LIMIT` are kept (the oldest are dropped: their backward recomputes)."""
    return _keep_state((outputs, wrt))


def _keep_state(state: Any) -> Tensor:
    """:func:`_keep` for any ``state`` the backward operator needs (its token)."""
    token = next(_TOKENS)
    _KEPT[token] = state
    while len(_KEPT) > _KEEP_LIMIT:
        _KEPT.popitem(last=False)
    value = torch.tensor(token)
    weakref.finalize(value, _KEPT.pop, token, None)  # a forward whose backward never comes
    return value


def _take(token: Tensor) -> Any:
    """What is kept under ``token`` (:func:`_keep`, :func:`_keep_state`), removed (a second
    backward recomputes), or ``None``."""
    value = int(token)
    return _KEPT.pop(value, None) if value else None


def _no_token() -> Tensor:
    return torch.tensor(0)


def _grads(
    outputs: Sequence[Tensor], wrt: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence
) -> list[Tensor]:
    chosen = [w for w in wrt if w.requires_grad]  # zeros for the others
    with _autograd():
        found = iter(torch.autograd.grad(outputs, chosen, grads, allow_unused=True))
    storages = _storages(inputs)
    out = []
    for w in wrt:
        g = next(found) if w.requires_grad else None
        out.append(torch.zeros_like(w) if g is None else _fresh(g, storages))
    return out


# --- the product of a format ---------------------------------------------------------------


def _product_graph(
    matrix: Any, x: Tensor, bias: Tensor | None, params: Sequence[Tensor], need_x: bool
) -> tuple[Tensor, list[Tensor]]:
    """``matrix(x, bias)`` under autograd from fresh leaves (the training plan): the output
    and the leaves (``x`` first where ``need_x``, then ``params``); ``bias`` is a constant."""
    own = list(matrix.parameters())
    with _autograd():
        x_leaf = x.detach().requires_grad_(need_x)
        bias = None if bias is None else bias.detach()
        if len(own) == len(params) and all(
            a.requires_grad and _same(a, b) for a, b in zip(own, params, strict=True)
        ):  # the module's own parameters: differentiated where they are (no swap)
            out, leaves = matrix(x_leaf, bias), own  # (b, j)
        else:
            leaves = [p.detach().requires_grad_(True) for p in params]
            with _parameters(matrix, leaves, swap=True) as m:
                out = m(x_leaf, bias)  # (b, j)
    return out, ([x_leaf] if need_x else []) + leaves


@torch.library.custom_op("kcprnn::product", mutates_args=())
def _product(
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    key: int,
    out_features: int,
    need_grad: bool,
    need_x: bool,
) -> tuple[Tensor, Tensor]:
    matrix = _module(key)
    if need_grad:
        out, wrt = _product_graph(matrix, x, bias, params, need_x)
        # the kept graph needs ``out`` only as its root: a linear map's autograd graph does
        # not save its own result, so the returned tensor may share its memory
        return _fresh(out.detach(), [x, bias, *params]), _keep([out], wrt)
    with torch.no_grad(), _parameters(matrix, params) as m:
        out = m(x, bias)  # (b, j)
    return _fresh(out, [x, bias, *params]), _no_token()


@_product.register_fake
def _product_fake(
    x: Tensor,
    bias: Tensor | None,
    params: list[Tensor],
    key: int,
    out_features: int,
    need_grad: bool,
    need_x: bool,
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], out_features), x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("kcprnn::product_backward", mutates_args=())
def _product_backward(
    grad: Tensor, token: Tensor, x: Tensor, params: list[Tensor], key: int, need_x: bool
) -> list[Tensor]:
    kept = _take(token)
    if kept is None:  # no graph kept: recompute the product under autograd
        out, wrt = _product_graph(_module(key), x, None, params, need_x)
        kept = ([out], wrt)
    return _grads(kept[0], kept[1], [grad], [grad, x, *params])


@_product_backward.register_fake
def _product_backward_fake(
    grad: Tensor, token: Tensor, x: Tensor, params: list[Tensor], key: int, need_x: bool
) -> list[Tensor]:
    return ([torch.empty_like(x)] if need_x else []) + [torch.empty_like(p) for p in params]


def _product_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, bias, params, key, _, _, need_x = inputs
    # the inputs are kept alive (and unchanged) for the backward: the kept graph reads them
    ctx.save_for_backward(x, output[1], *params)
    ctx.key = key
    ctx.need_x = need_x
    ctx.has_bias = bias is not None


def _product_grad(ctx: Any, grad: Tensor, _token_grad: Any) -> tuple[Any, ...]:
    x, token, *params = ctx.saved_tensors
    need_x = bool(ctx.need_x and ctx.needs_input_grad[0])
    grads = _product_backward(grad.contiguous(), token, x, params, ctx.key, bool(ctx.need_x))
    grad_x = grads[0] if need_x else None
    grad_params = grads[1:] if ctx.need_x else grads
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
    return grad_x, grad_bias, grad_params, None, None, None, None


_product.register_autograd(_product_grad, setup_context=_product_setup)


def compiled_product(matrix: FactorizedMatrix, rows: Tensor, bias: Tensor | None) -> Tensor:
    """``matrix(rows, bias)`` for 2-D ``rows`` as one ``kcprnn::product`` node (under
    ``torch.compile``)."""
    params = list(matrix.parameters())
    need_x = rows.requires_grad
    need_grad = torch.is_grad_enabled() and (
        need_x or any(p.requires_grad for p in params) or (bias is not None and bias.requires_grad)
    )
    key = module_key(matrix)
    out, _ = _product(rows, bias, params, key, matrix.out_features, need_grad, need_x)
    return out  # (b, j)


def exported_product(matrix: FactorizedMatrix, rows: Tensor, bias: Tensor | None) -> Tensor:
    """``matrix(rows, bias)`` in plain operators (under ``torch.export``), computed from the
    factors in the graph so that an exported program stores the factors, not ``W``: a KCP
    matrix by :func:`_kcp_structured`, any other through ``F.linear`` on ``to_dense()``."""
    from .formats.kcp import KCPMatrix

    if isinstance(matrix, KCPMatrix) and matrix.algorithm != "dense":
        out = _kcp_structured(matrix._factor_list(), rows)  # (b, j)
        return out if bias is None else out + bias
    return F.linear(rows, matrix.to_dense(), bias)  # (b, j)


def _kcp_structured(factors: Sequence[Sequence[Tensor]], x: Tensor) -> Tensor:
    """A KCP product in plain operators: each Kronecker factor ``A_p^(n)`` ``(P, J^(n),
    I^(n))`` built from its CP factors, then applied to its axes of the input, last factor
    first, one batched matmul each (:mod:`kcprnn.formats.kcp` gives the index orders)."""
    from .formats.kcp.algebra import factor_dense

    num_n, num_d = len(factors), len(factors[0])
    ins = [[factors[n][d].shape[3] for d in range(num_d)] for n in range(num_n)]
    outs = [[factors[n][d].shape[2] for d in range(num_d)] for n in range(num_n)]
    b = x.shape[0]
    # mode-major, factor-minor input axes -> factor-major (b, I^(1), ..., I^(N))
    z = x.reshape(b, *[ins[n][d] for d in range(num_d) for n in range(num_n)])
    z = z.permute(0, *[1 + d * num_n + n for n in range(num_n) for d in range(num_d)])
    sizes = [math.prod(s) for s in ins]
    z = z.reshape(1, b, math.prod(sizes[:-1]), sizes[-1], 1)  # (P', b, pre, I^(n), post)
    for n in reversed(range(num_n)):
        a = factor_dense(factors[n])  # (P, J^(n), I^(n))
        terms, j_n, i_n = a.shape
        p_z, _, pre, _, post = z.shape
        y = z.permute(0, 1, 2, 4, 3).reshape(p_z, b * pre * post, i_n)
        y = torch.matmul(y, a.transpose(1, 2))  # (P, b pre post, J^(n))
        y = y.reshape(terms, b, pre, post, j_n).permute(0, 1, 2, 4, 3)  # (P, b, pre, J, post)
        if n > 0:
            z = y.reshape(terms, b, pre // sizes[n - 1], sizes[n - 1], j_n * post)
        else:
            z = y.reshape(terms, b, j_n * post)
    out = z.sum(0)  # (b, J^(1) ... J^(N)), factor-major
    out = out.reshape(b, *[outs[n][d] for n in range(num_n) for d in range(num_d)])
    out = out.permute(0, *[1 + n * num_d + d for d in range(num_d) for n in range(num_n)])
    return out.reshape(b, -1)  # (b, j)


# --- the fused recurrences -----------------------------------------------------------------


def _run_fused(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    from .rnn.fused import fused_sequence

    state = (h0,) if c0 is None else (h0, c0)
    nonlinearity = "relu" if relu else "tanh"
    return fused_sequence(mode, gates_x, state, [weight], bias, reverse, None, nonlinearity)


def _recurrence_graph(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    needs: Sequence[bool],
) -> tuple[list[Tensor], list[Tensor]]:
    """The fused sequence under autograd from fresh leaves: its outputs ``(out, h_n[, c_n])``
    and the leaves ``(gates_x, h0, weight[, c0][, bias])``, each requiring a gradient where
    ``needs`` says (in that order: the fused backward skips work for the others)."""
    need = iter(needs)
    with _autograd():
        leaves = [t.detach().requires_grad_(next(need)) for t in (gates_x, h0, weight)]
        c_leaf = None if c0 is None else c0.detach().requires_grad_(next(need))
        b_leaf = None if bias is None else bias.detach().requires_grad_(next(need))
        out, final = _run_fused(
            leaves[0], leaves[1], c_leaf, b_leaf, leaves[2], mode, reverse, relu
        )
    wrt = [*leaves, *(t for t in (c_leaf, b_leaf) if t is not None)]
    return [out, *final], wrt


@torch.library.custom_op("kcprnn::recurrence", mutates_args=())
def _recurrence(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if any(needs):
        outs, wrt = _recurrence_graph(gates_x, h0, c0, bias, weight, mode, reverse, relu, needs)
        token = _keep(outs, wrt)
        out, h = (
            outs[0].detach().clone(memory_format=torch.contiguous_format),
            outs[1].detach().clone(memory_format=torch.contiguous_format),
        )
        c = (
            outs[2].detach().clone(memory_format=torch.contiguous_format)
            if c0 is not None
            else h0.new_empty(0)
        )
        return out, h, c, token
    with torch.no_grad():
        out, final = _run_fused(gates_x, h0, c0, bias, weight, mode, reverse, relu)
    out = _fresh(out, [gates_x, h0, c0, bias, weight])
    c = final[1].clone() if c0 is not None else h0.new_empty(0)
    return out, final[0].clone(), c, _no_token()


@_recurrence.register_fake
def _recurrence_fake(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = gates_x.new_empty(gates_x.shape[0], h0.shape[1])
    c = torch.empty_like(c0) if c0 is not None else h0.new_empty(0)
    return out, torch.empty_like(h0), c, h0.new_empty((), dtype=torch.int64)


@torch.library.custom_op("kcprnn::recurrence_backward", mutates_args=())
def _recurrence_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    needs: list[bool],
) -> list[Tensor]:
    kept = _take(token)
    if kept is None:  # no graph kept: run the sequence again under autograd
        kept = _recurrence_graph(gates_x, h0, c0, bias, weight, mode, reverse, relu, needs)
    outs, wrt = kept
    grads = [grad_out, grad_h] + ([grad_c] if grad_c is not None else [])
    inputs = [grad_out, grad_h, grad_c, gates_x, h0, c0, bias, weight]
    return _grads(outs[: len(grads)], wrt, grads, inputs)


@_recurrence_backward.register_fake
def _recurrence_backward_fake(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    token: Tensor,
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
    needs: list[bool],
) -> list[Tensor]:
    wrt = [gates_x, h0, weight, *(t for t in (c0, bias) if t is not None)]
    return [torch.empty_like(t) for t in wrt]


def _recurrence_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    gates_x, h0, c0, bias, weight, mode, reverse, relu, needs = inputs
    # the inputs are kept alive (and unchanged) for the backward: the kept graph reads them
    ctx.save_for_backward(gates_x, h0, c0, bias, weight, output[3])
    ctx.options = (mode, reverse, relu, needs)
    ctx.has_c, ctx.has_bias = c0 is not None, bias is not None


def _recurrence_grad(
    ctx: Any, grad_out: Tensor, grad_h: Tensor, grad_c: Tensor, _token_grad: Any
) -> tuple:
    gates_x, h0, c0, bias, weight, token = ctx.saved_tensors
    grad_out = torch.zeros_like(gates_x[:, : h0.shape[1]]) if grad_out is None else grad_out
    grad_h = torch.zeros_like(h0) if grad_h is None else grad_h
    if ctx.has_c:
        grad_c = torch.zeros_like(c0) if grad_c is None else grad_c
    grads = _recurrence_backward(
        grad_out.contiguous(),
        grad_h.contiguous(),
        grad_c.contiguous() if ctx.has_c else None,
        token,
        gates_x,
        h0,
        c0,
        bias,
        weight,
        *ctx.options,
    )
    g_gates, g_h0, g_weight, *rest = grads
    g_c0 = rest.pop(0) if ctx.has_c else None
    g_bias = rest.pop(0) if ctx.has_bias else None
    return g_gates, g_h0, g_c0, g_bias, g_weight, None, None, None, None


_recurrence.register_autograd(_recurrence_grad, setup_context=_recurrence_setup)


def compiled_recurrence(
    mode: str,
    gates_x: Tensor,
    state: tuple[Tensor, ...],
    weight: Tensor,
    bias: Tensor | None,
    reverse: bool,
    nonlinearity: str,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:func:`~kcprnn.rnn.fused_sequence` with the dense recurrent ``weight`` as one
    ``kcprnn::recurrence`` node (under ``torch.compile``); same arguments and results."""
    c0 = state[1] if mode == "LSTM" else None
    tensors = [gates_x, state[0], weight, *(t for t in (c0, bias) if t is not None)]
    grad = torch.is_grad_enabled()
    needs = [grad and t.requires_grad for t in tensors]
    relu = nonlinearity == "relu"
    out, h, c, _ = _recurrence(gates_x, state[0], c0, bias, weight, mode, reverse, relu, needs)
    return out, ((h, c) if mode == "LSTM" else (h,))


def compiled_route(cells: Sequence[RNNCellBase], equal_lengths: bool) -> str:
    """The route a recurrent layer runs while traced: the fused ``kcprnn::recurrence``
    (``"dense"``) where it applies (sequences of equal length, no LSTM projection), else one
    step at a time (``"steps"``). Under ``torch.export`` :func:`~kcprnn.rnn.run_layer` steps
    through time in plain operators either way (the input product in its format, then the
    recurrence unrolled over the example's steps on ``W_hh`` rebuilt once)."""
    if equal_lengths and cells[0].weight_hr is None:
        return "dense"
    return "steps"
