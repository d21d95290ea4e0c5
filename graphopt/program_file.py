"""Reading a saved ``torch.export`` program (``.pt2``) without running code from it.

A ``.pt2`` file is a zip archive. Its graph is JSON, but its example inputs
(``data/sample_inputs/*.pt``) and any weight or constant marked
``use_pickle`` are read with ``torch.load``, and ``torch.export.load`` falls
back to ``weights_only=False`` when the safe reader refuses an entry -- so a
crafted file runs whatever its pickle says (``__reduce__``) while the
program looks normal. graphopt reads every such entry weights-only (tensors,
containers and plain values; no arbitrary classes or functions) by setting
torch's own switch, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, for the duration of
the load, and refuses a file that needs more with :class:`UnsafeProgramFile`
naming the entry. Only a ``module:factory`` spec runs user code
(docs/getting-started.md, "Security").

Written here rather than taken from torch because torch offers no
weights-only switch on ``torch.export.load`` itself (its pickle fallback is
unconditional); the environment switch is the one it honours everywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator

import torch

from graphopt.errors import BadInput

log = logging.getLogger(__name__)

__all__ = ["NotAProgramFile", "UnsafeProgramFile", "load_exported_program", "weights_only_loading"]

_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_ENV_LOCK = threading.Lock()


class UnsafeProgramFile(BadInput):
    """A ``.pt2`` file with an entry that only a full pickle load can read (it could run code)."""


class NotAProgramFile(BadInput):
    """A file that is not a ``.pt2`` archive at all (random bytes, truncated, another format)."""


@contextlib.contextmanager
def _torch_export_log_quiet() -> Iterator[None]:
    """torch.export.load logs a full traceback (as a warning) before it re-raises; graphopt reports the
    failure in one line, so that log is held back unless graphopt's debug logging is on."""
    logger = logging.getLogger("torch.export")
    if logging.getLogger("graphopt").isEnabledFor(logging.DEBUG):
        yield
        return
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside reads weights-only, whatever its caller asked for (then restores the env)."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
        os.environ[_FORCE] = "1"
        os.environ.pop(_FORCE_NO, None)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _import_output_modules(path: str) -> None:
    """Import the transformers modules whose output classes the file names (pytree needs them registered).

    Only modules under ``transformers.`` that are installed: code of the
    user's environment, never code from the file.
    """
    with contextlib.suppress(Exception), zipfile.ZipFile(path) as zf:
        text = " ".join(zf.read(n).decode("utf-8", "ignore") for n in zf.namelist() if n.endswith(".json"))
        for mod in sorted(set(re.findall(r"(transformers\.[A-Za-z0-9_.]+)\.[A-Z][A-Za-z0-9_]*", text))):
            with contextlib.suppress(Exception):
                importlib.import_module(mod)


def _pickled_entries(zf: zipfile.ZipFile) -> list[str]:
    """The archive entries torch reads with ``torch.load``: example inputs, and weights or constants
    their payload config marks ``use_pickle`` (the others are raw tensor bytes)."""
    names = zf.namelist()
    pickled = [n for n in names if "/data/sample_inputs/" in f"/{n}" and not n.endswith("/")]
    for config in (n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))):
        folder = config.rsplit("/", 1)[0]
        with contextlib.suppress(Exception):
            entries = json.loads(zf.read(config)).get("config", {})
            pickled += [f"{folder}/{meta['path_name']}" for meta in entries.values()
                        if isinstance(meta, dict) and meta.get("use_pickle")]
    return [n for n in pickled if n in names]


def _entries_needing_pickle(path: str) -> list[tuple[str, str]]:
    """``(entry, why)`` for each pickled entry of the archive that the weights-only reader refuses."""
    found = []
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as zf:
        for name in _pickled_entries(zf):
            try:
                torch.load(io.BytesIO(zf.read(name)), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any refusal names the entry
                found.append((name, _refusal_reason(exc)))
    return found


def _refusal_reason(exc: BaseException) -> str:
    """What the weights-only reader refused (``Unsupported global: GLOBAL builtins.open``), in plain text."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"Unsupported (?:global: GLOBAL [\w.]+|operand[^\n.]*)", text)
    return match.group(0).strip() if match else (text.strip().splitlines() or [type(exc).__name__])[0][:160]


def _is_weights_only_refusal(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_exported_program(path: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of ``path`` with every pickled entry read weights-only.

    Raises :class:`UnsafeProgramFile` (one line, naming the entry) when an
    entry needs a full pickle load; other failures propagate as torch raises them.
    """
    if not zipfile.is_zipfile(path):
        raise NotAProgramFile(f"{path} is not a torch.export program (a .pt2 is a zip archive; this file is not "
                              "one, or it is truncated): write it with torch.export.save or graphopt convert")
    _import_output_modules(path)
    with weights_only_loading(), _torch_export_log_quiet():
        try:
            return torch.export.load(path)
        except Exception as exc:
            if not _is_weights_only_refusal(exc):
                raise
            unsafe = _entries_needing_pickle(path)
    where = (f"entry {unsafe[0][0]!r} ({unsafe[0][1]})" if unsafe
             else "an entry of it")
    raise UnsafeProgramFile(
        f"{path}: refused: {where} can only be read by unpickling arbitrary objects, which could run code; "
        "graphopt reads model files weights-only. Re-save the program with torch.export.save from code you "
        "trust, or give the model as 'file.py:factory'")
