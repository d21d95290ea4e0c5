"""The target machine: roofline, kernel probes, timing and the measured peak memory.

* :mod:`.roofline` -- :class:`Roofline` (peak FLOP/s per dtype, bandwidth,
  per-op overhead), measured and cached on disk (:func:`get_roofline`) or
  measured under load for the blocked planner (:func:`measure_under_load`);
* :mod:`.probes` -- :class:`KernelProbes`: what the int8 kernels compute
  exactly here, the CPU's feature flags;
* :mod:`.timing` -- best time of a callable, alternating timings, :class:`TimingCache`;
* :mod:`.memory_probe` -- :func:`measure_peak`: the measured peak memory of a call;
* :mod:`.info` -- :class:`TargetInfo`: all of the above for one ``optimize()``
  call, kept on its context (``ctx.target``) instead of in module globals.
"""

from graphopt.target.info import TargetInfo
from graphopt.target.memory_probe import MeasuredPeak, measure_peak
from graphopt.target.probes import KernelProbes
from graphopt.target.roofline import Roofline, get_roofline, measure_roofline, measure_under_load
from graphopt.target.timing import TimingCache

__all__ = ["KernelProbes", "MeasuredPeak", "Roofline", "TargetInfo", "TimingCache", "get_roofline",
           "measure_peak", "measure_roofline", "measure_under_load"]
