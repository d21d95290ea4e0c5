"""A generation bundle: the prefill and decode programs, the cache layout and the generation config, on disk.

Written by :meth:`graphopt.OptimizeResult.save` with ``generation=True`` (or
``graphopt convert --generate``) beside the single-forward ``model.pt2``;
read by :func:`graphopt.load`, which returns a :class:`LoadedGeneration`:
called like the model, and ``.generate(...)`` like the result it came from,
in a process without the model's code or transformers (the loop,
:mod:`graphopt.generate.loop`, and the sampling, :mod:`graphopt.generate.sampling`,
need neither).

Files: ``prefill.pt2`` and ``decode.pt2`` (each the step graph
``(input_ids, attention_mask, position_ids, cache_position, cache) -> logits``,
re-exported with its dynamic batch / prompt / cache axes; the cache is written
in place), and in ``graphopt.json`` under ``generation``: the cache layout
(per layer the key and value heads and head dims, the dtype, a sliding
window), ``max_length``, ``eos_token_id``, ``pad_token_id``, and the
teacher-forced check the graphs passed.

``loaded.compile_decode = True`` runs the decode program through
``torch.compile`` (:mod:`graphopt.generate.compiled`) where the deployment
machine has a compiler; without the original model there is nothing to
check it against, so it is off unless asked for.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from graphopt.errors import BadInput
from graphopt.generate.compiled import CompiledDecode
from graphopt.generate.loop import GenerationTimes, run_generation, weights_device
from graphopt.generate.settings import request_for
from graphopt.generate.step import CacheLayout
from graphopt.ops.kernel_calls import inline_kernel_calls
from graphopt.saved import LoadedModel, NotASavedModel, load_program, load_saved_model, program_path, save_program

__all__ = ["LoadedGeneration", "load_bundle", "save_generation_programs"]

PROGRAMS = {"prefill": "prefill.pt2", "decode": "decode.pt2"}


def save_generation_programs(graphs: Any, directory: str) -> dict[str, Any]:
    """Save ``graphs``' prefill and decode programs into ``directory``; the manifest's ``generation`` entry."""
    for name, file in PROGRAMS.items():
        result = getattr(graphs, name)
        save_program(result.module, result.example_args, result.example_kwargs, os.path.join(directory, file),
                     dynamic_shapes=graphs.dynamic_shapes.get(name))
    return {"programs": dict(PROGRAMS), "layout": graphs.layout.to_dict(), "max_length": graphs.max_length,
            "max_batch": graphs.max_batch, "vocab_size": graphs.vocab_size,
            "eos_token_id": graphs.eos_token_id, "pad_token_id": graphs.pad_token_id,
            "generation_defaults": dict(graphs.generation_defaults),
            "check": graphs.check.summary() if graphs.check is not None else None, "notes": list(graphs.notes)}


class LoadedGeneration(LoadedModel):
    """A loaded bundle: called like the model (its ``model.pt2``), and ``generate(...)`` like the result."""

    def __init__(self, model: LoadedModel, prefill: LoadedModel, decode: LoadedModel,
                 config: dict[str, Any]) -> None:
        super().__init__(model.program, model.structure, model.manifest)
        self.prefill, self.decode = prefill, decode
        self.layout = CacheLayout.from_dict(config["layout"])
        self.max_length = int(config["max_length"])
        # absent from bundles written before they were recorded: unchecked there
        self.max_batch = int(config["max_batch"]) if config.get("max_batch") else None
        self.vocab_size = int(config["vocab_size"]) if config.get("vocab_size") else None
        self.eos_token_id, self.pad_token_id = config.get("eos_token_id"), config.get("pad_token_id")
        #: the model's generation-config settings (absent from bundles written before they were recorded)
        self.generation_defaults: dict[str, Any] = dict(config.get("generation_defaults") or {})
        self.notes: list[str] = list(config.get("notes") or [])
        self.times = GenerationTimes()
        #: run decode through torch.compile (:class:`~graphopt.generate.compiled.CompiledDecode`; it falls back to
        #: the program, with ``compiled_note`` saying why, where it cannot compile)
        self.compile_decode = False
        self._compiled: CompiledDecode | None = None
        # what the loop runs: the programs with their weight-only ops as direct kernel calls
        self._prefill_step, self._decode_graph = _kernel_calls(prefill), _kernel_calls(decode)

    @property
    def compiled_note(self) -> str | None:
        """Why decode runs uncompiled although :attr:`compile_decode` is set (None: it runs compiled, or is off)."""
        return self._compiled.fallback_reason if self._compiled is not None else None

    def _decode_step(self) -> Any:
        if not self.compile_decode:
            return self._decode_graph
        if self.compile_decode is not True:
            raise BadInput(f"a loaded bundle's compile_decode takes True (torch.compile), not "
                           f"{self.compile_decode!r}; compile ahead of time (\"aot\") where the model is: "
                           "prepare_generation(model, compile_decode=\"aot\")")
        if self._compiled is None:
            self._compiled = CompiledDecode(self._decode_graph)
        return self._compiled

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: Any = ...,
                 pad_token_id: int | None = None, streamer: Any = None,
                 generator: torch.Generator | None = None, **settings: Any) -> torch.Tensor:
        """Generate as :meth:`graphopt.OptimizeResult.generate` does (same arguments, same tokens)."""
        named = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                 "top_k": top_k, "top_p": top_p, "pad_token_id": pad_token_id}
        request = request_for(self, input_ids, named, settings, eos_token_id, eos_unset=...)
        return run_generation(self._prefill_step, self._decode_step(), self.layout, input_ids, attention_mask,
                              max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                              eos_token_id=request.eos_token_id, pad_token_id=request.pad_token_id,
                              streamer=streamer, generator=generator, max_length=self.max_length,
                              max_batch=self.max_batch, vocab_size=self.vocab_size, times=self.times,
                              device=weights_device(self.prefill.graph_module))


def _kernel_calls(program: LoadedModel) -> LoadedModel:
    """``program`` running its weight-only ops as direct kernel calls
    (:func:`~graphopt.ops.kernel_calls.inline_kernel_calls`), or itself where it has none."""
    graph_module = inline_kernel_calls(program.graph_module)
    if graph_module is program.graph_module:
        return program
    return LoadedModel(program.program, program.structure, program.manifest, graph_module=graph_module)


def load_bundle(path: str, manifest: dict[str, Any]) -> LoadedGeneration:
    """The bundle in ``path`` (its ``graphopt.json`` already read and checked)."""
    config = manifest.get("generation")
    if not isinstance(config, dict) or not isinstance(config.get("programs"), dict):
        raise NotASavedModel(f"{path}: graphopt.json has no generation entry; save the bundle again")
    try:
        model = load_saved_model(path, manifest)
        prefill, decode = (load_program(program_path(path, config["programs"].get(k)), {"t": "leaf"})
                           for k in PROGRAMS)
        return LoadedGeneration(model, prefill, decode, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise NotASavedModel(f"{path}: graphopt.json's generation entry is incomplete ({exc}); "
                             "save the bundle again") from None
