"""The decode step replayed from CUDA graphs: one capture per batch size and cache length.

A decode step on a GPU is many small kernels, and at batch 1 their launch
overhead is most of the step (gpt-fast's and transformers' "reduce-overhead"
recipe). :class:`CudaGraphDecode` wraps the decode graph: the first step of a
(batch, cache) pair is captured once with ``torch.cuda.CUDAGraph``, every
later step copies its few small inputs (token, mask, positions, cache
position) into the capture's static buffers and replays it.

A CUDA graph replays fixed device addresses, so the KV cache must stay where
it was at capture: the wrapper owns the caches (:meth:`CudaGraphDecode.allocate`,
which the generation loop calls instead of :meth:`CacheLayout.allocate`), pooled
per (batch, bucketed length) and zeroed for each generation, and the captures
are keyed by the cache's storage. Replays are idempotent where the capture's
warm-up runs are: a decode step writes the new token's keys and values at
``cache_position`` and reads the cache, so running it twice on the same
inputs writes the same values.

Why not ``torch.compile(mode="reduce-overhead")``? It recompiles the graph
(minutes for an LLM) and its CUDA graph trees reject outputs read after the
next replay ("accessing tensor output of CUDAGraphs that has been overwritten",
seen with transformers' static cache under torch 2.11); the decode graph is
already optimized and only needs replaying.

When capture is impossible (no CUDA device, or the graph syncs with the host
during capture) the wrapper runs the decode graph directly and says why in
:attr:`CudaGraphDecode.fallback_reason`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.generate.step import CacheLayout

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]

#: cache lengths are rounded up to a multiple of this, so prompts of nearby lengths share a capture
LENGTH_BUCKET = 64
#: caches (and their captures) kept at once; the oldest is released first
POOL_SIZE = 4


@dataclass
class Replay:
    """A captured step: ``replay()`` reruns it on whatever its static inputs hold; ``output`` is written by it."""

    replay: Callable[[], None]
    output: torch.Tensor


class CudaGraphCapturer:
    """Captures a step with ``torch.cuda.CUDAGraph`` after warm-up runs on a side stream (torch's recipe)."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup

    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return Replay(graph.replay, out)


def capture_unavailable(device: torch.device) -> str | None:
    """Why CUDA graphs cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; the decode graph runs on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device; torch.cuda is not available"
    return None


def bucketed_length(length: int, max_length: int | None) -> int:
    """``length`` rounded up to :data:`LENGTH_BUCKET`, never past ``max_length``."""
    rounded = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    return min(rounded, max_length) if max_length else rounded


@dataclass
class _Captured:
    replay: Replay
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class CudaGraphDecode:
    """``decode(token, mask, positions, cache_position, cache)`` replayed from CUDA graphs.

    ``decode`` is the decode graph (any callable shaped like
    :class:`~graphopt.generate.step.CausalLMStep`). ``capturer`` makes the
    captures (default :class:`CudaGraphCapturer`; tests pass one that runs on
    the CPU). Returns the step's logits, a fresh tensor each step.
    """

    def __init__(self, decode: Step, layout: CacheLayout, *, max_length: int | None = None,
                 capturer: Any = None) -> None:
        self.decode, self.layout, self.max_length = decode, layout, max_length
        self.capturer = capturer if capturer is not None else CudaGraphCapturer()
        self.fallback_reason: str | None = None
        self.captures = 0
        self._caches: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._graphs: dict[tuple, _Captured] = {}

    def allocate(self, batch: int, length: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """A zeroed cache of at least ``length`` positions, reused across generations of the same size."""
        key = (batch, bucketed_length(length, self.max_length), str(device))
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = self.layout.allocate(batch, key[1], device)
            while len(self._caches) >= POOL_SIZE:
                _, old = self._caches.popitem(last=False)
                self._forget(old)
        else:
            for c in cache:
                c.zero_()
        self._caches[key] = cache
        return cache

    def __call__(self, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache_position: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        if self.fallback_reason is None and self._capturer_needs_cuda():
            self.fallback_reason = capture_unavailable(token.device)
        if self.fallback_reason is not None:
            return self.decode(token, mask, positions, cache_position, cache)
        key = (tuple(token.shape), tuple(mask.shape), tuple(c.data_ptr() for c in cache))
        entry = self._graphs.get(key)
        inputs = (token, mask, positions, cache_position)
        if entry is None and not self._pooled(cache):  # a capture would pin a cache the caller may drop
            return self.decode(token, mask, positions, cache_position, cache)
        if entry is None:
            entry = self._capture(inputs, cache, key)
            if entry is None:
                return self.decode(token, mask, positions, cache_position, cache)
        for static, value in zip(entry.inputs, inputs):
            static.copy_(value)
        entry.replay.replay()
        return entry.replay.output.clone()

    def _pooled(self, cache: list[torch.Tensor]) -> bool:
        return any(len(c) == len(cache) and all(a is b for a, b in zip(c, cache)) for c in self._caches.values())

    def _capturer_needs_cuda(self) -> bool:
        return isinstance(self.capturer, CudaGraphCapturer)

    def _capture(self, inputs: tuple[torch.Tensor, ...], cache: list[torch.Tensor], key: tuple) -> _Captured | None:
        static = tuple(x.clone() for x in inputs)
        try:
            replay = self.capturer.capture(lambda: self.decode(*static, cache))
        except Exception as exc:  # noqa: BLE001  (any capture failure means: run without graphs)
            self.fallback_reason = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            log.warning("decode runs without CUDA graphs: %s", self.fallback_reason)
            return None
        self.captures += 1
        entry = _Captured(replay, static)  # type: ignore[arg-type]
        self._graphs[key] = entry
        return entry

    def _forget(self, cache: list[torch.Tensor]) -> None:
        ptrs = tuple(c.data_ptr() for c in cache)
        for key in [k for k in self._graphs if k[2] == ptrs]:
            del self._graphs[key]
