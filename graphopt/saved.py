"""Saved programs that load without the model's code: flat outputs in the ``.pt2``, their structure in ``graphopt.json``.

A program exported from a transformers model returns a ``ModelOutput``; its
pytree spec names the class (``transformers.modeling_outputs.CausalLMOutput...``),
and ``torch.export.load`` can only rebuild it where that class is imported and
registered. graphopt therefore saves the program returning a **flat tuple of
tensors** (loads with plain ``torch.export.load`` anywhere torch is) and writes
the output's structure -- tuples, lists, dicts, ``None`` fields, a
``ModelOutput`` by class path and field names -- into ``graphopt.json``
beside it. :class:`LoadedModel` puts the structure back (:func:`rebuild_outputs`):
a ``ModelOutput`` of the recorded class when transformers is importable, else a
plain ``dict`` with the same field names in the same order. :func:`graphopt.load` (``graphopt/loading.py``)
reads what is saved here.

Why not torch's pytree serialization (``treespec_dumps``)? It names the same
classes and needs the same registration; what a deployment needs is the field
names, which a small JSON records.

Every program is read through :func:`graphopt.program_file.load_exported_program`
(weights-only: a file that needs a full unpickle is refused, no code runs).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch

from graphopt.errors import BadInput
from graphopt.program_file import NotAProgramFile, load_exported_program

__all__ = ["FORMAT", "FlatOutputs", "LoadedModel", "NotASavedModel", "flatten_outputs", "load_program", "load_saved_model",
           "output_structure", "program_path", "read_manifest", "rebuild_outputs", "save_program", "write_manifest"]

FORMAT, VERSION, MANIFEST = "graphopt.saved", 1, "graphopt.json"


class NotASavedModel(BadInput):
    """A path that holds no program graphopt saved (or one of another format version)."""


def _is_model_output(obj: Any) -> bool:
    cls = type(obj)
    return (isinstance(obj, dict) and cls.__module__.startswith("transformers.")
            and any(base.__name__ == "ModelOutput" for base in cls.__mro__))


def output_structure(obj: Any) -> dict[str, Any]:
    """A JSON description of ``obj``'s structure (tensors are leaves, in :func:`flatten_outputs` order)."""
    if isinstance(obj, torch.Tensor):
        return {"t": "leaf"}
    if obj is None:
        return {"t": "none"}
    if _is_model_output(obj):
        cls = type(obj)
        return {"t": "model_output", "class": f"{cls.__module__}.{cls.__qualname__}", "keys": list(obj.keys()),
                "items": [output_structure(v) for v in obj.values()]}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise BadInput(f"a model output dict with keys of type {sorted({type(k).__name__ for k in obj})} "
                           "cannot be saved; return str or int keys")
        return {"t": "dict", "keys": list(obj.keys()), "items": [output_structure(v) for v in obj.values()]}
    if isinstance(obj, (tuple, list)):  # a namedtuple comes back as a plain tuple
        return {"t": "list" if isinstance(obj, list) else "tuple", "items": [output_structure(v) for v in obj]}
    if isinstance(obj, (bool, int, float, str)):
        return {"t": "const", "value": obj}
    raise BadInput(f"a model output of type {type(obj).__name__} cannot be saved; return tensors in "
                   "tuples, lists, dicts or a transformers ModelOutput")


def flatten_outputs(obj: Any) -> list[torch.Tensor]:
    """The tensors of ``obj`` in the order :func:`output_structure` describes them."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flatten_outputs(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in flatten_outputs(v)]
    return []


def _output_class(path: str) -> type | None:
    """The recorded ModelOutput class, imported only from an installed ``transformers`` (never from the file)."""
    module, _, name = path.rpartition(".")
    if not module.startswith("transformers."):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001  (transformers absent or another version: a plain dict instead)
        return None


def rebuild_outputs(structure: dict[str, Any], leaves: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
    """The output ``structure`` describes, filled with ``leaves`` (what the flat program returned)."""
    it = iter(leaves)

    def build(node: dict[str, Any]) -> Any:
        kind = node["t"]
        if kind == "leaf":
            return next(it)
        if kind == "none":
            return None
        if kind == "const":
            return node["value"]
        items = [build(child) for child in node["items"]]
        if kind in ("tuple", "list"):
            return tuple(items) if kind == "tuple" else items
        fields = dict(zip(node["keys"], items))
        cls = _output_class(node["class"]) if kind == "model_output" else None
        return cls(**fields) if cls is not None else fields

    return build(structure)


class FlatOutputs(torch.nn.Module):
    """``module`` with its outputs flattened to a tuple of tensors: what is exported and saved.

    ``record`` (optional) is called with each call's :func:`output_structure`,
    so exporting it (one traced call) also tells what the flat tuple was. A
    callback rather than an attribute: torch.export puts back module state a
    traced call changed.
    """

    def __init__(self, module: Callable[..., Any],
                 record: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.inner = module
        self.record = record

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        out = self.inner(*args, **kwargs)
        if self.record is not None:
            self.record(output_structure(out))
        return tuple(flatten_outputs(out))


def write_manifest(directory: str, kind: str, **fields: Any) -> str:
    """Write ``graphopt.json`` (atomically) into ``directory``; returns its path."""
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "kind": kind, **fields}, f, indent=1)
    os.replace(tmp, path)
    return path


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a saved directory, checked (format, version); :class:`NotASavedModel` otherwise."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        raise NotASavedModel(f"{path}: no {MANIFEST} here; give a directory written by result.save() or "
                             "'graphopt convert', or a .pt2 file")
    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise NotASavedModel(f"{manifest}: unreadable ({type(exc).__name__}); save the model again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise NotASavedModel(f"{manifest}: not a graphopt manifest; give a directory written by result.save()")
    if data.get("version") != VERSION:
        raise NotASavedModel(f"{manifest}: format version {data.get('version')!r}, this graphopt reads "
                             f"{VERSION}; save it again with this graphopt")
    return data


class LoadedModel(torch.nn.Module):
    """A saved program called like the original model: same arguments, the output's structure rebuilt."""

    def __init__(self, program: torch.export.ExportedProgram, structure: dict[str, Any] | None,
                 manifest: dict[str, Any] | None = None, graph_module: torch.nn.Module | None = None) -> None:
        """``graph_module``: what runs the program (default: ``program.module()``)."""
        super().__init__()
        self.program = program
        self.graph_module = graph_module if graph_module is not None else program.module()
        self.structure = structure
        self.manifest = manifest or {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.graph_module(*args, **kwargs)
        if self.structure is None:
            return flat
        return rebuild_outputs(self.structure, flat if isinstance(flat, (tuple, list)) else (flat,))


def _program(path: str) -> torch.export.ExportedProgram:
    if not os.path.isfile(path):
        raise NotASavedModel(f"{path}: the program file is missing; save the model again")
    try:
        return load_exported_program(path)
    except NotAProgramFile:
        raise NotASavedModel(f"{path}: not a loadable torch.export program (not a zip archive, or truncated); "
                             "save the model again") from None
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001  (a truncated or foreign file: one line)
        raise NotASavedModel(f"{path}: not a loadable torch.export program "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def program_path(directory: str, name: Any) -> str:
    """``directory/name`` for a program a manifest names; refused unless ``name`` is a plain file name."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise NotASavedModel(f"{directory}: graphopt.json names the program {name!r}, not a file of this "
                             "directory; save the model again")
    return os.path.join(directory, name)


def load_program(path: str, structure: dict[str, Any] | None = None,
                 manifest: dict[str, Any] | None = None) -> LoadedModel:
    """One saved program file, weights-only, its outputs rebuilt from ``structure`` (None: the flat tuple)."""
    return LoadedModel(_program(path), structure, manifest)


def load_saved_model(directory: str, manifest: dict[str, Any]) -> LoadedModel:
    """The single-forward program of a saved directory (``graphopt.json`` already read), outputs rebuilt."""
    return load_program(program_path(directory, manifest.get("program", "model.pt2")), manifest.get("outputs"),
                        manifest)


def save_program(module: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], path: str,
                 dynamic_shapes: Any = None) -> dict[str, Any]:
    """Export ``module`` with flat outputs and save it to ``path`` (atomically); returns the output structure."""
    if isinstance(dynamic_shapes, (tuple, list)):  # positional shapes -> FlatOutputs' *args (and **kwargs)
        dynamic_shapes = {"args": tuple(dynamic_shapes), **({"kwargs": {k: None for k in kwargs}} if kwargs else {})}
    seen: list[dict[str, Any]] = []
    with torch.no_grad():  # the export's traced call records the structure: no eager run of its own
        program = torch.export.export(FlatOutputs(module, seen.append), args, kwargs, dynamic_shapes=dynamic_shapes,
                                      strict=False)
    if not seen:
        raise RuntimeError(f"exporting {type(module).__name__} never called it; nothing was saved at {path}")
    tmp = os.path.join(os.path.dirname(path) or ".", f".partial.{os.path.basename(path)}")  # torch wants .pt2
    torch.export.save(program, tmp)
    os.replace(tmp, path)
    return seen[-1]
