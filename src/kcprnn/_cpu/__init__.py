"""Everything kcprnn decides by measuring one machine: the cost model, the GEMM routing and the
compiled CPU kernels. The formats keep the math and ask this package how to run it fast.

* :mod:`.cost`: :class:`CostModel`, every machine-tuned number in one frozen object, and
  :func:`default_cost_model` (``$KCPRNN_COST_MODEL`` names a JSON file to use, else this
  machine's model saved by ``kcprnn calibrate --save`` is used, else the built-in defaults).
* :mod:`.ops`: the GEMM routing (MKL, oneDNN or the compiled kernel; blocked weight
  gradients; scratch buffers), each decision read from a cost model passed in.
* :mod:`.native`: the compiled float32 kernels, built when one first runs (never by planning
  or counting) or ahead of time by ``kcprnn build``; without a compiler the same plans run on
  torch ops.
* :mod:`.calibrate`: ``kcprnn calibrate`` (or ``python -m kcprnn._cpu.calibrate``) measures
  this machine in about a minute (``--budget SECONDS``): the time of one MAC of a large float32
  GEMM, and relative to it the per-element cost of permute copies, block transposes,
  ``index_select`` gathers and the compiled gather, the per-op launch cost with and without
  autograd, the per-row GEMM overhead, and the gains of oneDNN and the compiled kernel on tall
  products. It prints the resulting model as JSON (fields it does not measure keep their
  defaults); ``--save`` keeps it as this machine's default model (atomically, in the kernel
  cache folder), ``--out FILE`` writes it to a file to use with ``KCPRNN_COST_MODEL=FILE``,
  ``CostModel.load(FILE)`` or ``KCPMatrix(..., cost_model=m)``.
"""

from .cost import CostModel, default_cost_model

__all__ = ["CostModel", "default_cost_model"]
