"""The ``graphopt`` command line.

Every subcommand lives in :mod:`graphopt.commands` and is listed in
:data:`COMMANDS`. Exit codes: 0 success; 1 the work ran but a check failed
(e.g. numerics); 2 bad input (missing file, malformed spec, unknown model
type, uncapturable model) -- one line on stderr, a traceback only with
``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from collections.abc import Sequence

from rich.markup import escape

from graphopt.commands import analyze as analyze_cmd
from graphopt.commands import convert as convert_cmd
from graphopt.commands import generate as generate_cmd
from graphopt.commands import optimize as optimize_cmd
from graphopt.commands import passes as passes_cmd
from graphopt.commands import run as run_cmd
from graphopt.commands import viz as viz_cmd
from graphopt.commands.common import err_console
from graphopt.errors import GraphoptError

#: subcommand modules, each with ``register(subparsers)``
COMMANDS = [optimize_cmd, convert_cmd, generate_cmd, passes_cmd, analyze_cmd, run_cmd, viz_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt",
        description="graphopt: capture, analyse, rewrite and export PyTorch models.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from graphopt.capture import CaptureError

    try:
        with _sigterm_as_interrupt():
            return int(args.handler(args) or 0)
    except CaptureError as exc:
        if args.debug:
            raise
        where = next((a.source for a in exc.attempts if a.source), "")
        where = f" at {where}" if where and where not in exc.hint else ""  # the hint may name it already
        raised = exc.hint.startswith("your model raised")
        message = exc.hint if raised else f"could not capture the model{where}: {exc.hint}"
        more = "; --debug shows each capture attempt" if raised else ""
        err_console.print(f"[red]error:[/] {escape(message)}{more}", highlight=False)
        return 2
    except GraphoptError as exc:  # bad input of any kind (spec, option, budget, command line): one line
        if args.debug:
            raise
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except FileNotFoundError as exc:
        if args.debug:
            raise
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except Terminated:
        err_console.print("terminated")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (and cleans up) as Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only)."""
    owner = os.getpid()

    def raise_terminated(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked worker (run --nproc) inherited this: end as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
