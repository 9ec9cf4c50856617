"""One opaque ``torch.compile`` operator for a whole recurrent module: ``kcprnn::rnn``.

Under ``torch.compile`` a recurrent module (LSTM, GRU, RNN on unpacked input) is one node,
``kcprnn::rnn(x, h0, c0, params, key, needs)``, that runs the module's eager forward at run
time: the cost model picks each layer's route (torch's kernel, the fused loops, the structured
recurrences) and its input products as eager does, and the weights and plans eager keeps
between calls are reused, so the compiled module does the eager work plus the compiled graph's
own call. A cell with a factorized matrix is the same node around its eager step
(:func:`compiles_opaque`). The one exception is a module whose every layer eager runs as a KCP
walk into the fused dense loop (:func:`walks_every_layer`, the wide inputs of video): it keeps
the per-direction ``kcprnn::layer_kcp`` operators of :mod:`kcprnn._compile_layer`, whose
compiled forms skip work that eager does.

With gradients the operator keeps the eager autograd graph under a token (its fourth output)
for ``kcprnn::rnn_backward``, which differentiates it; a graph not kept is recomputed, with the
random state the forward started from (its fifth output, empty unless dropout runs between
layers) so that the dropout masks are the same.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._compile import (
    _autograd,
    _fresh,
    _keep,
    _module,
    _no_token,
    _parameters,
    _same,
    _storages,
    _take,
    module_key,
)

if TYPE_CHECKING:
    from .rnn.cells import RNNCellBase
    from .rnn.recurrent import RNNBase

__all__ = ["compiled_module", "compiles_opaque", "walks_every_layer"]


def walks_every_layer(module: RNNBase, batch: Any, steps: Any, training: bool) -> bool:
    """Whether eager runs every layer of ``module`` (``batch`` sequences of ``steps`` steps)
    on the fused dense loop over a KCP input product by its sequential walk, the layers
    :func:`~kcprnn._compile_layer.compiled_layer` compiles direction by direction.
    While tracing it is a constant of the graph: the plans are eager's, made once and not
    traced (a setting changed after compiling, such as ``module.recurrence``, does not retrace;
    either way the module computes the same)."""
    if not (_static(batch) and _static(steps)):  # dynamic shapes
        return False
    # sizes known while tracing as Python integers (``int`` would keep dynamo's symbol)
    batch, steps = operator.index(batch), operator.index(steps)
    return _walks(module_key(module), batch * steps, steps, training, torch.is_grad_enabled())


def _static(n: Any) -> bool:
    """Whether the size ``n`` (a tensor's, as the graph received it) is a plain integer while
    tracing rather than a symbol (dynamo reports a symbolic size as an ``int`` to
    ``isinstance``)."""
    return statically_known_true(n == 1_000_003) or statically_known_true(n != 1_000_003)


@torch.compiler.assume_constant_result
def _walks(key: int, rows: int, steps: int, training: bool, grad: bool) -> bool:
    """:func:`walks_every_layer` for the module under ``key``, run as plain Python while
    tracing (``grad``: whether autograd records)."""
    from ._compile_kcp import _kcp_spec
    from ._compile_layer import fuses_layer
    from .rnn.plan import plan_layer

    module = _module(key)
    for layer in range(module.num_layers):
        cells = [module.cell(layer, d) for d in range(module.num_directions)]
        plan = plan_layer(module.recurrence, cells, rows, steps, True, training)
        if plan.route != "dense" or any(plan.dense_inputs):
            return False
        for cell in cells:
            need = grad and any(p.requires_grad for p in cell.weight_ih.parameters())
            if not fuses_layer(cell, "dense") or not _kcp_spec(
                cell.weight_ih, rows, need, not grad
            ):
                return False
    return True


def compiles_opaque(cell: RNNCellBase) -> bool:
    """Whether a cell step runs as one ``kcprnn::rnn`` while compiled (not exporting): where
    a matrix is factorized (a dense cell's torch ops are traced, which costs less per call
    than an opaque node)."""
    formats = {cell.weight_ih.format_name, cell.weight_hh.format_name}
    compiling = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
    return compiling and formats != {"dense"}


def compiled_module(
    module: RNNBase | RNNCellBase, input: Tensor, hx: tuple[Tensor, ...] | None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``module._forward(input, hx)`` as one ``kcprnn::rnn`` node (under ``torch.compile``):
    ``(output, (h_n[, c_n]))`` as eager returns them; for a cell, ``(empty, (h'[, c']))``.

    The parameters are the operator's inputs only where one takes a gradient: without, the
    graph does not depend on them (the kernel reads the module's own, or those
    ``torch.func.functional_call`` put in their place), so the compiled call neither guards
    nor checks them."""
    grad = torch.is_grad_enabled()
    params = list(module.parameters())
    if not (grad and any(p.requires_grad for p in params)):
        params = []
    h0 = None if hx is None else hx[0]
    c0 = None if hx is None or len(hx) < 2 else hx[1]
    needs = [grad and t is not None and t.requires_grad for t in (input, h0, c0, *params)]
    out, h, c, _, _ = torch.ops.kcprnn.rnn.default(input, h0, c0, params, module_key(module), needs)
    return out, ((h, c) if module.mode == "LSTM" else (h,))


# --- the operator's kernels ----------------------------------------------------------------


def _is_cell(module: Any) -> bool:
    from .rnn.cells import RNNCellBase

    return isinstance(module, RNNCellBase)


def _run(module: Any, x: Tensor, hx: tuple[Tensor, ...] | None) -> tuple[Any, tuple]:
    """The eager forward: ``(output, state)``, for a cell ``(None, state)``."""
    if _is_cell(module):
        return None, module._forward(x, hx)
    return module._forward(x, hx)


def _shapes(module: Any, x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The shapes of eager's ``output`` (none for a cell: ``(0,)``), ``h_n`` and ``c_n`` for
    input ``x``."""
    hidden = module.hidden_size
    out_size = module.proj_size or hidden
    if _is_cell(module):
        lead = tuple(x.shape[:-1])
        return (0,), (*lead, out_size), (*lead, hidden)
    k = module.num_layers * module.num_directions
    width = module.num_directions * out_size
    if x.dim() == 2:
        return (x.shape[0], width), (k, out_size), (k, hidden)
    batch = x.shape[0] if module.batch_first else x.shape[1]
    return (*x.shape[:2], width), (k, batch, out_size), (k, batch, hidden)


def _output(module: Any, x: Tensor, out: Tensor | None, shape: Sequence[int]) -> Tensor:
    """``out`` laid out as eager's output of a fused layer is (time-major rows, seen batch-first
    where the module is: the layout the fake kernel declares) and not a view (a view would
    make the compiled graph's output one, which may not be changed in place); a new tensor
    for ``None``; an empty one for a cell."""
    if _is_cell(module):
        return x.new_empty(0)
    if module.batch_first and x.dim() == 3:
        b, _, w = shape
        strides: tuple[int, ...] = (w, b * w, 1)
    else:
        strides = (shape[1], 1) if len(shape) == 2 else (shape[1] * shape[2], shape[2], 1)
    if out is None or out.stride() != strides:
        made = x.new_empty_strided(tuple(shape), strides)
        return made if out is None else made.copy_(out)
    if out._base is None:
        return out
    # the same memory, not a view
    alias = out.new_empty(0)
    return alias.set_(out.untyped_storage(), out.storage_offset(), out.shape, out.stride())


def _random_state(module: Any, x: Tensor, needs: Sequence[bool]) -> Tensor:
    """The random state a training forward starts from where dropout runs between layers
    (replayed by a recomputed forward), else an empty tensor."""
    dropout = getattr(module, "dropout", 0.0) and getattr(module, "num_layers", 1) > 1
    if any(needs) and module.training and dropout:
        if x.device.type == "cuda":
            return torch.cuda.get_rng_state(x.device)
        return torch.get_rng_state()
    return torch.empty(0, dtype=torch.uint8)


@contextmanager
def _replayed(state: Tensor, device: torch.device) -> Iterator[None]:
    """The random generator of ``device`` set to ``state`` (none if empty), restored after."""
    if state.numel() == 0:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _graph(
    module: Any,
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    params: Sequence[Tensor],
    needs: Sequence[bool],
) -> tuple[list[Tensor], list[Tensor], set[int]]:
    """The eager forward under autograd: its outputs ``(output, h_n[, c_n])`` (a cell's
    ``(h'[, c'])``), the tensors
    they are differentiated for (``needs`` order: ``x``, ``h0``, ``c0``, the parameters;
    only the needed ones) and the storages of the tensors its graph saves."""
    need_x, need_h0, need_c0, *need_params = needs
    with _autograd():
        x_leaf = x.detach().requires_grad_(need_x)
        h_leaf = None if h0 is None else h0.detach().requires_grad_(need_h0)
        c_leaf = None if c0 is None else c0.detach().requires_grad_(need_c0)
        saved: set[int] = set()

        def pack(t: Tensor) -> Tensor:  # what the graph saves for its backward
            saved.add(t.untyped_storage().data_ptr())
            return t

        own = list(module.parameters())
        if not params:  # none differentiated: the module's own
            leaves = own
        elif all(
            a.requires_grad == n and _same(a, b)
            for a, b, n in zip(own, params, need_params, strict=True)
        ):  # the module's own parameters: differentiated where they are (no swap)
            leaves = own
        else:
            leaves = [
                p.detach().requires_grad_(n) for p, n in zip(params, need_params, strict=True)
            ]
        hx = None if h_leaf is None else (h_leaf,) if c_leaf is None else (h_leaf, c_leaf)
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            _parameters(module, leaves, swap=leaves is not own),
        ):
            out, state = _run(module, x_leaf, hx)
    inputs = (x_leaf, h_leaf, c_leaf, *(leaves if params else ()))
    wrt = [t for t, n in zip(inputs, needs, strict=True) if n]
    outs = [*state] if out is None else [out, *state]
    return outs, [t for t in wrt if t is not None], saved


def _rnn(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    params: list[Tensor],
    key: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    module = _module(key)
    shape = _shapes(module, x)[0]
    rng = _random_state(module, x, needs)
    if any(needs):
        outs, wrt, saved = _graph(module, x, h0, c0, params, needs)
        token = _keep(outs, wrt)
        # the caller may change the outputs in place, which the compiled graph's version
        # counters do not catch: those the kept graph saved are returned as copies
        made: list[Any] = [None] * _is_cell(module) + [t.detach() for t in outs]
        fresh = [t is None or t.untyped_storage().data_ptr() not in saved for t in made]
        out = _output(module, x, made[0] if fresh[0] else None, shape)
        if not fresh[0]:
            out.copy_(made[0])
        h = made[1] if fresh[1] else made[1].clone()
        c = None if len(made) < 3 else made[2] if fresh[2] else made[2].clone()
    else:
        hx = None if h0 is None else (h0,) if c0 is None else (h0, c0)
        with torch.no_grad(), _parameters(module, params) if params else nullcontext():
            found, state = _run(module, x, hx)
        # the forward's results are computed (never views of its inputs)
        out = _output(module, x, found, shape)
        h, c = state[0].contiguous(), state[1].contiguous() if len(state) > 1 else None
        token = _no_token()
    return out, h, x.new_empty(0) if c is None else c, token, rng


def _rnn_fake(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    params: list[Tensor],
    key: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    module = _module(key)
    shape, h_shape, c_shape = _shapes(module, x)
    c = x.new_empty(c_shape) if module.mode == "LSTM" else x.new_empty(0)
    rng = torch.empty(_random_state(module, x, needs).numel(), dtype=torch.uint8)
    token = torch.empty((), dtype=torch.int64)
    return _output(module, x, None, shape), x.new_empty(h_shape), c, token, rng


# The backward kernels take the forward's arguments after the gradients, the token and the
# random state: ``args`` is ``(x, h0, c0, params, key, needs)``.


def _rnn_backward(
    grad_out: Tensor, grad_h: Tensor, grad_c: Tensor | None, token: Tensor, rng: Tensor, *args: Any
) -> list[Tensor]:
    x, h0, c0, params, key, needs = args
    kept = _take(token)
    if kept is None:  # none kept: run the forward again, from the same random state
        with _replayed(rng, x.device):
            kept = _graph(_module(key), x, h0, c0, params, needs)[:2]
    outs, wrt = kept
    grads = [] if _is_cell(_module(key)) else [grad_out]
    grads += [grad_h] + ([grad_c] if grad_c is not None else [])
    with _autograd():
        found = torch.autograd.grad(outs[: len(grads)], wrt, grads, allow_unused=True)
    storages = _storages([grad_out, grad_h, grad_c, x, h0, c0, *params])
    return [
        torch.zeros_like(w) if g is None else _fresh(g, storages)
        for g, w in zip(found, wrt, strict=True)
    ]


def _rnn_backward_fake(*args: Any) -> list[Tensor]:
    x, h0, c0, params, _, needs = args[5:]
    inputs = [x, h0, c0, *params]
    return [torch.empty_like(t) for t, n in zip(inputs, needs, strict=True) if n and t is not None]


class _RNN(torch.autograd.Function):
    """``kcprnn::rnn`` under autograd (its autograd kernel): the operator below autograd, its
    gradients by ``kcprnn::rnn_backward``."""

    @staticmethod
    def forward(ctx, x, h0, c0, key, needs, *params):
        with torch._C._AutoDispatchBelowAutograd():
            out, h, c, token, rng = torch.ops.kcprnn.rnn.default(
                x, h0, c0, list(params), key, needs
            )
        ctx.save_for_backward(x, h0, c0, token, rng, *params)
        ctx.key, ctx.needs = key, needs
        ctx.mark_non_differentiable(token, rng)
        return out, h, c, token, rng

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c, _token_grad, _rng_grad):
        x, h0, c0, token, rng, *params = ctx.saved_tensors
        lstm = _module(ctx.key).mode == "LSTM"
        grads = iter(
            torch.ops.kcprnn.rnn_backward.default(
                grad_out,
                grad_h,
                grad_c if lstm else None,
                token,
                rng,
                x,
                h0,
                c0,
                params,
                ctx.key,
                ctx.needs,
            )
        )
        inputs = [x, h0, c0, *params]
        out = [
            next(grads) if n and t is not None else None
            for t, n in zip(inputs, ctx.needs, strict=True)
        ]
        return (*out[:3], None, None, *out[3:])


def _rnn_autograd(
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    params: list[Tensor],
    key: int,
    needs: list[bool],
) -> Any:
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, h0, c0, *params):
        return _RNN.apply(x, h0, c0, key, needs, *params)
    if type(x) is Tensor and not any(needs):  # plain tensors, nothing differentiated
        return _rnn(x, h0, c0, params, key, needs)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.kcprnn.rnn.default(x, h0, c0, params, key, needs)


# Registered on a plain ``torch.library.Library``, as ``kcprnn::layer_kcp`` is (its wrappers
# cost less per call than ``torch.library.custom_op``'s).
_LIB = torch.library.Library("kcprnn", "FRAGMENT")
_ARGS = "Tensor x, Tensor? h0, Tensor? c0, Tensor[] params, int key, bool[] needs"
_LIB.define(f"rnn({_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define(
    f"rnn_backward(Tensor grad_out, Tensor grad_h, Tensor? grad_c, Tensor token, Tensor rng, "
    f"{_ARGS}) -> Tensor[]"
)
_LIB.impl("rnn", _rnn, "CompositeExplicitAutograd")
_LIB.impl("rnn", _rnn_autograd, "Autograd")
_LIB.impl("rnn_backward", _rnn_backward, "CompositeExplicitAutograd")
torch.library.register_fake("kcprnn::rnn", _rnn_fake, lib=_LIB)
torch.library.register_fake("kcprnn::rnn_backward", _rnn_backward_fake, lib=_LIB)
