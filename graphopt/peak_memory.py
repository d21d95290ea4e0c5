"""Measure the peak memory a call really uses (activations: what it allocates beyond what is resident).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus what was allocated before the call.
* CPU: torch's CPU allocator hands large blocks back to the OS and small ones
  to glibc's heap, so the robust figure is the process' resident set: the
  peak RSS (``VmHWM``) during the call minus the RSS before it. The peak is
  reset first by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0)
  and freed heap pages are returned with ``malloc_trim`` so earlier garbage
  does not hide new allocations. Where ``clear_refs`` cannot be written, RSS
  is sampled from a thread every millisecond (``method="sampled"``, a lower
  bound). For a figure free of any earlier state, run the call in a fresh
  subprocess (``benchmarks/blocked.py`` does).
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MeasuredPeak", "measure_peak", "rss_bytes"]


@dataclass(frozen=True)
class MeasuredPeak:
    """``bytes`` above the memory in use before the call; ``method`` says how it was measured."""

    bytes: int
    method: str
    result: Any = None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int | None:
    """The process' resident set size now (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None,
                 keep_result: bool = False, **kwargs: Any) -> MeasuredPeak:
    """Run ``fn(*args, **kwargs)`` once and measure the memory it allocates at its peak.

    >>> m = measure_peak(lambda: torch.ones(64 * 2**20 // 4).sum())
    >>> m.bytes > 32 * 2**20 or m.method == "sampled"
    True
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return MeasuredPeak(max(int(peak), 0), "cuda max_memory_allocated", out if keep_result else None)
    _trim_heap()
    before = rss_bytes()
    if before is None:
        out = fn(*args, **kwargs)
        return MeasuredPeak(0, "unavailable (no /proc)", out if keep_result else None)
    if _reset_hwm():
        out = fn(*args, **kwargs)
        peak = (_status_kib("VmHWM") or 0) * 1024 - before
        return MeasuredPeak(max(peak, 0), "peak RSS (VmHWM) delta", out if keep_result else None)
    samples = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_bytes() or 0)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn(*args, **kwargs)
    finally:
        stop.set()
        thread.join()
    return MeasuredPeak(max(max(samples) - before, 0), "sampled", out if keep_result else None)
