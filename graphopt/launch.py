"""Run a model tensor-parallel on N local processes and check it against one process.

:func:`run_sharded` (``graphopt run --nproc N SPEC``):

1. the launching process builds the model from the spec and runs it once
   unsharded: the single-process reference output, its latency and its
   weight bytes;
2. it starts N processes (``torch.multiprocessing``; gloo on CPU, NCCL on
   GPU, rendezvous on a free localhost port). Each builds the model from the
   spec again (the spec's seed makes every rank's weights identical),
   :func:`graphopt.parallel.shard`\\ s it, runs the example inputs and times
   them;
3. rank 0 gathers every rank's weight bytes and latency, compares its output
   with the reference and hands the :class:`RunResult` back.

Everything is bounded in time: the process group has a timeout, and the
launcher kills the processes it started when ``timeout`` passes.

On CPU the processes are forked (they inherit the launcher's imports, which
saves seconds each) and each gets ``cpu_count // N`` threads; on GPU they are
spawned (CUDA does not survive a fork), rank ``r`` on ``cuda:r``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt import meta, parallel
from graphopt.optimize import optimize
from graphopt.passes import all_pass_classes
from graphopt.specs import load_spec

log = logging.getLogger(__name__)

#: max abs tolerance of the sharded output against one process, by dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class RankStats:
    """What one rank measured."""

    rank: int
    weight_bytes: int  # every distinct tensor the sharded module holds
    sharded_weight_bytes: int  # this rank's shards of the sharded weights
    latency_s: float  # median forward time
    threads: int


@dataclass
class RunResult:
    """The outcome of :func:`run_sharded`."""

    spec: str
    nproc: int
    backend: str
    device: str
    ok: bool
    max_abs: float
    tolerance: float
    single_latency_s: float
    single_weight_bytes: int
    single_threads: int
    sharded_weights_full_bytes: int  # the weights the plan shards, whole
    allreduce_bytes_per_forward: int
    regions: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    ranks: list[RankStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LaunchError(RuntimeError):
    """A rank failed or the run timed out; the message has the first rank's error."""


def free_port() -> int:
    """A TCP port on localhost nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _to(obj: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, obj)


def _time_forward(fn: Any, args: tuple, kwargs: dict, iters: int, warmup: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            fn(*args, **kwargs)
        sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_abs(reference: Any, candidate: Any) -> float:
    ref, cand = pytree.tree_leaves(reference), pytree.tree_leaves(candidate)
    if len(ref) != len(cand):
        return math.inf
    worst = 0.0
    for r, c in zip(ref, cand):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            if tuple(r.shape) != tuple(c.shape):
                return math.inf
            worst = max(worst, float((r.double() - c.double().to(r.device)).abs().max()))
    return worst


def _worker(rank: int, cfg: dict[str, Any], results: Any) -> None:
    import torch.distributed as dist

    try:
        backend, world = cfg["backend"], cfg["nproc"]
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(cfg["threads"])
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=cfg["timeout"]))
        try:
            spec = load_spec(cfg["spec"])
            model = spec.model.to(device)
            args, kwargs = _to(spec.args, device), _to(spec.kwargs, device)
            target: Any = model
            if cfg["passes"] is not None:  # optimize first (e.g. merge_matmuls), then shard the result
                classes = {cls.name: cls for cls in all_pass_classes()}
                target = optimize(model, args, kwargs, passes=[classes[n]() for n in cfg["passes"]],
                                           **cfg["options"])
            sharded = parallel.shard(target, args, kwargs)
            del model, spec
            with torch.no_grad():
                out = sharded(*args, **kwargs)
            dist.barrier()
            latency = _time_forward(sharded, args, kwargs, cfg["iters"], cfg["warmup"], device)
            stats = RankStats(rank, parallel.weight_bytes(sharded), parallel.sharded_weight_bytes(sharded),
                              latency, torch.get_num_threads())
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, asdict(stats))
            if rank == 0:
                max_abs = _max_abs(cfg["reference"], _to(out, torch.device("cpu")))
                results.put(("ok", {"max_abs": max_abs, "ranks": gathered,
                                    "summary": sharded.meta[meta.TENSOR_PARALLEL],
                                    "declined": [f"{d.site}: {d.reason}" for d in
                                                 sharded.meta.get(meta.TENSOR_PARALLEL_DECLINED, [])]}))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the launcher, which raises it there
        results.put(("error", {"rank": rank, "type": type(exc).__name__, "message": str(exc),
                               "traceback": traceback.format_exc()}))
        raise


def run_sharded(
    spec: str,
    nproc: int = 2,
    *,
    backend: str | None = None,
    iters: int = 5,
    warmup: int = 1,
    timeout: float = 300.0,
    port: int | None = None,
    tolerance: float | None = None,
    passes: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> RunResult:
    """Run ``spec`` tensor-parallel on ``nproc`` local processes; see the module docstring.

    ``backend``: ``gloo`` (CPU) or ``nccl`` (one GPU per process); default:
    nccl when ``nproc`` GPUs are visible, else gloo. ``tolerance``: max abs
    difference allowed against one process (default by dtype: fp32 1e-5).
    ``passes`` (names, see ``graphopt passes``) and ``options``: run
    :func:`graphopt.optimize` with them on each rank before sharding, e.g.
    ``passes=["merge_matmuls"], options={"merge_matmuls_policy": "always"}``
    (``always`` keeps every rank's graph the same; measuring would decide per rank).
    Raises :class:`graphopt.parallel.ShardingError` when the model cannot be
    sharded over ``nproc`` (e.g. a head count not divisible by it) and
    :class:`LaunchError` when a rank fails or ``timeout`` seconds pass.
    """
    backend = _check_request(nproc, backend, passes)
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    reference, single_latency, single_bytes, tol = _single_process_reference(
        spec, device, iters, warmup, tolerance)
    cfg = {"spec": spec, "nproc": nproc, "backend": backend, "port": port or free_port(), "iters": iters,
           "warmup": warmup, "timeout": timeout, "reference": reference,
           "threads": max(1, (os.cpu_count() or 1) // nproc),
           "passes": list(passes) if passes is not None else None, "options": dict(options or {})}
    messages, failure = _run_ranks(cfg)
    report = _rank0_report(messages, failure)
    summary = report["summary"]
    return RunResult(
        spec=spec, nproc=nproc, backend=backend, device=str(device), ok=report["max_abs"] <= tol,
        max_abs=report["max_abs"], tolerance=tol, single_latency_s=single_latency, single_weight_bytes=single_bytes,
        single_threads=torch.get_num_threads(), sharded_weights_full_bytes=summary["sharded_full_bytes"],
        allreduce_bytes_per_forward=sum(b for _, b in summary["allreduce_bytes"]), regions=summary["regions"],
        declined=report["declined"], ranks=[RankStats(**r) for r in report["ranks"]])


def _check_request(nproc: int, backend: str | None, passes: Sequence[str] | None) -> str:
    """Validate the pass names, process count and backend; return the backend to use."""
    known = {cls.name for cls in all_pass_classes()}
    unknown = [p for p in passes or [] if p not in known]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; `graphopt passes` lists them: {', '.join(sorted(known))}")
    if nproc < 2:
        raise ValueError(f"--nproc {nproc}: tensor parallelism needs at least 2 processes")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"nccl needs one GPU per process: {nproc} processes, {torch.cuda.device_count()} GPUs")
    return backend


def _single_process_reference(
    spec: str, device: torch.device, iters: int, warmup: int, tolerance: float | None,
) -> tuple[Any, float, int, float]:
    """Run ``spec`` in this process: its output (on CPU), latency, weight bytes and the tolerance to hold."""
    built = load_spec(spec)
    model = built.model.to(device)
    args, kwargs = _to(built.args, device), _to(built.kwargs, device)
    with torch.no_grad():
        reference = _to(model(*args, **kwargs), torch.device("cpu"))
    single_latency = _time_forward(model, args, kwargs, iters, warmup, device)
    single_bytes = parallel.weight_bytes(model)
    first_float = next((x for x in pytree.tree_leaves(reference)
                        if isinstance(x, torch.Tensor) and x.is_floating_point()), None)
    tol = tolerance if tolerance is not None else TOLERANCE.get(
        first_float.dtype if first_float is not None else torch.float32, 1e-5)
    return reference, single_latency, single_bytes, tol


def _run_ranks(cfg: dict[str, Any]) -> tuple[list[tuple[str, dict]], BaseException | None]:
    """Start ``cfg["nproc"]`` workers, wait for them (killing any left at the deadline) and collect their messages."""
    import multiprocessing

    import torch.multiprocessing as tmp

    nproc, timeout = cfg["nproc"], cfg["timeout"]
    method = "spawn" if cfg["backend"] == "nccl" else "fork"
    results = multiprocessing.get_context(method).SimpleQueue()
    context = tmp.start_processes(_worker, args=(cfg, results), nprocs=nproc, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    messages: list[tuple[str, dict]] = []
    failure: BaseException | None = None
    try:
        while True:
            while not results.empty():
                messages.append(results.get())
            try:
                if context.join(timeout=1.0):
                    break
            except Exception as exc:  # a rank exited with an error; its message is in the queue
                failure = exc
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"the {nproc} processes did not finish within {timeout:.0f} s; killed them")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    while not results.empty():
        messages.append(results.get())
    return messages, failure


def _rank0_report(messages: list[tuple[str, dict]], failure: BaseException | None) -> dict[str, Any]:
    """Rank 0's result, or the first rank's error raised as ShardingError / LaunchError."""
    errors = [m for kind, m in messages if kind == "error"]
    if errors or failure is not None:
        first = min(errors, key=lambda e: e["rank"]) if errors else None
        if first is not None and first["type"] == "ShardingError":
            raise parallel.ShardingError(first["message"])
        detail = f"rank {first['rank']}: {first['type']}: {first['message']}" if first else str(failure)
        log.debug("rank traceback:\n%s", first["traceback"] if first else "")
        raise LaunchError(f"tensor-parallel run failed: {detail}")
    ok_messages = [m for kind, m in messages if kind == "ok"]
    if not ok_messages:
        raise LaunchError("rank 0 finished without reporting a result")
    return ok_messages[0]
