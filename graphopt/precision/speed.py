"""Measured speed: microbenchmarks and the decision they feed.

:func:`time_interleaved` times several callables round-robin (so a noisy,
shared machine slows them alike) and returns each one's median seconds.
:func:`choose_precision` turns timings into a decision; it is a pure function
so the decision can be tested with injected timings. A conversion that is not
faster than fp32 on the target is never chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

BASELINE = "fp32"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 1,
                     device: torch.device | None = None, give_up: float = 3.0,
                     budget_s: float | None = None, repeat: int = 1) -> dict[str, float]:
    """Fastest seconds per call of each callable, timed round-robin.

    The minimum, not the median: on a shared machine other work only ever
    adds time, so the fastest run is the best estimate of an op's own cost.

    ``repeat`` > 1: each timed call is the last of ``repeat`` back-to-back
    calls (the others untimed), so a callable is timed with its own data
    warm in the caches, as a step that repeats runs (a decode step streams
    the same weights every token), not after the others evicted them.

    A callable more than ``give_up`` times slower than the fastest after two
    rounds is not timed further (it will not be chosen anyway). ``budget_s``
    caps the total time spent (at least two rounds are run).
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    active = dict(fns)
    start = time.perf_counter()
    with torch.no_grad():
        for fn in active.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        for r in range(rounds):
            for name, fn in list(active.items()):
                for _ in range(repeat - 1):
                    fn()
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
            if r >= 1:
                best = min(min(v) for v in samples.values() if v)
                for name in list(active):
                    if min(samples[name]) > give_up * best:
                        del active[name]
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    break
    return {k: min(v) for k, v in samples.items() if v}


def choose_precision(timings: Mapping[str, float], min_speedup: float = 1.0,
                     baseline: str = BASELINE) -> tuple[str, str]:
    """The fastest precision in ``timings`` (seconds per call) and why.

    Returns ``(baseline, reason)`` when no candidate beats the baseline by
    ``min_speedup``: a conversion that is slower on the target is not made.

    >>> choose_precision({"fp32": 1e-3, "int8": 4e-4, "bf16": 4e-3})
    ('int8', 'int8 2.50x faster than fp32 (0.400 ms vs 1.000 ms; bf16 4.000 ms)')
    """
    if baseline not in timings:
        raise ValueError(f"timings need the {baseline!r} baseline, got {sorted(timings)}")
    base = timings[baseline]
    others = {k: v for k, v in timings.items() if k != baseline}
    if not others:
        return baseline, "no lower precision to compare"
    best = min(others, key=others.__getitem__)
    rest = "; ".join(f"{k} {v * 1e3:.3f} ms" for k, v in sorted(others.items()) if k != best)
    rest = f"; {rest}" if rest else ""
    speedup = base / others[best] if others[best] > 0 else float("inf")
    if speedup < min_speedup:
        listed = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in sorted(others.items()))
        return baseline, f"slower on this target: {listed} vs fp32 {base * 1e3:.3f} ms"
    return best, f"{best} {speedup:.2f}x faster than fp32 ({others[best] * 1e3:.3f} ms vs {base * 1e3:.3f} ms{rest})"
