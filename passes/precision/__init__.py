"""The ``precision`` pass: reduced precision within an error budget, chosen by measured speed.

* :mod:`.reduced_precision` -- the pass (:class:`ReducedPrecision`; its docstring
  lists the rewrites and declines).
* :mod:`.run` -- one run's candidates, measurements and choices (:class:`PrecisionRun`).
* :mod:`.quantized_linears` -- the linear sites it quantizes, their int8 / fp8 / weight-only
  weights and the rewrite.

The building blocks that need no pass (targets, calibration, float lowering,
speed, the search) are in ``graphopt.precision``.
"""

from graphopt.passes.precision.reduced_precision import ReducedPrecision
from graphopt.passes.precision.run import DEFAULT_BUDGET, INT4_BUDGET, MODES, NodePlan, PrecisionRun

__all__ = ["ReducedPrecision", "PrecisionRun", "NodePlan", "MODES", "DEFAULT_BUDGET", "INT4_BUDGET"]
