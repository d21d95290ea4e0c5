"""The measured peak memory of a call: :func:`measure_peak`, one function and one result type.

What it counts: the bytes a call allocates at its peak beyond what was in use
before it (the module's parameters and the inputs are not counted; what the
call returns is). :class:`MeasuredPeak` says how it was measured.

* CUDA (either source): ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before the call.
* CPU, ``source="allocator"`` (the default): the running total of
  ``torch.profiler``'s allocation events (``profile_memory=True``): every
  allocation through torch's CPU allocator, peak minus the level before the
  call. What the blocked pass reports and ``analyze(profile=True)`` shows
  beside the liveness prediction (:func:`graphopt.memory.peak_memory`).
* CPU, ``source="rss"``: torch's CPU allocator hands large blocks back to the
  OS and small ones to glibc's heap, so the robust figure for a whole process
  is its resident set: the peak RSS (``VmHWM``) during the call minus the RSS
  before it. The peak is reset first by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0) and freed heap pages are returned
  with ``malloc_trim``, so earlier garbage does not hide new allocations.
  Where ``clear_refs`` cannot be written, RSS is sampled from a thread every
  millisecond (``method="sampled"``, a lower bound). For a figure free of any
  earlier state, run the call in a fresh subprocess (``benchmarks/blocked.py``
  does).
"""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

try:
    from torch._C._profiler import _EventType
except ImportError:  # pragma: no cover - very old/new torch
    _EventType = None

__all__ = ["MeasuredPeak", "measure_peak", "rss_bytes", "SOURCES"]

#: what a CPU measurement reads (CUDA always reads the caching allocator's peak)
SOURCES = ("allocator", "rss")


@dataclass(frozen=True)
class MeasuredPeak:
    """``bytes`` above the memory in use before the call (None: not measurable here, ``method`` says why).

    ``result``: what the call returned, when asked for (``keep_result=True``).
    """

    bytes: int | None
    method: str
    result: Any = None


def measure_peak(fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
                 source: str = "allocator", device: torch.device | str | None = None, warmup: bool = False,
                 keep_result: bool = False) -> MeasuredPeak:
    """Run ``fn(*args, **kwargs)`` once (after one warm-up call with ``warmup``) and measure its peak.

    ``device``: where the call allocates (default: the first tensor argument's
    device, else CPU). ``source``: ``"allocator"`` or ``"rss"`` on CPU (see the
    module docstring). Runs without autograd.

    >>> m = measure_peak(lambda: torch.ones(64 * 2**20 // 4).sum(), source="rss")
    >>> m.bytes > 32 * 2**20 or m.method == "sampled"
    True
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: choose one of {SOURCES}")
    kwargs = kwargs or {}
    device = torch.device(device) if device is not None else _device_of([*args, *kwargs.values()])
    with torch.no_grad():
        if warmup:
            fn(*args, **kwargs)
        if device.type == "cuda":
            return _cuda_peak(fn, args, kwargs, device, keep_result)
        if source == "rss":
            return _rss_peak(fn, args, kwargs, keep_result)
        return _allocator_peak(fn, args, kwargs, keep_result)


def _device_of(values: Sequence[Any]) -> torch.device:
    for x in values:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _cuda_peak(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], device: torch.device,
               keep_result: bool) -> MeasuredPeak:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return MeasuredPeak(max(int(peak), 0), "torch.cuda.max_memory_allocated", out if keep_result else None)


def _allocator_peak(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                    keep_result: bool) -> MeasuredPeak:
    if _EventType is None:  # pragma: no cover - very old/new torch
        return MeasuredPeak(None, "torch.profiler allocation events unavailable")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    result = out if keep_result else None
    del out
    allocs: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            dev = getattr(f, "device", None)
            if dev is None or getattr(dev, "type", "cpu") == "cpu":
                allocs.append((e.start_time_ns, int(f.alloc_size), int(f.total_allocated)))
        stack.extend(e.children)
    if not allocs:
        return MeasuredPeak(None, "torch.profiler recorded no allocation", result)
    allocs.sort()
    before = allocs[0][2] - allocs[0][1]
    peak = max(total for _, _, total in allocs) - before
    return MeasuredPeak(int(peak), "torch.profiler allocation events (CPU allocator)", result)


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


def _rss_peak(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
              keep_result: bool) -> MeasuredPeak:
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
