"""Timing a callable: best time, alternating rounds of two callables, and the cache they are kept in.

* :func:`best_time` -- the best of ``repeats`` calls within a time budget,
  synchronising CUDA (the roofline micro-benchmarks);
* :func:`best_wall_time` -- the best of ``n`` plain wall-clock calls (the
  planner's calibration under load);
* :func:`median_time` -- the median of a few calls after a warm-up (the
  blocked planner's autotune of whole modules);
* :func:`time_alternating` -- two or more callables timed in alternating
  rounds with ``torch.utils.benchmark.Timer`` (the load of a busy machine hits
  them alike), the best round of each kept (merge_matmuls' separate-vs-merged
  decision);
* :class:`TimingCache` -- measured timings by key, kept on the optimizer's
  context (:class:`graphopt.target.TargetInfo`), so a model with 32 identical
  layers measures once per ``optimize()`` call.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.benchmark import Timer

__all__ = ["best_time", "best_wall_time", "median_time", "timer_mean", "time_alternating", "TimingCache"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], device: str, repeats: int, budget_s: float) -> float:
    """Best seconds of one call of ``fn`` after a warm-up: at most ``repeats`` calls, stopping after ``budget_s``."""
    fn()
    _sync(device)
    best = math.inf
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def best_wall_time(fn: Callable[[], Any], n: int = 3) -> float:
    """Best wall-clock seconds of ``n`` calls of ``fn`` (no warm-up, at least 1 ns)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-9)


def median_time(fn: Callable[[], Any], repeats: int = 3, device: str = "cpu") -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after one warm-up call.

    On CUDA each call is bracketed by a synchronize: the clock would time the kernel launches only.
    """
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timer_mean(fn: Callable[[], object], number: int) -> float:
    """Mean seconds per call of ``number`` calls, by ``torch.utils.benchmark.Timer`` (synchronises CUDA)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


def time_alternating(fns: list[Callable[[], object]], rounds: int = 5, round_seconds: float = 2e-3,
                     budget_seconds: float = 0.25) -> list[float]:
    """Best seconds per call of each of ``fns``, timed in alternating rounds.

    Every callable is warmed up twice; a round calls each ``number`` times,
    ``number`` chosen from the first callable's time so a round lasts about
    ``round_seconds``; large callables get fewer rounds (at least 2) so the
    whole measurement stays near ``budget_seconds``.
    """
    for _ in range(2):
        for fn in fns:
            fn()
    once = max(timer_mean(fns[0], 1), 1e-7)
    number = max(1, min(1000, int(round_seconds / once)))
    rounds = max(2, min(rounds, int(budget_seconds / (len(fns) * once * number))))
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timer_mean(fn, number))
    return best


class TimingCache:
    """Timings by key (a shape, a thread count, ...), measured once and kept for the context's lifetime."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}

    def get_or_measure(self, key: Hashable, measure: Callable[[], Any]) -> Any:
        """The timing stored under ``key``; ``measure()`` gives and stores it the first time."""
        if key not in self._values:
            self._values[key] = measure()
        return self._values[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def keys(self) -> list[Hashable]:
        """The keys measured so far."""
        return list(self._values)
