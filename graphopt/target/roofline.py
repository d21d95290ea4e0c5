"""The roofline of a device: peak FLOP/s per dtype, memory bandwidth, per-op overhead.

One type, :class:`Roofline`, serves both consumers:

* the analysis (:func:`graphopt.cost.annotate_costs`, ``graphopt analyze``)
  predicts each node as ``max(flops / peak, bytes / bandwidth) + overhead``
  (:meth:`Roofline.predict`) on the roofline of :func:`get_roofline`:
  measured by a short micro-benchmark (:func:`measure_roofline`) once per
  machine and cached as JSON under ``~/.cache/graphopt``
  (``GRAPHOPT_CACHE_DIR`` moves it; ``GRAPHOPT_TARGET`` names a JSON file to
  use instead; or pass a :class:`Roofline`);
* the blocked-operator planner
  (:class:`graphopt.passes.analysis.blocked_cost.BlockCostModel`) ranks block
  sizes on :func:`measure_under_load`: the same figures plus the cache size
  and bandwidth and the cost of first-touching fresh memory, measured in half
  a second *under the machine's current load* (never cached on disk: a busy
  CPU is what the planner should see), or round figures on CUDA
  (:data:`CUDA_ROUND_FIGURES`).

The optimizer keeps both on its context (:class:`graphopt.target.TargetInfo`),
so each is measured at most once per ``optimize()`` call.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from graphopt.target.timing import best_time, best_wall_time

log = logging.getLogger(__name__)

__all__ = ["Roofline", "CUDA_ROUND_FIGURES", "get_roofline", "measure_roofline", "measure_under_load",
           "machine_key", "cache_dir"]

_CACHE_ENV = "GRAPHOPT_CACHE_DIR"
_TARGET_ENV = "GRAPHOPT_TARGET"


class _Cost(Protocol):
    """What :meth:`Roofline.predict` reads of a cost (:class:`graphopt.cost.NodeCost`)."""

    flops: int
    category: str

    @property
    def bytes(self) -> int: ...


@dataclass
class Roofline:
    """A device's roofline.

    ``peak_flops``: FLOP/s by dtype name (``"float32"``, ``"bfloat16"``,
    ``"float16"``); ``mem_bandwidth``: DRAM bytes/s; ``op_overhead_s``: fixed
    cost of one op (dispatch on CPU, launch on CUDA). ``key`` identifies the
    machine the figures were measured on (the disk cache is re-measured when it
    changes). The blocked-operator planner also reads ``cache_bandwidth``
    (bytes/s of tiles that fit in ``cache_bytes``; 0: unknown, DRAM's) and
    ``fault_s_per_byte`` (first touch of freshly mapped memory).
    """

    name: str
    device: str
    peak_flops: dict[str, float]
    mem_bandwidth: float
    op_overhead_s: float = 0.0
    key: dict[str, Any] = field(default_factory=dict)
    measured: bool = False
    cache_bandwidth: float = 0.0
    cache_bytes: int = 0
    fault_s_per_byte: float = 0.0

    def peak_for(self, dtype: torch.dtype | str | None) -> float:
        """Peak FLOP/s for ``dtype`` (float32's when that dtype was not measured)."""
        name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
        return self.peak_flops.get(name) or self.peak_flops.get("float32") or max(self.peak_flops.values())

    def predict(self, cost: _Cost, dtype: torch.dtype | str | None = None) -> tuple[float, str]:
        """(predicted seconds, 'compute' | 'memory') of a node's cost on this roofline."""
        if cost.category in ("none", "view"):
            return 0.0, ""
        t_compute = cost.flops / self.peak_for(dtype) if cost.flops else 0.0
        t_memory = cost.bytes / self.mem_bandwidth if cost.bytes else 0.0
        bound = "compute" if t_compute > t_memory else "memory"
        return max(t_compute, t_memory) + self.op_overhead_s, bound

    def ridge_point(self, dtype: torch.dtype | str | None = None) -> float:
        """Arithmetic intensity (FLOP/byte) above which an op is compute-bound."""
        return self.peak_for(dtype) / self.mem_bandwidth

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Roofline:
        """Build a Roofline from :meth:`to_dict`'s output (or a hand-written JSON file)."""
        return cls(
            name=str(d.get("name", "custom")), device=str(d.get("device", "cpu")),
            peak_flops={str(k): float(v) for k, v in dict(d["peak_flops"]).items()},
            mem_bandwidth=float(d["mem_bandwidth"]), op_overhead_s=float(d.get("op_overhead_s", 0.0)),
            key=dict(d.get("key", {})), measured=bool(d.get("measured", False)),
            cache_bandwidth=float(d.get("cache_bandwidth", 0.0)), cache_bytes=int(d.get("cache_bytes", 0)),
            fault_s_per_byte=float(d.get("fault_s_per_byte", 0.0)),
        )


#: round figures of a data-centre GPU for the blocked-operator planner (it only ranks block sizes with them)
CUDA_ROUND_FIGURES = Roofline("cuda (round figures)", "cuda", {"float32": 5e13}, 2e12, 8e-6,
                              cache_bandwidth=1e13, cache_bytes=40 << 20, fault_s_per_byte=0.0)
#: what :func:`measure_under_load` returns when a measurement fails (the optimizer must not stop for it)
_CPU_ROUND_FIGURES = Roofline("cpu (round figures)", "cpu", {"float32": 5e10}, 1e10, 1e-5,
                              cache_bandwidth=4e10, cache_bytes=2 << 20, fault_s_per_byte=2.5e-10)


def machine_key(device: str) -> dict[str, Any]:
    """What identifies a machine for the roofline cache."""
    key: dict[str, Any] = {"host": platform.node(), "torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        key["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        key["threads"] = torch.get_num_threads()
        key["cpu"] = platform.processor() or platform.machine()
    return key


def cache_dir() -> str:
    """Where measured rooflines are cached (``$GRAPHOPT_CACHE_DIR`` or ``~/.cache/graphopt``)."""
    return os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")


def measure_roofline(device: str = "cpu", budget_s: float = 2.0) -> Roofline:
    """Micro-benchmark ``device``: matmul peak per dtype, copy bandwidth, per-op overhead.

    Takes about ``budget_s`` seconds. Peak FLOP/s is the best of a few square
    matmuls (n=1024 on CPU, 4096 on CUDA); bandwidth is an out-of-place add on
    a 16 MiB tensor (read + write of a freshly allocated output, as graph ops
    do); the overhead is the time of an add on 1-element tensors.
    """
    dev = torch.device(device)
    per = budget_s / 6
    n = 4096 if dev.type == "cuda" else 1024
    peaks: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        size = n if dtype == torch.float32 or dev.type == "cuda" else n // 2
        try:
            a = torch.randn(size, size, device=dev).to(dtype)
            b = torch.randn(size, size, device=dev).to(dtype)
            t = best_time(lambda: torch.mm(a, b), device, 10, per)
            peaks[str(dtype).replace("torch.", "")] = 2 * size**3 / t
        except RuntimeError as exc:  # dtype unsupported here
            log.info("no %s matmul on %s: %s", dtype, device, exc)
    # an out-of-place add on a 16 MiB tensor: what a graph's elementwise op does (read the
    # input, allocate and write a fresh output -- on CPU that includes the page faults)
    m = 16 * 2**20 // 4
    src = torch.empty(m, device=dev).fill_(1.0)
    t = best_time(lambda: torch.add(src, 1.0), device, 10, per)
    bandwidth = 2 * m * 4 / t
    x, y = torch.ones(1, device=dev), torch.ones(1, device=dev)

    def many_adds() -> None:
        for _ in range(200):
            torch.add(x, y)

    overhead = best_time(many_adds, device, 5, per) / 200
    name = machine_key(device).get("gpu") or f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
    return Roofline(name=str(name), device=device, peak_flops=peaks, mem_bandwidth=bandwidth,
                    op_overhead_s=overhead, key=machine_key(device), measured=True)


def _normalise_device(device: str | torch.device) -> str:
    device = str(torch.device(device))
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def get_roofline(device: str | torch.device = "cpu", *, refresh: bool = False) -> Roofline:
    """The roofline of ``device``: from ``$GRAPHOPT_TARGET``, the disk cache, or a fresh measurement.

    The cache is ``<cache_dir>/target-<device>.json``; it is re-measured when
    the machine key (host, torch version, threads or GPU name) changes or
    ``refresh`` is true.
    """
    device = _normalise_device(device)
    override = os.environ.get(_TARGET_ENV)
    if override:
        with open(override) as f:
            return Roofline.from_dict(json.load(f))
    path = os.path.join(cache_dir(), f"target-{device.replace(':', '_')}.json")
    key = machine_key(device)
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                cached = Roofline.from_dict(json.load(f))
            if cached.key == key:
                return cached
        except (OSError, ValueError, KeyError) as exc:
            log.info("ignoring unreadable roofline cache %s: %s", path, exc)
    log.info("measuring the %s roofline (once per machine; cached in %s)", device, path)
    roofline = measure_roofline(device)
    _write_cache(path, roofline)
    return roofline


def _write_cache(path: str, roofline: Roofline) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(roofline.to_dict(), f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the roofline in %s (%s); it will be measured again next time", path, exc)


def measure_under_load(device: str | torch.device = "cpu") -> Roofline:
    """This machine's figures now, for the blocked-operator planner (round figures on CUDA).

    CPU, in about half a second: matmul rate, copy bandwidth out of and in
    cache, the cost of first-touching fresh memory (page faults) and the
    overhead of one op on a tile (the median of five runs: contention is what
    it should see). A loaded machine gives slow figures, and that is the
    point: eager attention on a busy CPU is dominated by page faults and DRAM
    passes, which blocking avoids.
    """
    if torch.device(device).type == "cuda":
        return CUDA_ROUND_FIGURES
    try:
        with torch.no_grad():
            return _measure_cpu_under_load()
    except Exception:  # a calibration failure must not stop the optimizer
        log.info("CPU calibration failed; using round figures", exc_info=True)
        return _CPU_ROUND_FIGURES


def _measure_cpu_under_load() -> Roofline:
    a = torch.randn(512, 512)
    flops = 2 * 512**3 / best_wall_time(lambda: a @ a)
    big, out = torch.ones(8 << 20), torch.empty(8 << 20)
    dram = 2 * big.numel() * 4 / best_wall_time(lambda: out.copy_(big))
    small, small_out = torch.ones(32 << 10), torch.empty(32 << 10)

    def in_cache() -> None:
        for _ in range(32):
            small_out.copy_(small)

    cache = 32 * 2 * small.numel() * 4 / best_wall_time(in_cache)
    fresh_bytes = 64 << 20  # above glibc's largest mmap threshold: a fresh mapping every time
    fresh = best_wall_time(lambda: torch.empty(fresh_bytes // 4).fill_(1.0), 2)
    touched = torch.ones(fresh_bytes // 4)
    warm = best_wall_time(lambda: touched.fill_(1.0), 2)
    del touched
    fault = max(fresh - warm, 0.0) / fresh_bytes
    # per-op overhead on a tile-sized tensor (large enough for the intra-op thread pool: on a busy
    # machine its synchronisation, not the arithmetic, dominates small ops)
    tile, tile_out = torch.ones(64 << 10), torch.empty(64 << 10)

    def calls() -> None:
        for _ in range(20):
            torch.add(tile, 1.0, out=tile_out)

    runs = sorted(best_wall_time(calls, 1) / 20 for _ in range(5))
    launch = runs[len(runs) // 2] - 2 * tile.numel() * 4 / cache
    return Roofline(f"cpu x{torch.get_num_threads()} (under load)", "cpu", {"float32": flops}, dram,
                    max(launch, 2e-6), machine_key("cpu"), True, cache_bandwidth=max(cache, dram),
                    cache_bytes=2 << 20, fault_s_per_byte=fault)
