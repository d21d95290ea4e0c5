"""Decode tokens/s of a causal LM in onnxruntime (KV-cache graph) beside torch's, for ``graphopt convert``.

onnxruntime's side is :func:`~graphopt.onnx.kv_cache.export_kv_onnx`'s
past/present graph run by :class:`~graphopt.onnx.kv_cache.OrtKVGenerator`
(greedy, its own :class:`~graphopt.generate.loop.GenerationTimes`). torch's side
is graphopt's decode graph (``result.generate``) when the result already built
it (``graphopt convert --generate``), else the original model's transformers
``generate``: building graphopt's graphs only to time them would double the
command's work. Both are timed the same way per token
(:func:`~graphopt.generate.measure.time_generation` for torch), after one short
warm-up each, on the same greedy prompt; the figures are tokens per second per
batch row, on whatever load the machine has at the time.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.generate.measure import time_generation
from graphopt.onnx.kv_cache import OrtKVGenerator, export_kv_onnx
from graphopt.optimize import OptimizeResult

log = logging.getLogger(__name__)

#: tokens generated per timed run (decode steps timed: one fewer)
DECODE_TOKENS = 16
#: longest prompt taken from the example input
MAX_PROMPT = 32


@dataclass(frozen=True)
class DecodeSpeed:
    """Greedy decode speed of one prompt in onnxruntime and in torch, and whether their tokens agree."""

    onnxruntime_tokens_per_s: float
    torch_tokens_per_s: float
    torch_side: str  # "graphopt's decode graph" or "transformers' generate"
    prompt: int
    batch: int
    new_tokens: int
    same_tokens: bool

    def summary(self) -> str:
        """One line, as ``graphopt convert`` prints it."""
        ratio = self.onnxruntime_tokens_per_s / self.torch_tokens_per_s if self.torch_tokens_per_s else 0.0
        agree = "same greedy tokens" if self.same_tokens else "greedy tokens differ"
        return (f"decode: onnxruntime {self.onnxruntime_tokens_per_s:.1f} tokens/s (KV-cache graph) vs torch "
                f"{self.torch_tokens_per_s:.1f} tokens/s ({self.torch_side}), x{ratio:.2f}; prompt {self.prompt}, "
                f"batch {self.batch}, {self.new_tokens} tokens, {agree}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``report.extra["onnx"]["decode_speed"]``)."""
        d = asdict(self)
        d["onnxruntime_tokens_per_s"] = round(self.onnxruntime_tokens_per_s, 2)
        d["torch_tokens_per_s"] = round(self.torch_tokens_per_s, 2)
        d["summary"] = self.summary()
        return d


def prompt_of(result: OptimizeResult) -> torch.Tensor:
    """The example's ``input_ids`` (at most :data:`MAX_PROMPT` tokens) as the prompt to time."""
    ids = result.example_kwargs.get("input_ids") if result.example_kwargs else None
    ids = ids if ids is not None else next(iter(result.example_args), None)
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.ndim != 2:
        raise ValueError("the example input has no (batch, seq) input_ids to time generation with")
    return ids[:, :MAX_PROMPT].long()


def compare_decode_speed(result: OptimizeResult, new_tokens: int = DECODE_TOKENS,
                         threads: int | None = None) -> DecodeSpeed:
    """Time greedy decoding of ``result``'s causal LM in onnxruntime and in torch (see the module docstring)."""
    model = result.source_model
    if model is None:
        raise ValueError("this result has no source model to export with a KV cache")
    ids = prompt_of(result)
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory(prefix="graphopt-decode-") as tmp:
        with contextlib.redirect_stdout(None):  # torch.onnx's progress lines would break `convert --json`
            path = export_kv_onnx(model, Path(tmp) / "decode_kv.onnx")
        session = OrtKVGenerator(path, threads=threads)
        session.generate(ids.numpy(), mask.numpy(), 2)  # warm-up
        ort = session.generate(ids.numpy(), mask.numpy(), new_tokens)
    side, generate, kwargs = _torch_side(result, model)
    time_generation(generate, ids, mask, 3, **kwargs(3))  # warm-up
    figures = time_generation(generate, ids, mask, new_tokens, **kwargs(new_tokens))
    torch_tokens = figures.tokens[:, ids.shape[1]:].numpy()
    speed = DecodeSpeed(ort.decode_tokens_per_s, figures.decode_tokens_per_s, side, int(ids.shape[1]),
                        int(ids.shape[0]), new_tokens, bool(np.array_equal(torch_tokens, ort.tokens)))
    log.info("%s", speed.summary())
    return speed


def _torch_side(result: OptimizeResult, model: torch.nn.Module) -> tuple[str, Callable[..., Any], Callable[[int], dict]]:
    """torch's generate to time: its name, the callable, its keyword arguments for a number of new tokens."""
    if result.generation is not None:
        return "graphopt's decode graph", result.generate, lambda n: {"eos_token_id": None}
    return ("transformers' generate", model.generate,
            lambda n: {"min_new_tokens": n, "do_sample": False, "pad_token_id": 0, "use_cache": True})
