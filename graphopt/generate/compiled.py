"""The decode graph compiled by torch.compile (inductor): the step's small ops fused, its overhead gone.

At batch 1 a decode step of the optimized graph is a few weight-streaming
kernels (the linears) and about 300 small ops (norms, rotary embeddings,
cache writes, views, the weight-only ops' casts), each paying a dispatch of
a few microseconds; on the 4-layer Llama of benchmarks/generate.py those
small ops are about half of an int4 step. Inductor fuses them into a few
generated C++ (CPU) or Triton (GPU) kernels and calls the linears' kernels
as they are. graphopt's own rewrites (fused attention, merged and
weight-only linears, precision) stay: inductor compiles the graph they
made, it does not re-plan it. It is handed the graph as the loop runs it
(``GenerationGraphs.runnable``: the weight-only ops as direct kernel calls,
:mod:`graphopt.ops.kernel_calls`), so their casts fuse too; an opaque op's
Python body cost about as much as its int4 kernel.

Why torch.compile rather than more fusion passes of our own: it is the
well-kept code generator for exactly this (elementwise and reduction fusion
across any op sequence), and the graph is already an exported FX graph with
custom ops that declare fake kernels, which is what it consumes.

The compile is ``dynamic=True``: the cache length changes with every prompt
and ``max_new_tokens``, and one compile serves them all (batch 1 and larger
batches are two compiles: torch specialises sizes of 1). A compile that fails
(no C++ compiler, an op inductor cannot lower) leaves the graph running and
says why in :attr:`CompiledDecode.fallback_reason`; the build checks the
compiled step end to end like the graphs (``graphs.check``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]


class CompiledDecode:
    """``decode(token, mask, positions, cache_position, cache)`` through ``torch.compile(decode, dynamic=True)``.

    ``compiler`` makes the compiled callable (default :func:`torch.compile`;
    :func:`graphopt.generate.aot.aot_compiler` for AOTInductor; tests pass one
    that fails), ``name`` names it in :attr:`fallback_reason`. Falls back to
    ``decode`` itself, for good, when compiling or running the compiled step
    raises.
    """

    def __init__(self, decode: Step, *, compiler: Callable[..., Step] | None = None,
                 name: str = "torch.compile") -> None:
        self.decode, self.name = decode, name
        self.fallback_reason: str | None = None
        compile_fn = compiler if compiler is not None else torch.compile
        try:
            self.compiled: Step | None = compile_fn(decode, dynamic=True)
        except Exception as exc:  # noqa: BLE001  (any failure means: run the graph as it is)
            self._fall_back(f"{name} failed", exc)

    def __call__(self, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache_position: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(token, mask, positions, cache_position, cache)
            except Exception as exc:  # noqa: BLE001  (a compile happens at the first call of each shape)
                self._fall_back("the compiled decode step failed", exc)
        return self.decode(token, mask, positions, cache_position, cache)

    def _fall_back(self, what: str, exc: Exception) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        self.fallback_reason = f"{what} ({type(exc).__name__}: {first[:300]})"
        self.compiled = None
        log.warning("decode runs uncompiled: %s", self.fallback_reason)
