"""Atomic output directories for the commands that write one (``optimize``, ``convert``).

Everything is built in a temporary directory next to ``DIR`` and published
at the end: a new ``DIR`` is the temporary directory renamed (one atomic
step); an existing one (allowed only with ``--force``, or when empty) gets
each new file by ``os.replace`` and loses graphopt outputs of an earlier run
that this run did not write (so a stale ``graph.html`` never sits next to a
new model). Files of your own in an existing ``DIR`` are left alone. On any
failure the temporary directory is removed: no half-written outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from graphopt.commands.common import UsageError

#: every file a graphopt command may write into DIR
OUTPUT_NAMES = ("model.pt2", "model.onnx", "model.onnx.data", "report.json", "report.md", "graph.html")


def check_output_dir(path: str, force: bool) -> None:
    """Refuse a ``DIR`` that exists (and is not empty) unless ``force``; refuse a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a directory; choose another -o")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise UsageError(f"{path} already exists and is not empty; pass --force to replace graphopt's "
                         f"files in it, or choose another -o")


@contextlib.contextmanager
def staged_output_dir(path: str, force: bool) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; publish its files into ``path`` when the block succeeds."""
    check_output_dir(path, force)
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; DIR gets the usual permissions
    try:
        yield staging
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staging: str, target: str) -> None:
    """Move the files of ``staging`` into ``target`` (renaming the whole directory when it is new)."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    produced = set(os.listdir(staging))
    for name in sorted(produced):
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in OUTPUT_NAMES:
        stale = os.path.join(target, name)
        if name not in produced and os.path.isfile(stale):
            os.remove(stale)
