"""Old import path of the GEMM routing, now :mod:`kcprnn._cpu.ops`; kept until every caller
imports it from there."""

from .._cpu.ops import blocked_weight_grad, linear_nt, scratch, tall_linear, weight_grad

__all__ = ["blocked_weight_grad", "linear_nt", "scratch", "tall_linear", "weight_grad"]
