"""One cell step under autograd as one node on the compiled kernels: both products (Kronecker
sums on the compiled product, dense matrices on MKL, the other formats' chains of
contractions on the chain kernel), the gate arithmetic and its backward in a few calls, for
float32 on the CPU.

Through torch operations a step of an LSTM cell with two Kronecker-sum matrices is about forty
small operators and as many autograd nodes, forward and backward (the products' gathers and
batched GEMMs, the gates' activations and products); here it is the two products and one
compiled call of the gate arithmetic (``kcprnn_*_forward_step`` of ``native_rnn.cpp``, the
step the whole recurrences run), and backward the compiled gate gradients, the transposed
products for the input and the state, and each factor matrix's gradient by
:func:`~kcprnn.rnn.kron.kron_grads`. A KCP matrix whose factor matrices are small enters the
node as its CP factors (:meth:`Operand.built`): the node builds the factor matrices itself and
back-propagates through the builds in its backward, at one row in one kernel call per matrix
(:class:`~kcprnn._cpu.native_factor.RowGrads`), so that a step with its own backward has no
node of the builds to run. A backward that records a graph (second derivatives) recomputes the
step on torch operations and differentiates that.

A TT, TR, CP, Tucker, BT or HT matrix on at most :data:`~kcprnn.formats.CHAIN_ROWS` rows enters
the node as its chain's tensors (:class:`ChainOperand`): one call of the chain kernel forward,
one backward for the rows' and every tensor's gradients (:mod:`kcprnn._cpu.native_chain`), so a
step with both matrices in those formats is one node of three kernel calls each way instead of
a chain node per matrix and the gate arithmetic's operators and nodes.

:class:`Operand` holds what a version of one weight needs (the products' compiled arguments,
the index orders), made once per version by the caller.

Shape comments: ``b`` rows, ``h`` hidden size, ``g`` gate rows (``4h``, ``3h`` or ``h``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._cpu import native, native_chain, native_factor
from ..formats import FactorizedMatrix
from ..formats._base import CHAIN_ROWS
from ..formats._chain import ChainPlan, chain_forward
from ..formats.kcp.algebra import factor_dense_torch
from ._fused_base import _Kron
from .kron import KronLayout, kron_apply
from .steps import gru_step, lstm_step, rnn_step

__all__ = [
    "BUILD_IN_STEP",
    "CHAIN_OVER_BUILD",
    "MAX_INPUT",
    "STEP_OPS",
    "ChainOperand",
    "Operand",
    "applies",
    "step",
    "step_chain",
]

MAX_INPUT = 4096
"""Widest input the compiled step takes: at the video size (57,600 inputs) the factor
gradients over the whole input row cost more than autograd's products there, and an Elman
cell's step with gradients ran a third slower (``kcprnn bench --points streaming``); at the
speech size (40 inputs) the step is where torch operations cost the most per MAC."""

BUILD_IN_STEP = 1 << 15
"""Largest work (``P R J I`` summed over a KCP matrix's Kronecker factors) whose factor matrices
a step's node builds and back-propagates itself (:meth:`Operand.built`); larger ones are built
once per version of the weights in a node of their own that the steps share."""

STEP_OPS = 3
"""Operations a compressed matrix's product launches in the compiled step with its factor
matrices built in the node, forward and backward, as the cell's route prices them
(:func:`kcprnn.rnn._cell_route.cell_trains_dense`): its product, its transposed product and its
gradients' kernel, against about 16 on torch operations. At 40 -> 512, batch 1, it sends
an LSTM, GRU or Elman cell with a rank-4 KCP ``W_ih`` and a dense ``W_hh`` to the compiled
step instead of rebuilding ``W_ih`` dense at every step, which took 10-50 % longer there
(``benchmarks/results/recurrence/lone-step-builds/``)."""


CHAIN_OVER_BUILD = 2
"""How many times fewer multiply-adds a KCP matrix's chain must cost than building its factor
matrices for a lone step to run the chain (:func:`step_chain`): the chain's batched products of
a few elements run at about half the rate or less of the builds' GEMMs. At 40 -> 512, batch 1,
the default budgets' chains (2.9-9x fewer) made the LSTM, GRU and Elman steps with both
matrices in KCP 1.4-1.8x faster; a rank-64 ``W_ih``'s (1.15x fewer) made the LSTM step 16 %
slower than its build (``benchmarks/results/recurrence/kcp-chain/``)."""


def step_chain(
    matrix: FactorizedMatrix, groups: Sequence[Sequence[Tensor]], rows: int
) -> ChainPlan | None:
    """The chain a lone training step on ``rows`` rows runs for a KCP ``matrix`` instead of
    building its factor matrices from ``groups`` (each Kronecker factor's CP factors) in a node
    of their own: its chain in training (:meth:`~kcprnn.formats.FactorizedMatrix.chain_for`)
    where that costs :data:`CHAIN_OVER_BUILD` times fewer multiply-adds than the builds' work
    (``P R J I`` each); else ``None``."""
    chain = matrix.chain_for(rows, training=True)
    work = sum(native_factor.work(g) for g in groups)
    if chain is None or CHAIN_OVER_BUILD * chain.macs(rows) >= work:
        return None
    return chain


class Operand:
    """One weight of a cell step: a Kronecker sum (its factor matrices ``tensors`` with their
    ``layout``) or a dense matrix (``tensors`` ``(W,)``); or, made by :meth:`built`, a KCP
    matrix's Kronecker sum whose ``tensors`` are the CP factors themselves."""

    def __init__(self, tensors: Sequence[Tensor], layout: KronLayout | None) -> None:
        self.tensors = list(tensors)
        self.layout = layout
        self.groups: list[list[Tensor]] | None = None  # the CP factors, for :meth:`built`
        self._plans: list[Any] = []
        self._row: native_factor.RowGrads | None = None  # one row's gradients in one call
        if layout is None:
            self.weight = self.tensors[0].detach()  # (g, i)
            self.kron: _Kron | None = None
            return
        self.kron = _Kron(layout, [t.detach() for t in self.tensors])
        args, args_t = self.kron.args(), self.kron.args_t()
        self._keep = (args, args_t)  # what the kernel reads through the pointers below
        self.shape = (args.in_features, args.out_features)
        self.macs = args.macs(1)  # per row, either way (for native.counting_macs)
        self.call = native._require().kcprnn_kron_apply
        self.args, self.args_t = args.args(), args_t.args()

    @classmethod
    def built(cls, groups: Sequence[Sequence[Tensor]], layout: KronLayout) -> Operand:
        """The Kronecker sum of a KCP matrix from ``groups`` (the CP factors of each Kronecker
        factor, in ``layout``'s order; the factor kernel takes each:
        :func:`kcprnn._cpu.native_factor.applies`), built on the kernel without autograd. Its
        :attr:`tensors` are the CP factors, so that the step's node takes them as inputs and
        back-propagates through the build in its own backward: no node of the build in the
        graph, whose backward a step at one row pays more for than for its kernels."""
        plain = [[f.detach().contiguous() for f in g] for g in groups]  # what the kernel reads
        built = [native_factor.kernel_build(g) for g in plain]
        op = cls([m for m, _ in built], layout)
        op.tensors = [f for g in groups for f in g]
        op.groups, op._plans = plain, [plan for _, plan in built]
        kron = op.kron
        assert kron is not None
        if len(plain) == 2 and op.tensors[0].shape[0] == 1:  # one term of two factors
            # the inverse of the output gather: the transposed layout's input gather (kept)
            inverse = layout.transposed().indices(kron.mats[0].device)[0]
            op._row = native_factor.RowGrads(kron.mats, plain, op._plans, kron.index[0], inverse)
        return op

    def _apply(self, x: Tensor, args: tuple, width: int) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(x.shape[0], width)
        native._count(x.shape[0] * self.macs)
        self.call(x.shape[0], x.data_ptr(), out.data_ptr(), *args)
        return out

    def mul(self, x: Tensor) -> Tensor:
        """``x @ W.T``: ``(b, i) -> (b, g)``, a new contiguous tensor."""
        if self.kron is None:  # MKL: oneDNN would reorder the whole matrix at every call
            return F.linear(x, self.weight)  # (b, g)
        return self._apply(x, self.args, self.shape[1])  # (b, g)

    def back(self, d: Tensor) -> Tensor:
        """``d @ W``: ``(b, g) -> (b, i)``."""
        if self.kron is None:
            return d.mm(self.weight)  # (b, i)
        return self._apply(d, self.args_t, self.shape[0])  # (b, i)

    def takes(self, rows: int) -> bool:
        """Whether the step may run this operand on ``rows`` rows (any number here)."""
        return True

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        """:meth:`mul` and what :meth:`backward` needs of this call besides ``x`` (nothing)."""
        return self.mul(x), None

    def backward(
        self, d: Tensor, x: Tensor, memo: Any, need_x: bool, needs: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """The gradients of ``x`` (where ``need_x``) and of :attr:`tensors` (:meth:`grads`)
        from the output gradient ``d`` of the call that returned ``memo``."""
        return (self.back(d) if need_x else None), self.grads(d, x, needs)

    def grads(self, d: Tensor, x: Tensor, needs: Sequence[bool]) -> list[Tensor | None]:
        """The gradients of :attr:`tensors` from the output gradient ``d`` ``(b, g)`` and the
        input ``x`` ``(b, i)``."""
        if not any(needs):
            return [None] * len(needs)
        if self.kron is None:
            return [d.t().mm(x)]  # (g, i)
        if self.groups is None:
            return self.kron.grads(d, x, needs)
        if self._row is not None and d.shape[0] == 1:
            got = self._row(x.contiguous(), d.contiguous())
            return [t if need else None for t, need in zip(got, needs, strict=True)]
        wanted, start = [], 0
        for g in self.groups:
            wanted.append(any(needs[start : start + len(g)]))
            start += len(g)
        mats = self.kron.grads(d, x, wanted)  # each factor matrix's, (P, J, I)
        out: list[Tensor | None] = []
        for g, plan, grad in zip(self.groups, self._plans, mats, strict=True):
            out.extend(
                [None] * len(g) if grad is None else native_factor.kernel_grads(plan, g, grad)
            )
        return [t if need else None for t, need in zip(out, needs, strict=True)]

    def differentiable(self, weights: Sequence[Tensor]) -> Any:
        """``x -> x @ W.T`` on torch operations through ``weights`` (this operand's tensors as
        the autograd node received them)."""
        if self.layout is None:
            return lambda x: F.linear(x, weights[0])
        index = self.layout.indices(weights[0].device)
        if self.groups is not None:  # the CP factors: the factor matrices built from them
            mats, start = [], 0
            for g in self.groups:
                mats.append(factor_dense_torch(weights[start : start + len(g)]))
                start += len(g)
            weights = mats
        return lambda x: kron_apply(x, weights, self.layout, index)


class ChainOperand(Operand):
    """A weight in another format (TT, TR, CP, Tucker, BT, HT) whose product on a few rows is
    its chain of contractions (:mod:`kcprnn.formats._chain`) on the chain kernel: one call
    forward, one backward for the rows' and every tensor's gradients. :attr:`tensors` are the
    chain's tensors (the format's parameters) in the chain's order. Made by :meth:`of`."""

    def __init__(self, plan: ChainPlan, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)
        self.layout, self.kron, self.groups = None, None, None
        self.plan = plan
        self._plain = [t.detach() for t in self.tensors]  # what the kernel reads
        self._addresses = native_chain.pointers(self._plain)

    @classmethod
    def of(cls, matrix: FactorizedMatrix) -> ChainOperand | None:
        """``matrix``'s chain operand; ``None`` where it has no chain the kernel takes in
        float32."""
        plan = matrix._chain_plan()
        if plan is None:
            return None
        given = matrix.chain_tensors()
        tensors = [given[i] for i in plan.order]
        return cls(plan, tensors) if native_chain.takes(plan, tensors, torch.float32) else None

    def takes(self, rows: int) -> bool:
        """Whether the chain runs on ``rows`` rows: at most :data:`CHAIN_ROWS`, and a layout
        for them (every packing within the kernel's axes)."""
        return rows <= CHAIN_ROWS and native_chain.chain_layout(self.plan, rows) is not None

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        x = x.contiguous()  # (b, i)
        layout = native_chain.chain_layout(self.plan, x.shape[0])
        assert layout is not None  # takes() held
        out, ws = native_chain.run_forward(self.plan, layout, x, self._addresses, None)
        return out, (layout, ws)  # (b, g)

    def mul(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]  # (b, g)

    def backward(
        self, d: Tensor, x: Tensor, memo: Any, need_x: bool, needs: Sequence[bool]
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        if not (need_x or any(needs)):
            return None, [None] * len(needs)
        layout, ws = memo
        x = x.contiguous()  # (b, i): the values the forward read
        grads = [
            torch.empty_like(t) if need else None
            for t, need in zip(self._plain, needs, strict=True)
        ]
        dx = torch.empty_like(x) if need_x else None  # (b, i)
        native_chain.run_backward(self.plan, layout, ws, d, x, self._addresses, grads, dx)
        return dx, grads

    def differentiable(self, weights: Sequence[Tensor]) -> Any:
        return lambda x: chain_forward(self.plan, x, weights)[0]


def applies(*tensors: Tensor | None) -> bool:
    """Whether :func:`step` runs on ``tensors`` (the step's input, state, biases and the
    operands' tensors): all float32 on the CPU, and the kernels built."""
    return (
        all(t is None or (t.dtype == torch.float32 and t.is_cpu) for t in tensors)
        and native.available()
    )


_MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}


def step(
    mode: str,
    ih: Operand,
    hh: Operand,
    x: Tensor,
    state: Sequence[Tensor],
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    marks: dict[Any, Any] | None = None,
) -> tuple[Tensor, ...]:
    """One ``mode`` step (``"LSTM"``, ``"GRU"``, ``"RNN_TANH"``, ``"RNN_RELU"``) on rows ``x``
    ``(b, i)`` from ``state`` (``(h, c)`` or ``(h,)``, each ``(b, h)``), as one autograd node.
    Call only where :func:`applies` holds. Returns the new state. The node's backward sets
    ``marks["pending"]`` to ``False`` when ``marks`` is given
    (:func:`kcprnn.rnn._cell_step.marks`)."""
    c = state[1] if mode == "LSTM" else None
    n_ih = len(ih.tensors)
    out = _Step.apply(
        (_MODES[mode], marks), ih, hh, n_ih, x, state[0], c, bias_ih, bias_hh, *ih.tensors,
        *hh.tensors,
    )  # fmt: skip
    return tuple(out) if mode == "LSTM" else (out,)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        mode_marks: tuple[int, dict[Any, Any] | None],
        ih: Operand,
        hh: Operand,
        n_ih: int,
        x: Tensor,
        h: Tensor,
        c: Tensor | None,
        bias_ih: Tensor | None,
        bias_hh: Tensor | None,
        *weights: Tensor,
    ) -> Any:
        lib = native._require()
        mode, ctx.marks = mode_marks
        # the weights are kept, not saved (the operands hold what the backward reads); their
        # versions are checked as autograd checks saved tensors
        ctx.weights, ctx.versions = weights, [w._version for w in weights]
        inputs = (x, h, c)  # saved as given: a recorded backward differentiates through them
        x, h = x.contiguous(), h.contiguous()
        b, hidden = h.shape
        gx, ctx.memo_ih = ih.forward(x)  # (b, g)
        a, ctx.memo_hh = hh.forward(h)  # (b, g)
        g = gx.shape[1]
        ctx.mode, ctx.ih, ctx.hh, ctx.n_ih = mode, ih, hh, n_ih
        if mode == 0:  # LSTM
            c = c.contiguous()  # type: ignore[union-attr]
            bias = _sum(bias_ih, bias_hh)
            acts = gx.new_empty(1, b, g)  # (1, b, 4h)
            hs, cs, tcs = (h.new_empty(1, b, hidden) for _ in range(3))  # (1, b, h)
            lib.kcprnn_lstm_forward_step(
                0, 1, b, hidden, gx.data_ptr(), g, b * g, _ptr(bias), a.data_ptr(),
                acts.data_ptr(), c.data_ptr(), hs.data_ptr(), cs.data_ptr(), tcs.data_ptr(), 0, 1,
            )  # fmt: skip
            ctx.save_for_backward(*inputs, bias_ih, bias_hh, acts, cs, tcs)
            return hs[0], cs[0]
        if mode == 1:  # GRU: b_ih joins the input projection, b_hh stays inside the reset gate
            if bias_ih is not None:
                gx.add_(bias_ih)
            gh = gx.new_empty(1, b, g)  # (1, b, 3h)
            rz = gx.new_empty(1, b, 2 * hidden)  # (1, b, 2h)
            ns, hs = (h.new_empty(1, b, hidden) for _ in range(2))  # (1, b, h)
            lib.kcprnn_gru_forward_step(
                0, 1, b, hidden, gx.data_ptr(), g, b * g, _ptr(bias_hh), a.data_ptr(),
                h.data_ptr(), gh.data_ptr(), rz.data_ptr(), ns.data_ptr(), hs.data_ptr(), 0, 1,
            )  # fmt: skip
            ctx.save_for_backward(*inputs, bias_ih, bias_hh, gh, rz, ns)
            return hs[0]
        bias = _sum(bias_ih, bias_hh)
        hs = h.new_empty(1, b, hidden)  # (1, b, h)
        lib.kcprnn_rnn_forward_step(
            0, 1, b, hidden, gx.data_ptr(), g, b * g, _ptr(bias), a.data_ptr(), hs.data_ptr(),
            0, int(mode == 3),
        )  # fmt: skip
        out = hs[0]
        ctx.save_for_backward(*inputs, bias_ih, bias_hh, out, None, None)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        x, h, c, bias_ih, bias_hh, s0, s1, s2 = saved
        for w, version in zip(ctx.weights, ctx.versions, strict=True):
            if w._version != version:
                raise RuntimeError(
                    f"kcprnn: a weight {tuple(w.shape)} of a cell step was modified by an inplace "
                    f"operation after the step (version {version} -> {w._version}): run the "
                    "step again (call the cell) before backward"
                )
        mode, ih, hh, n_ih = ctx.mode, ctx.ih, ctx.hh, ctx.n_ih
        needs = ctx.needs_input_grad
        if ctx.marks is not None:
            ctx.marks["pending"] = False
        if torch.is_grad_enabled():  # a graph of the backward: recompute on torch operations
            return _recorded_backward(ctx, grads, (*saved, *ctx.weights))
        lib = native._require()
        h = h.contiguous()  # (b, h); the kernels read h and c through pointers
        b, hidden = h.shape
        dh = h.new_zeros(b, hidden)  # (b, h): no gradient from a later step
        grad_h = grads[0].contiguous()  # (b, h), kept: the kernel reads it through a pointer
        dbias = None
        dc: Tensor | None = None
        if mode == 0:
            acts, cs, tcs = s0, s1, s2
            c = c.contiguous()  # (b, h)
            dc = grads[1].contiguous().clone()  # (b, h): becomes the gradient of c
            d = acts.new_empty(acts.shape)  # (1, b, 4h)
            dbias = acts.new_zeros(acts.shape[2]) if any(needs[7:9]) else None
            lib.kcprnn_lstm_backward_step(
                0, 1, b, hidden, acts.data_ptr(), cs.data_ptr(), tcs.data_ptr(), c.data_ptr(),
                grad_h.data_ptr(), None, dh.data_ptr(), dc.data_ptr(),
                d.data_ptr(), _ptr(dbias), 0,
            )  # fmt: skip
            d_ih = d_hh = d[0]  # (b, 4h)
            db_ih, db_hh = dbias, dbias
        elif mode == 1:
            gh, rz, ns = s0, s1, s2
            d_ih = gh.new_empty(b, gh.shape[2])  # (b, 3h)
            d_hh = gh.new_empty(b, gh.shape[2])  # (b, 3h)
            dbias = gh.new_zeros(gh.shape[2]) if needs[8] else None
            lib.kcprnn_gru_backward_step(  # (its hs: states after earlier steps, none here)
                0, 1, b, hidden, rz.data_ptr(), ns.data_ptr(), gh.data_ptr(), h.data_ptr(),
                h.data_ptr(), grad_h.data_ptr(), None, dh.data_ptr(),
                d_ih.data_ptr(), d_hh.data_ptr(), _ptr(dbias), 0,
            )  # fmt: skip
            db_ih = d_ih.sum(0) if needs[7] else None
            db_hh = dbias
        else:
            out = s0  # (b, h)
            d_ih = d_hh = out.new_empty(b, hidden)  # (b, h)
            dbias = out.new_zeros(hidden) if any(needs[7:9]) else None
            lib.kcprnn_rnn_backward_step(
                0, 1, b, hidden, out.data_ptr(), grad_h.data_ptr(), None,
                dh.data_ptr(), d_ih.data_ptr(), _ptr(dbias), 0, int(mode == 3),
            )  # fmt: skip
            db_ih, db_hh = dbias, dbias
        dx, w_ih = ih.backward(d_ih, x, ctx.memo_ih, needs[4], needs[9 : 9 + n_ih])
        dh_hh, w_hh = hh.backward(d_hh, h, ctx.memo_hh, needs[5], needs[9 + n_ih :])
        if needs[5]:
            assert dh_hh is not None
            dh = dh_hh if mode != 1 else dh.add_(dh_hh)
        return (
            None, None, None, None, dx, dh if needs[5] else None, dc if needs[6] else None,
            db_ih if needs[7] else None, db_hh if needs[8] else None, *w_ih, *w_hh,
        )  # fmt: skip


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b  # (g,)


def _recorded_backward(ctx: Any, grads: Sequence[Tensor], saved: Any) -> tuple[Tensor | None, ...]:
    """The backward on torch operations, recomputing the step from the saved inputs
    (``saved``: ``ctx.saved_tensors`` and the kept weights), for a backward that records its
    own graph (second derivatives)."""
    x, h, c, bias_ih, bias_hh, _, _, _, *weights = saved
    mode, ih, hh, n_ih = ctx.mode, ctx.ih, ctx.hh, ctx.n_ih
    ih_product = ih.differentiable(weights[:n_ih])
    hh_product = hh.differentiable(weights[n_ih:])
    with torch.enable_grad():
        gx = ih_product(x)  # (b, g)
        if bias_ih is not None:
            gx = gx + bias_ih
        if mode == 0:
            outs: tuple[Tensor, ...] = lstm_step(gx, h, c, hh_product, bias_hh)
        elif mode == 1:
            outs = (gru_step(gx, h, hh_product, bias_hh),)
        else:
            relu = "relu" if mode == 3 else "tanh"
            outs = (rnn_step(gx, h, hh_product, bias_hh, relu),)
    inputs = [x, h, c, bias_ih, bias_hh, *weights]
    wanted = [k for k, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[4 + k]]
    got = torch.autograd.grad(
        outs, [inputs[k] for k in wanted], grads[: len(outs)], create_graph=True, allow_unused=True
    )
    result: list[Tensor | None] = [None] * len(inputs)
    for k, g in zip(wanted, got, strict=True):
        result[k] = g
    return (None, None, None, None, *result)
