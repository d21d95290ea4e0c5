"""``graphopt run --nproc N SPEC``: run a model tensor-parallel on N local processes.

Each process builds the model from SPEC (same seed, same weights), shards it
with graphopt.parallel.shard (gloo on CPU, NCCL on GPU) and runs the example
inputs; rank 0 checks the output against one process and the command prints
each rank's weight memory and latency. Exit code 1 when the outputs differ by
more than the tolerance, 2 when the model cannot be sharded over N processes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from graphopt.commands.common import UsageError, add_spec_argument, err_console, out_console, parse_options, step


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a model tensor-parallel on N local processes and check it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_argument(p)
    p.add_argument("--nproc", type=int, required=True, metavar="N", help="number of processes (>= 2)")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl with N GPUs, else gloo")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes per process (median reported)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="kill the processes after this long (default 300)")
    p.add_argument("--port", type=int, help="rendezvous port on localhost (default: a free one)")
    p.add_argument("--atol", type=float, help="max abs difference allowed against one process (fp32: 1e-5)")
    p.add_argument("--passes", metavar="A,B,...",
                   help="optimize with these passes on each rank before sharding (e.g. merge_matmuls)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a pass option (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from graphopt.launch import LaunchError, run_sharded
    from graphopt.parallel import ShardingError
    from graphopt.specs import SpecError

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give a TCP port between 1 and 65535, or leave it out for a free one")
    try:
        with step(f"running {args.spec} on {args.nproc} processes"):
            result = run_sharded(args.spec, args.nproc, backend=args.backend, iters=args.iters,
                                 timeout=args.timeout, port=args.port, tolerance=args.atol,
                                 passes=[n.strip() for n in args.passes.split(",") if n.strip()] if args.passes
                                 else None, options=parse_options(args.option))
    except (ShardingError, SpecError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    except LaunchError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    if args.json:
        out_console.print_json(json.dumps(result.to_dict()))
        return 0 if result.ok else 1
    table = Table(title=escape(f"{args.spec}: {result.nproc} processes ({result.backend})"), title_justify="left")
    for col in ("process", "weights", "sharded weights", "latency", "threads"):
        table.add_column(col)
    table.add_row("single", _mib(result.single_weight_bytes), _mib(result.sharded_weights_full_bytes),
                  f"{result.single_latency_s * 1e3:.2f} ms", str(result.single_threads))
    for r in result.ranks:
        table.add_row(f"rank {r.rank}", _mib(r.weight_bytes), _mib(r.sharded_weight_bytes),
                      f"{r.latency_s * 1e3:.2f} ms", str(r.threads))
    out_console.print(table)
    for line in result.regions:
        out_console.print(f"  sharded {line}", highlight=False, markup=False)
    for line in result.declined:
        out_console.print(f"  kept replicated: {line}", highlight=False, markup=False)
    out_console.print(f"all-reduce per forward: {result.allreduce_bytes_per_forward} bytes "
                      f"({len(result.regions)} regions)")
    status = "ok" if result.ok else "FAILED"
    out_console.print(f"output vs one process: {status} (max abs {result.max_abs:.2e}, tolerance {result.tolerance:.0e})")
    return 0 if result.ok else 1
