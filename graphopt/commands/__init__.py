"""CLI subcommands, one module each; :mod:`graphopt.cli` lists them explicitly."""
