r"""Kronecker CP (KCP) format: a sum of ``P`` Kronecker products of ``N`` CP tensors.

.. math::
    W[j, i] = \sum_{p=1}^{P} \prod_{n=1}^{N} \sum_{r=1}^{R_n} \prod_{d=1}^{D}
              F^{(n,d)}[p, r, j_d^{(n)}, i_d^{(n)}]

Every mode is split once more into ``N`` Kronecker factors, ``I_d = I_d^(1) ⋯ I_d^(N)`` and
``J_d = J_d^(1) ⋯ J_d^(N)``; ``i`` is the row-major flattening of the multi-index
``(i_1^(1), ..., i_1^(N), i_2^(1), ..., i_D^(N))`` (mode-major, factor-minor), ``j`` likewise.
``F^(n,d)`` is ``factors[n][d]`` of shape ``(P, R_n, J_d^(n), I_d^(n))``.

Legend for shape comments: b batch rows, k merged rank ``(p, r_1, ..., r_N)``, p term,
r rank of one factor, a/c input indices of the prefix/suffix chunk of axes, m/o output indices
of the prefix/suffix chunk, f input axes of the current factor, g output axes of the current
factor, e every other axis.

Two exact fast products, both plain GEMMs on reshaped views:

* ``parallel`` (:func:`kcp_linear_parallel`): merge the factors into a CP of rank
  ``K = P Π_n R_n`` over the ``D N`` axes ``(d, n)`` of the input (mode-major, factor-minor); cut
  the axes into a prefix ``[0, s)`` and a suffix ``[s, D N)`` and merge each chunk, for every
  merged rank, into one small dense matrix. Step 1 is ONE GEMM over the contiguous trailing
  axes of every row, ``(b a, c) -> (b a, k o)``; step 2 is one GEMM per row, or one tall GEMM
  when ``o`` is narrow, that contracts ``(a, k)`` together, so the rank sum is part of the GEMM.
  No copy of the input, no Python loop over ranks.
* ``sequential`` (:func:`kcp_linear_sequential`): factor by factor. For each factor ``n`` the sum
  over ``r`` is done first, in the small dense matrix ``A_p^(n) = Σ_r ⊗_d F^(n,d)[p, r]`` of shape
  ``(J^(n), I^(n))``, which multiplies the factor's input axes. Its cost grows with
  ``P Π_d J_d^(n)`` instead of ``K``, so it wins at high ranks. Size-1 axes are dropped; a factor
  whose axes form one block of the current layout (a factor owning whole modes) multiplies a
  view of the input, while interleaved axes are gathered by block transposes, one permute or
  one pass of the compiled gather, in chunks of rows (:func:`.walk.sequential_walk`). The last
  factor, applied to the small data the others leave, can run as its own CP product instead of
  its dense matrix (``KCPPlan.inner``; ``KCPPlan.inner_order`` moves its output-only modes into
  that product's prefix; in inference a compiled kernel runs it and writes the final layout).
  The output axes are reordered last, by one ``index_select`` where a permuted copy would
  crawl (:func:`.layout.final_gathers`). In training the walk is one autograd node with a
  hand-written backward (:class:`.backward.SequentialProduct`).

``auto`` picks the cheaper one by :func:`kcp_cost` (arithmetic, memory traffic of every step,
gathering copies, fresh pages of large blocks, GEMM row overhead, a per-kernel launch cost, and
the tall GEMMs that run on the compiled kernel or oneDNN,
:func:`~kcprnn._cpu.ops.tall_linear`), every weight read from a
:class:`~kcprnn._cpu.cost.CostModel`; the split point of ``parallel`` and the factor order and
last-factor form of ``sequential`` are chosen by the same model. Under ``no_grad`` the module
keeps the small matrices between calls.

The package's files:

* :mod:`.algebra`: splits, ranks, parameter count, reconstruction, ``from_dense``;
* :mod:`.layout`: the plans and walks as plain typed data (no tensors);
* :mod:`.walk`: the sequential walk and the cost of its copies;
* :mod:`.plan`: the planner (:func:`kcp_cost`, :func:`kcp_plan`);
* :mod:`.parallel`, :mod:`.sequential`, :mod:`.backward`: the products;
* :mod:`.module`: :class:`KCPMatrix`.
"""

from .algebra import (
    kcp_from_dense,
    kcp_num_params,
    kcp_reconstruction_macs,
    kcp_to_dense,
    resolve_kcp_splits,
    validate_kcp_ranks,
)
from .layout import KCPPlan
from .module import KCPMatrix
from .parallel import kcp_linear_parallel, kcp_parallel_prepare
from .plan import kcp_cost, kcp_plan, kcp_plan_flops, kcp_plan_macs
from .sequential import kcp_linear_sequential, kcp_sequential_prepare

kcp_reconstruction_flops = kcp_reconstruction_macs  # the older name of the same count

__all__ = [
    "KCPMatrix",
    "KCPPlan",
    "kcp_cost",
    "kcp_from_dense",
    "kcp_linear_parallel",
    "kcp_linear_sequential",
    "kcp_num_params",
    "kcp_parallel_prepare",
    "kcp_plan",
    "kcp_plan_flops",
    "kcp_plan_macs",
    "kcp_reconstruction_flops",
    "kcp_reconstruction_macs",
    "kcp_sequential_prepare",
    "kcp_to_dense",
    "resolve_kcp_splits",
    "validate_kcp_ranks",
]
