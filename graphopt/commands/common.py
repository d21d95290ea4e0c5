"""What every CLI command shares: loading a spec with progress, errors that exit 2."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from graphopt.errors import BadInput

#: messages and progress go to stderr, results (tables, JSON) to stdout
#: (soft_wrap: an error stays one line however narrow the terminal, so it can be grepped)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False)
if not out_console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    out_console = Console(highlight=False, width=140)


class UsageError(BadInput):
    """Bad input on the command line: printed as one line, exit code 2."""


def add_spec_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec",
        help="the model: a .pt2 file, 'package.module:factory', 'file.py:factory', "
        "'hf:<model_type>?key=value&seq=N' (random weights) or 'examples:<nanogpt|cnn|mlp|dlrm>'",
    )


@contextlib.contextmanager
def step(message: str) -> Iterator[Any]:
    """Show a spinner with ``message`` on stderr while a long step runs."""
    if err_console.is_terminal:
        with err_console.status(escape(message)) as status:
            yield status
    else:
        err_console.print(f"[dim]{escape(message)}[/]")
        yield None


def load_model(spec: str) -> Any:
    from graphopt.specs import SpecError, load_spec

    with step(f"building {spec}"):
        try:
            return load_spec(spec)
        except SpecError as exc:
            raise UsageError(str(exc)) from exc


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    from graphopt.specs import parse_value

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r}: write it as key=value")
        out[key.replace("-", "_")] = parse_value(value)
    return out


def fail(message: str) -> None:
    raise UsageError(message)

