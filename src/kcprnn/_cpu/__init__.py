"""Everything kcprnn decides by measuring one machine: the cost model, the GEMM routing and the
compiled CPU kernels. The formats keep the math and ask this package how to run it fast."""

from .cost import CostModel, default_cost_model

__all__ = ["CostModel", "default_cost_model"]
