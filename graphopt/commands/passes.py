"""``graphopt passes``: list every pass with its one-line summary and options."""

from __future__ import annotations

import argparse
from typing import Any

from graphopt.commands.common import out_console


def register(sub: Any) -> None:
    p = sub.add_parser("passes", help="list the available passes", description=__doc__)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from graphopt import passes

    default = {p.name for p in passes.default_pipeline()}
    table = Table(title="graphopt passes (* = in the default pipeline)", title_justify="left")
    table.add_column("pass")
    table.add_column("summary")
    table.add_column("options")
    for cls in passes.all_pass_classes():
        opts = ", ".join(getattr(cls, "options", {}) or {})
        table.add_row(("* " if cls.name in default else "  ") + cls.name, cls.summary, opts)
    out_console.print(table)
    return 0
