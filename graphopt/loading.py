"""``graphopt.load``: what ``result.save`` / ``graphopt convert`` wrote, loaded without the model's code.

The saved format is :mod:`graphopt.saved` (flat-output programs, their
structure in ``graphopt.json``); this module reads a path and returns what it
holds.
"""

from __future__ import annotations

import os
from typing import Any

from graphopt.generate.bundle import load_bundle
from graphopt.saved import NotASavedModel, load_program, load_saved_model, read_manifest

__all__ = ["NotASavedModel", "load"]


def load(path: str | os.PathLike[str]) -> Any:
    """Load a saved model: called like the original, no model code, no transformers needed.

    ``path``: a directory written by :meth:`graphopt.OptimizeResult.save` or
    ``graphopt convert`` (its ``graphopt.json`` says what it holds), or a
    ``.pt2`` file (then the outputs come back as the program returns them).
    A generation bundle (saved with ``generation=True``) comes back as a
    :class:`graphopt.generate.bundle.LoadedGeneration`, which is also
    ``.generate(...)``. Otherwise returns a :class:`graphopt.saved.LoadedModel`: ``model(*args, **kwargs)``
    with the original's arguments; outputs rebuilt as the original's (a
    transformers ``ModelOutput`` where transformers is importable, else a
    ``dict`` of the same fields, in the same order). Programs are read
    weights-only: no code from the file runs. Anything else is refused with
    :class:`graphopt.saved.NotASavedModel` (one line; exit 2 in the CLI).

    >>> import graphopt                                      # doctest: +SKIP
    >>> model = graphopt.load("out/")                        # doctest: +SKIP
    >>> logits = model(input_ids).logits                     # doctest: +SKIP
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".pt2"):
            raise NotASavedModel(f"{path}: not a .pt2 program or a directory graphopt saved")
        return load_program(path)
    if not os.path.isdir(path):
        raise NotASavedModel(f"{path}: no such file or directory")
    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind == "model":
        return load_saved_model(path, manifest)
    if kind == "generation":
        return load_bundle(path, manifest)
    raise NotASavedModel(f"{path}: holds a {kind!r}, which this graphopt cannot load; upgrade graphopt")
