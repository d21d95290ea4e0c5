"""The decode graph compiled ahead of time by AOTInductor: one C++ step, no guards, no Python between kernels.

``torch.compile`` (:mod:`graphopt.generate.compiled`) fuses the decode step's
small ops, but each call still goes through TorchDynamo (its guards check
every input and weight) and inductor's Python wrapper, which calls the
kernels one by one. On the benchmark Llama at batch 1 that is about 1 ms of a
6 ms fp32 step on CPU (profile: the guard check 0.26 ms, the wrapper 0.67 ms).
AOTInductor compiles the same graph, with the same fusions, into a shared
library whose C++ wrapper calls the kernels; a step is one call into it.
Measured on that Llama (Intel Xeon, 2 threads): fp32 4.1 against 5.2 ms per
step under ``torch.compile``, int8 weight-only 1.6 against 2.1 ms.

Why AOTInductor rather than a runner of our own: it is torch's own
ahead-of-time compiler for exported programs, which is what the decode graph
already is, and it keeps graphopt's rewrites and custom-op kernels as they are.

The price is the compile: an export, then a C++ build of the whole step
(15-30 s on 2 cores), once per build. The compiled step is exported with the
decode graph's own dynamic axes (batch, cache length), so one compile serves
every batch and cache length. Its weights are the graph's own tensors: after
loading, the library's copies are replaced by pointers to them
(``load_constants(user_managed=True)``), so the weights are not held twice.
Constants inductor made itself (an int4 kernel's group size) stay the
library's. The package is written to a temporary directory and removed once
loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from graphopt import ir

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]


class AotStep:
    """A decode step compiled by AOTInductor, called like the graph it was compiled from."""

    def __init__(self, runner: Any, weights: dict[str, torch.Tensor]) -> None:
        self.runner = runner
        #: the graph's tensors the library points at (``user_managed``: they must outlive it)
        self.weights = weights

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.runner(*args)


def aot_compiler(example_args: tuple[Any, ...], dynamic_shapes: Any) -> Callable[..., Step]:
    """A compiler for :class:`~graphopt.generate.compiled.CompiledDecode`: ``compiler(decode) -> step``, the step
    compiled by AOTInductor at ``example_args`` with ``dynamic_shapes`` (the decode graph's own)."""

    def compile_ahead_of_time(decode: torch.nn.Module, **_ignored: Any) -> Step:
        return aot_compile(decode, example_args, dynamic_shapes)

    return compile_ahead_of_time


def aot_compile(module: torch.nn.Module, example_args: tuple[Any, ...], dynamic_shapes: Any) -> AotStep:
    """Export ``module`` at ``example_args`` with ``dynamic_shapes``, compile it with AOTInductor and load it,
    its weights pointing at ``module``'s own. Raises what export or the compile raises."""
    with torch.no_grad():
        program = torch.export.export(module, example_args, dynamic_shapes=dynamic_shapes, strict=False)
    workdir = tempfile.mkdtemp(prefix="graphopt-aot-")
    try:
        with ir.quiet_leafspec_deprecation():
            path = torch._inductor.aoti_compile_and_package(program,
                                                            package_path=os.path.join(workdir, "decode.pt2"))
        runner = torch._inductor.aoti_load_package(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    exported = {**program.state_dict, **program.constants}
    weights = {}
    for name in runner.get_constant_fqns():
        own = _own_tensor(module, name, exported.get(name))
        if own is not None:
            weights[name] = own
    runner.load_constants(weights, check_full_update=False, user_managed=True)
    log.info("decode compiled ahead of time: %d of its constants point at the graph's own",
             len(weights))
    return AotStep(runner, weights)


def _own_tensor(module: torch.nn.Module, name: str, exported: Any) -> torch.Tensor | None:
    """The tensor the library's constant ``name`` should point at: ``module``'s own where it has one like
    ``exported`` (export copies a graph's plain tensor attributes, weight_layout's transposed weights among them,
    into ``program.constants``), else the program's ``exported``; None where the program has none (a constant
    inductor made, which stays the library's)."""
    if not isinstance(exported, torch.Tensor):
        return None
    owner: Any = module
    for part in name.split("."):
        owner = getattr(owner, part, None)
    if isinstance(owner, torch.Tensor) and owner.shape == exported.shape and owner.dtype == exported.dtype \
            and owner.stride() == exported.stride():
        return owner.detach()
    return exported
