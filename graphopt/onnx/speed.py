"""onnxruntime latency of several ONNX models side by side, in one process; the plain export to compare with.

Every model gets its own ``InferenceSession`` with the *same* session options;
runs are interleaved round by round (the order rotates each round), so a
noisy machine slows every model alike instead of whichever happened to run
during the noise. The median over ``runs`` is the figure to quote.

>>> stats = compare_latency({"plain": "plain.onnx", "graphopt": "model.onnx"}, feeds)  # doctest: +SKIP
>>> stats["graphopt"].median_ms                                                       # doctest: +SKIP

:func:`export_plain` is the baseline: ``torch.onnx.export`` of the original
model with torch.onnx's defaults; :func:`compare_with_plain_export` times it
against graphopt's file (``export_onnx(..., compare_speed=True)``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from graphopt.onnx.files import save_model
from graphopt.onnx.moe import grouped_mm_translations
from graphopt.onnx.torch_run import as_tuple, inference, to_numpy


@dataclass(frozen=True)
class Latency:
    """Latency of one model over ``runs`` timed runs (after warm-up), in milliseconds."""

    median_ms: float
    min_ms: float
    mean_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def session_options(threads: int | None = None) -> Any:
    """onnxruntime's default session options (all graph optimizations), optionally with a thread count."""
    import onnxruntime as ort  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnxruntime

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only: shape-merge warnings are noise here
    return so


def describe_session_options(so: Any) -> dict[str, Any]:
    """The session options that matter for a timing, as the report shows them."""
    return {
        "graph_optimization_level": str(so.graph_optimization_level).rsplit(".", 1)[-1],
        "intra_op_num_threads": so.intra_op_num_threads or f"default ({os.cpu_count()} cores visible)",
        "execution_mode": str(so.execution_mode).rsplit(".", 1)[-1],
    }


def make_session(model: str | bytes | os.PathLike[str], so: Any = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime ``InferenceSession`` for a file (or serialized model) with ``so`` (default options)."""
    import onnxruntime as ort  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnxruntime

    model = os.fspath(model) if not isinstance(model, bytes) else model
    return ort.InferenceSession(model, so if so is not None else session_options(), providers=list(providers))


def feed_for(session: Any, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Name ``inputs`` (in order) after the session's graph inputs."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {names}, got {len(inputs)} tensors")
    return dict(zip(names, inputs))


def compare_latency(
    models: Mapping[str, str | bytes | os.PathLike[str]],
    inputs: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]],
    *,
    runs: int = 10,
    warmup: int = 2,
    so: Any = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Latency]:
    """Median/min/mean latency of each model, sessions built with the same options, runs interleaved.

    ``inputs``: one list of arrays fed to every model by position, or a
    ``{model name: arrays}`` mapping.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    so = so if so is not None else session_options()
    sessions = {name: make_session(path, so, providers) for name, path in models.items()}
    feeds = {name: feed_for(s, inputs[name] if isinstance(inputs, Mapping) else inputs)
             for name, s in sessions.items()}
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Latency(statistics.median(ts), min(ts), statistics.fmean(ts), len(ts)) for name, ts in times.items()}


def export_plain(model_or_program: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                 path: str | os.PathLike[str] | None = None, opset: int | None = None) -> Any:
    """The plain ``torch.onnx.export`` (dynamo) of a model, with torch.onnx's defaults; saved when ``path``.

    It gets one translation torch.onnx lacks, the MoE grouped matmul's (:mod:`graphopt.onnx.moe`):
    without it a mixture-of-experts model has no plain export to compare with at all.
    """
    is_module = isinstance(model_or_program, torch.nn.Module)
    with inference(model_or_program), torch.no_grad(), contextlib.redirect_stdout(None):
        program = torch.onnx.export(model_or_program, as_tuple(args) if is_module else (),
                                    kwargs=dict(kwargs or {}) if is_module else None, dynamo=True,
                                    opset_version=opset, verbose=False,
                                    custom_translation_table=grouped_mm_translations() or None)
    if path is not None:
        save_model(program.model, os.fspath(path))
    return program


def compare_with_plain_export(baseline: Any, args: tuple, kwargs: dict, graphopt_path: str,
                              tensors: list[torch.Tensor], scratch: str, runs: int,
                              threads: int | None) -> dict[str, Any]:
    """Time :func:`export_plain` of ``baseline`` against the file at ``graphopt_path`` (what the report shows).

    The plain file is built in a temporary directory under ``scratch`` and removed.
    """
    plain_dir = tempfile.mkdtemp(prefix="plain-", dir=scratch)
    plain_path = os.path.join(plain_dir, "plain.onnx")
    export_plain(baseline, args, kwargs, plain_path)
    so = session_options(threads)
    feed = [to_numpy(x) for x in tensors]
    stats = compare_latency({"plain": plain_path, "graphopt": graphopt_path}, feed, runs=runs, so=so)
    shutil.rmtree(plain_dir, ignore_errors=True)
    plain, ours = stats["plain"], stats["graphopt"]
    return {
        "plain": plain.to_dict(),
        "graphopt": ours.to_dict(),
        "speedup": round(plain.median_ms / ours.median_ms, 3) if ours.median_ms > 0 else None,
        "inputs": [list(x.shape) for x in tensors],
        "session_options": describe_session_options(so),
        "method": "one process, same session options, runs interleaved; plain = torch.onnx.export of the "
                  "original model with its defaults",
    }
