"""``torch.compile`` and ``torch.export`` support.

Under ``torch.compile`` (not exporting), a format's product and a fused recurrence run as opaque
custom operators (namespace ``kcprnn``): the compiler sees one node with a shape function
(``register_fake``) and a backward (``register_autograd``, itself a custom operator), and the
node runs the eager code (planner, tuned and compiled kernels) at run time. Inductor then compiles
only the graph around them, which takes seconds at any layer size.

- ``kcprnn::product(x, bias, params, key, out_features)``: ``matrix(x, bias)`` for the
  :class:`~kcprnn.formats.FactorizedMatrix` registered under ``key``, run without autograd
  (the inference plan, with its cached small matrices). Its backward
  ``kcprnn::product_backward`` runs the product again with autograd (the training plan) and
  differentiates it: a compiled training step costs one more forward product than eager.
- ``kcprnn::recurrence(gates_x, h0, c0, bias, weight, mode, reverse, relu)``:
  :func:`~kcprnn.rnn.fused_sequence` with a dense recurrent weight; its backward
  ``kcprnn::recurrence_backward`` runs the sequence again and its hand-written backward through
  time.

``key`` names a live module (:func:`module_key`, evaluated once while tracing); the module's
parameters are passed too, so that the graph depends on them and the gradients reach them.

Under ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``) nothing opaque is
used: a product is ``F.linear`` on the matrix rebuilt from its factors inside the graph
(:func:`exported_product`), so the factors are the stored weights, and recurrent layers run
torch's own recurrence on rebuilt weights (:func:`compiled_route`).
"""

from __future__ import annotations

import weakref
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
    names = [name for name, _ in module.named_parameters()]
    own = [p for _, p in module.named_parameters()]
    if len(names) != len(params):
        raise ValueError(
            f"{type(module).__name__} has {len(names)} parameters, got {len(params)} tensors"
        )
    if not swap and all(_same(a, b) for a, b in zip(own, params, strict=True)):
        yield module
        return
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


def _fresh(t: Tensor, inputs: Sequence[Tensor | None]) -> Tensor:
    """``t`` contiguous and sharing no memory with ``inputs`` (custom operators may not return
    views of their inputs)."""
    t = t.contiguous()
    ptr = t.untyped_storage().data_ptr()
    if any(i is not None and i.untyped_storage().data_ptr() == ptr for i in inputs):
        t = t.clone()
    return t


# --- the product of a format ---------------------------------------------------------------


@torch.library.custom_op("kcprnn::product", mutates_args=())
def _product(
    x: Tensor, bias: Tensor | None, params: list[Tensor], key: int, out_features: int
) -> Tensor:
    matrix = _module(key)
    with torch.no_grad(), _parameters(matrix, params) as m:
        out = m(x, bias)  # (b, j)
    return _fresh(out, [x, bias, *params])


@_product.register_fake
def _product_fake(
    x: Tensor, bias: Tensor | None, params: list[Tensor], key: int, out_features: int
) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("kcprnn::product_backward", mutates_args=())
def _product_backward(
    grad: Tensor, x: Tensor, params: list[Tensor], key: int, need_x: bool
) -> list[Tensor]:
    matrix = _module(key)
    with _autograd():
        x_leaf = x.detach().requires_grad_(need_x)
        leaves = [p.detach().requires_grad_(True) for p in params]
        with _parameters(matrix, leaves, swap=True) as m:
            out = m(x_leaf)  # (b, j)
        wrt = ([x_leaf] if need_x else []) + leaves
        grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    return [
        torch.zeros_like(w) if g is None else _fresh(g, [grad, x, *params])
        for g, w in zip(grads, wrt, strict=True)
    ]


@_product_backward.register_fake
def _product_backward_fake(
    grad: Tensor, x: Tensor, params: list[Tensor], key: int, need_x: bool
) -> list[Tensor]:
    return ([torch.empty_like(x)] if need_x else []) + [torch.empty_like(p) for p in params]


def _product_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, bias, params, key, _ = inputs
    ctx.save_for_backward(x, *params)
    ctx.key = key
    ctx.has_bias = bias is not None


def _product_grad(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, *params = ctx.saved_tensors
    need_x = bool(ctx.needs_input_grad[0])
    grads = _product_backward(grad.contiguous(), x, params, ctx.key, need_x)
    grad_x = grads[0] if need_x else None
    grad_params = grads[1:] if need_x else grads
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
    return grad_x, grad_bias, grad_params, None, None


_product.register_autograd(_product_grad, setup_context=_product_setup)


def compiled_product(matrix: FactorizedMatrix, rows: Tensor, bias: Tensor | None) -> Tensor:
    """``matrix(rows, bias)`` for 2-D ``rows`` as one ``kcprnn::product`` node (under
    ``torch.compile``)."""
    params = list(matrix.parameters())
    return _product(rows, bias, params, module_key(matrix), matrix.out_features)  # (b, j)


def exported_product(matrix: FactorizedMatrix, rows: Tensor, bias: Tensor | None) -> Tensor:
    """``matrix(rows, bias)`` in plain operators (under ``torch.export``): ``F.linear`` on the
    matrix rebuilt from its factors in the graph, so that an exported program stores the
    factors, not ``W``."""
    return F.linear(rows, matrix.to_dense(), bias)  # (b, j)


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
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        out, final = _run_fused(gates_x, h0, c0, bias, weight, mode, reverse, relu)
    inputs = [gates_x, h0, c0, bias, weight]
    out = _fresh(out, inputs)
    h = final[0].clone()
    c = final[1].clone() if c0 is not None else h0.new_empty(0)
    return out, h, c


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
) -> tuple[Tensor, Tensor, Tensor]:
    out = gates_x.new_empty(gates_x.shape[0], h0.shape[1])
    c = torch.empty_like(c0) if c0 is not None else h0.new_empty(0)
    return out, torch.empty_like(h0), c


@torch.library.custom_op("kcprnn::recurrence_backward", mutates_args=())
def _recurrence_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
) -> list[Tensor]:
    with _autograd():
        leaves = [t.detach().requires_grad_(True) for t in (gates_x, h0, weight)]
        c_leaf = None if c0 is None else c0.detach().requires_grad_(True)
        b_leaf = None if bias is None else bias.detach().requires_grad_(True)
        out, final = _run_fused(
            leaves[0], leaves[1], c_leaf, b_leaf, leaves[2], mode, reverse, relu
        )
        outs = [out, final[0]]
        grads_in = [grad_out, grad_h]
        if c_leaf is not None and grad_c is not None:
            outs.append(final[1])
            grads_in.append(grad_c)
        wrt = [*leaves, *(t for t in (c_leaf, b_leaf) if t is not None)]
        grads = torch.autograd.grad(outs, wrt, grads_in, allow_unused=True)
    inputs = [grad_out, grad_h, grad_c, gates_x, h0, c0, bias, weight]
    return [
        torch.zeros_like(w) if g is None else _fresh(g, inputs)
        for g, w in zip(grads, wrt, strict=True)
    ]


@_recurrence_backward.register_fake
def _recurrence_backward_fake(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor | None,
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    bias: Tensor | None,
    weight: Tensor,
    mode: str,
    reverse: bool,
    relu: bool,
) -> list[Tensor]:
    wrt = [gates_x, h0, weight, *(t for t in (c0, bias) if t is not None)]
    return [torch.empty_like(t) for t in wrt]


def _recurrence_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    gates_x, h0, c0, bias, weight, mode, reverse, relu = inputs
    ctx.save_for_backward(gates_x, h0, c0, bias, weight)
    ctx.options = (mode, reverse, relu)
    ctx.has_c, ctx.has_bias = c0 is not None, bias is not None


def _recurrence_grad(ctx: Any, grad_out: Tensor, grad_h: Tensor, grad_c: Tensor) -> tuple:
    gates_x, h0, c0, bias, weight = ctx.saved_tensors
    grad_out = torch.zeros_like(gates_x[:, : h0.shape[1]]) if grad_out is None else grad_out
    grad_h = torch.zeros_like(h0) if grad_h is None else grad_h
    if ctx.has_c:
        grad_c = torch.zeros_like(c0) if grad_c is None else grad_c
    grads = _recurrence_backward(
        grad_out.contiguous(),
        grad_h.contiguous(),
        grad_c.contiguous() if ctx.has_c else None,
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
    return g_gates, g_h0, g_c0, g_bias, g_weight, None, None, None


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
    out, h, c = _recurrence(
        gates_x, state[0], c0, bias, weight, mode, reverse, nonlinearity == "relu"
    )
    return out, ((h, c) if mode == "LSTM" else (h,))


def compiled_route(cells: Sequence[RNNCellBase], equal_lengths: bool) -> str:
    """The route a recurrent layer runs while traced: torch's own recurrence on weights rebuilt
    from the factors under ``torch.export`` (plain operators, unrolled over the example's
    steps); otherwise the fused ``kcprnn::recurrence`` (``"dense"``) where it applies
    (sequences of equal length, no LSTM projection), else one step at a time (``"steps"``)."""
    if torch.compiler.is_exporting():
        return "torch"
    if equal_lengths and cells[0].weight_hr is None:
        return "dense"
    return "steps"
