"""What the optimizer knows about the machine it optimizes for: :class:`TargetInfo`, kept on the context.

One :class:`TargetInfo` lives on each :class:`graphopt.pass_infra.OptimizeContext`
(``ctx.target``), and every measurement of the machine that a pass needs is
made there once, lazily, and kept for the context's lifetime -- never in a
module global:

* ``roofline(device)`` -- the analysis roofline (given, or
  :func:`graphopt.target.roofline.get_roofline`: disk-cached per machine);
* ``roofline_under_load(device)`` -- the blocked planner's figures, measured
  now (:func:`graphopt.target.roofline.measure_under_load`);
* ``probes`` -- the int8 kernel probes and CPU flags
  (:class:`graphopt.target.probes.KernelProbes`);
* ``timings`` -- micro-benchmark results by key
  (:class:`graphopt.target.timing.TimingCache`; merge_matmuls' timings).

Code without a context (a public helper, a test) creates a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphopt.target.probes import KernelProbes
from graphopt.target.roofline import Roofline, get_roofline, measure_under_load
from graphopt.target.timing import TimingCache

__all__ = ["TargetInfo"]


@dataclass
class TargetInfo:
    """Rooflines, kernel probes and timings of the target machine, each measured at most once.

    ``given``: a roofline to use for every device instead of measuring one
    (``analyze(target=Roofline(...))``, tests).
    """

    given: Roofline | None = None
    probes: KernelProbes = field(default_factory=KernelProbes)
    timings: TimingCache = field(default_factory=TimingCache)
    _rooflines: dict[str, Roofline] = field(default_factory=dict, repr=False)
    _under_load: dict[str, Roofline] = field(default_factory=dict, repr=False)

    def roofline(self, device: torch.device | str = "cpu") -> Roofline:
        """The analysis roofline of ``device``: ``given``, else measured (or read from the disk cache) once."""
        if self.given is not None:
            return self.given
        key = str(device)
        if key not in self._rooflines:
            self._rooflines[key] = get_roofline(device)
        return self._rooflines[key]

    def roofline_under_load(self, device: torch.device | str = "cpu") -> Roofline:
        """The blocked planner's figures of ``device``, measured under the current load once."""
        key = str(device)
        if key not in self._under_load:
            self._under_load[key] = measure_under_load(device)
        return self._under_load[key]
