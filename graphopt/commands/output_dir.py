"""Atomic output directories for the commands that write one (``optimize``, ``convert``).

Everything is built in a temporary directory next to ``DIR`` and published
at the end: a new ``DIR`` is the temporary directory renamed (one atomic
step); an existing one (allowed only with ``--force``, or when empty) gets
each new file by ``os.replace`` and loses graphopt outputs of an earlier run
that this run did not write (so a stale ``graph.html`` never sits next to a
new model). Files of your own in an existing ``DIR`` are left alone. On any
failure the temporary directory is removed: no half-written outputs.

Publication cannot lose a run: a new ``DIR`` is claimed by one
``os.rename`` of the (non-empty) staging directory, which fails when ``DIR``
has meanwhile appeared with files (two runs into one new directory: the
second gets :class:`OutputConflict`, exit 2). Staging directories are named
``.DIR.partial-PID-XXXX``; those of a process that is no longer alive (killed
by SIGKILL, say) are removed by the next run into ``DIR``. The CLI turns
SIGTERM into the same unwinding as Ctrl-C, so the staging directory goes too.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from graphopt.commands.common import UsageError

log = logging.getLogger(__name__)

#: every file a graphopt command may write into DIR
OUTPUT_NAMES = ("model.pt2", "graphopt.json", "prefill.pt2", "decode.pt2", "model.onnx", "model.onnx.data", "report.json", "report.md", "graph.html")


def check_output_dir(path: str, force: bool) -> None:
    """Refuse, before any work, a ``DIR`` graphopt could not publish into.

    A file; a ``DIR`` that exists (and is not empty) unless ``force``; one
    holding a directory where graphopt writes a file (``model.pt2/``); a
    place where nothing can be created (read-only, ``/proc``, under a file).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a directory; choose another -o")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise UsageError(f"{path} already exists and is not empty; pass --force to replace graphopt's "
                         f"files in it, or choose another -o")
    if os.path.isdir(path):
        blocked = [n for n in OUTPUT_NAMES if os.path.isdir(os.path.join(path, n))]
        if blocked:
            raise UsageError(f"{os.path.join(path, blocked[0])} is a directory where graphopt writes a file; "
                             "move it away or choose another -o")
    check_can_create(os.path.dirname(os.path.abspath(path)), path, "-o")


def check_can_create(folder: str, wanted: str, flag: str) -> None:
    """Refuse (UsageError) when nothing can be created in ``folder`` or its nearest existing ancestor.

    Checked by creating (and removing) a probe directory, the only test the
    filesystem answers truly (``os.access`` says yes to root on read-only mounts).
    """
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot write {wanted}: {existing} is a file, not a directory; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphopt-probe-", dir=existing))
    except OSError as exc:
        raise UsageError(f"cannot write {wanted}: {existing} does not allow it ({exc.strerror}); "
                         f"choose another {flag}") from None


@contextlib.contextmanager
def staged_output_dir(path: str, force: bool) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; publish its files into ``path`` when the block succeeds."""
    check_output_dir(path, force)
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(target)
    staging = tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; DIR gets the usual permissions
    try:
        yield staging
        publish(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _partial_prefix(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(target: str) -> list[str]:
    """Remove the ``.DIR.partial-PID-*`` staging directories of ``target`` whose process is gone; return them."""
    prefix = _partial_prefix(target)
    removed = []
    for path in glob.glob(glob.escape(prefix) + "*"):
        pid_text = path[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue  # not ours to judge (no pid in the name), ours, or a live run's
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a run (pid %s) that is no longer alive", path, pid_text)
        removed.append(path)
    return removed


class OutputConflict(UsageError):
    """The output directory appeared, with files, while this run was working."""


def publish(staging: str, target: str, force: bool = False) -> None:
    """Move the files of ``staging`` into ``target``; a new (or empty) ``target`` is claimed by one atomic rename.

    Raises :class:`OutputConflict` when ``target`` filled up meanwhile and
    ``force`` is off (``os.rename`` onto a directory succeeds only when that
    directory is empty, so a run that published first is never overwritten).
    """
    if not os.listdir(staging):
        raise UsageError(f"nothing was written for {target}; it was left as it was")
    if not os.path.exists(target) or not os.listdir(target):
        try:
            os.rename(staging, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) or not force:
                raise _conflict(target, exc) from exc
    elif not force:
        raise _conflict(target, None)
    produced = set(os.listdir(staging))
    for name in sorted(produced):
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in OUTPUT_NAMES:
        stale = os.path.join(target, name)
        if name not in produced and os.path.isfile(stale):
            os.remove(stale)


def _conflict(target: str, exc: OSError | None) -> UsageError:
    if exc is not None and exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
        return UsageError(f"could not publish {target}: {exc.strerror}; choose another -o")
    return OutputConflict(f"{target} appeared while this run was working (another run wrote it?); "
                          f"this run's outputs were not published: choose another -o, or pass --force to replace")
