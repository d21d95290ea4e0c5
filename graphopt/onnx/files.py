"""Saving an ONNX model: external data above 1 GiB, built in a scratch directory and moved into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

#: above this many bytes of weights, they go to an external data file next to the model
EXTERNAL_DATA_THRESHOLD = 1 << 30


def weight_bytes(model: Any) -> int:
    """Bytes of the model's initializers."""
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: Any, path: str) -> None:
    """Save an onnx_ir model; weights over :data:`EXTERNAL_DATA_THRESHOLD` go to ``path + ".data"``."""
    import onnx_ir as ir  # lazy: keeps `import graphopt` (and the CLI's start-up) free of onnx_ir

    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    else:
        ir.save(model, path)


@contextlib.contextmanager
def scratch_directory_for(path: str) -> Iterator[str]:
    """A temporary directory next to ``path`` (created with its parents), removed afterwards."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=directory)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def move_into_place(scratch: str, directory: str) -> list[str]:
    """Move every file of ``scratch`` into ``directory``; return their new paths."""
    moved = []
    for name in sorted(os.listdir(scratch)):
        dest = os.path.join(directory, name)
        os.replace(os.path.join(scratch, name), dest)
        moved.append(dest)
    return moved
