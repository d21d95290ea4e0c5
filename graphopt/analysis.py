"""``graphopt.analyze``: where a model spends its time and memory.

>>> import torch, graphopt
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
>>> a = graphopt.analyze(model, (torch.randn(8, 64),))
>>> a.total_flops                      # 2 * 8 * (64*256 + 256*64)
524288
>>> len(a.ffn_chains)
1
>>> a.hotspots[0].op
'aten.linear'

The analysis runs graphopt's analysis passes (``passes/analysis/``) on the
captured graph: cost annotation (FLOPs, bytes, roofline bound, predicted time
per node, :mod:`graphopt.cost`), liveness (:mod:`graphopt.memory`), hot
matmuls, attention sites, FFN chains and repeated blocks. ``profile=True``
also runs the graph: per-node times from an fx Interpreter with timers, and
the measured peak of torch's allocations. docs/analysis.md describes every
figure.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir, meta
from graphopt.cost import NodeCost, node_dtype, tensors_in, val_of, shape
from graphopt.memory import MemoryProfile, peak_memory
from graphopt.pass_infra import OptimizeContext
from graphopt.target import Roofline, TargetInfo, get_roofline, measure_peak
from graphopt.capture import capture
from graphopt.optimize import OptimizeResult
from graphopt.passes.analysis.sites import find_attention_sites
from graphopt.passes.analysis.cost_annotation import CostAnnotation
from graphopt.passes.analysis.ffn_chains import FFNChains
from graphopt.passes.analysis.hot_matmuls import HotMatmuls
from graphopt.passes.analysis.repeated_blocks import RepeatedBlocks
from graphopt.user_state import preserves_user_state

log = logging.getLogger(__name__)

#: version of the JSON schema documented in docs/analysis.md
SCHEMA_VERSION = 1


@dataclass
class NodeReport:
    """One node's figures, as shown in the hot-spot table and the JSON."""

    name: str
    op: str
    category: str
    module: str
    source: str
    shapes: list[list[int]]  # output shape(s)
    input_shapes: list[list[int]]
    dtype: str
    flops: int
    bytes: int
    intensity: float
    bound: str
    predicted_s: float
    measured_s: float | None
    share: float  # of the total time the table is ranked by (measured when profiled)
    predicted_share: float = 0.0
    measured_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Analysis:
    """What :func:`analyze` found. See docs/analysis.md for each figure.

    ``nodes``: a :class:`NodeReport` per costed node, hottest first;
    ``hotspots``: the first ``top`` of them. ``total_flops`` counts matmul,
    convolution and attention FLOPs (FlopCounterMode's convention);
    ``other_flops`` the rest. ``predicted_seconds``: the roofline's sum over
    nodes. ``peak_memory_bytes``: predicted peak activation memory.
    """

    gm: fx.GraphModule
    target: Roofline
    nodes: list[NodeReport]
    memory: MemoryProfile
    attention_sites: list[Any] = field(default_factory=list)
    ffn_chains: list[Any] = field(default_factory=list)
    repeated_blocks: list[Any] = field(default_factory=list)
    hot_matmuls: list[Any] = field(default_factory=list)
    total_flops: int = 0
    other_flops: int = 0
    total_bytes: int = 0
    predicted_seconds: float = 0.0
    measured_seconds: float | None = None
    profiled: bool = False
    top: int = 10
    model: str = ""

    @property
    def hotspots(self) -> list[NodeReport]:
        return self.nodes[: self.top]

    @property
    def peak_memory_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def measured_peak_memory_bytes(self) -> int | None:
        return self.memory.measured_peak_bytes

    def node(self, name: str) -> NodeReport:
        return next(r for r in self.nodes if r.name == name)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """The JSON-able content (schema in docs/analysis.md)."""
        top = self.top if top is None else top
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "target": self.target.to_dict(),
            "total_flops": self.total_flops,
            "other_flops": self.other_flops,
            "total_bytes": self.total_bytes,
            "predicted_seconds": self.predicted_seconds,
            "measured_seconds": self.measured_seconds,
            "profiled": self.profiled,
            "peak_memory_bytes": self.peak_memory_bytes,
            "measured_peak_memory_bytes": self.measured_peak_memory_bytes,
            "memory": self.memory.to_dict(),
            "hotspots": [r.to_dict() for r in self.nodes[:top]],
            "hot_matmuls": [h.to_dict() for h in self.hot_matmuls[:top]],
            "attention_sites": [s.to_dict() for s in self.attention_sites],
            "ffn_chains": [c.to_dict() for c in self.ffn_chains],
            "repeated_blocks": [b.to_dict() for b in self.repeated_blocks],
            "node_count": len(self.gm.graph.nodes),
        }

    def to_json(self, top: int | None = None, indent: int = 2) -> str:
        return json.dumps(self.to_dict(top), indent=indent, default=str)

    def render(self, console: Any = None, top: int | None = None) -> None:
        """Print the hot-spot table and the summary to a rich console."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = console or Console()
        top = self.top if top is None else top
        by = "measured" if self.profiled else "predicted"
        title = f"graphopt analyze{': ' + self.model if self.model else ''} -- top {top} by {by} time"
        table = Table(title=escape(title), title_justify="left")
        for col, justify in (("#", "right"), ("node", "left"), ("module", "left"), ("op", "left"),
                             ("shape", "left"), ("FLOPs", "right"), ("bytes", "right"), ("FLOP/B", "right"),
                             ("bound", "left"), ("pred ms", "right"), ("meas ms", "right"), ("%", "right")):
            table.add_column(col, justify=justify, overflow="fold",  # type: ignore[arg-type]
                             no_wrap=col not in ("module", "node"))
        for i, r in enumerate(self.nodes[:top], 1):
            shapes = "x".join(map(str, r.shapes[0])) if r.shapes else ""
            table.add_row(
                str(i), escape(r.name), escape(r.module or "(top)"), escape(r.op.removeprefix("aten.")), shapes, human(r.flops),
                human_bytes(r.bytes), f"{r.intensity:.1f}", r.bound, f"{r.predicted_s * 1e3:.3f}",
                f"{r.measured_s * 1e3:.3f}" if r.measured_s is not None else "-", f"{r.share * 100:.1f}",
            )
        console.print(table)
        console.print(self.summary(), markup=False)

    def summary(self) -> str:
        """The few lines printed under the table."""
        measured = f", measured {self.measured_seconds * 1e3:.2f} ms" if self.measured_seconds is not None else ""
        mem_meas = (f", measured {human_bytes(self.measured_peak_memory_bytes)}"
                    f" ({self.memory.measured_method})" if self.measured_peak_memory_bytes is not None else "")
        gated = sum(c.gated for c in self.ffn_chains)
        blocks = "; ".join(f"{b.count} x {b.module_class}" for b in self.repeated_blocks) or "none"
        lines = [
            f"total FLOPs: {human(self.total_flops)} (matmul/conv/attention) + {human(self.other_flops)} other; "
            f"bytes moved: {human_bytes(self.total_bytes)}",
            f"predicted time: {self.predicted_seconds * 1e3:.2f} ms on {self.target.name} "
            f"({human(self.target.peak_for('float32'))}FLOP/s fp32, {human_bytes(self.target.mem_bandwidth)}/s)"
            f"{measured}",
            f"peak activation memory: {human_bytes(self.peak_memory_bytes)} at {self.memory.peak_node.name if self.memory.peak_node else '-'}"
            f"{mem_meas}; parameters {human_bytes(self.memory.parameter_bytes)}",
            f"attention sites: {len(self.attention_sites)}; FFN chains: {len(self.ffn_chains)} ({gated} gated); "
            f"repeated blocks: {blocks}",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        self.render(Console(file=buf, width=160, force_terminal=False, color_system=None))
        return buf.getvalue()


def human(n: float) -> str:
    """1234567 -> '1.23 G'-style short numbers ('' suffix below 1000)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------- measured profile


class TimingInterpreter(fx.Interpreter):
    """An fx Interpreter that records the wall time of each node it runs.

    Why not torch.profiler: its events are per ATen call, and mapping them
    back to graph nodes needs record_function around each node anyway; timing
    the node directly is simpler and gives the same figure.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        t0 = time.perf_counter()
        out = n.target(*args, **kwargs)  # type: ignore[operator]
        self.times[n.name] = time.perf_counter() - t0
        return out


def profile_nodes(gm: fx.GraphModule, flat_inputs: Sequence[Any], runs: int = 3) -> dict[str, float]:
    """Median wall time of each call_function node over ``runs`` runs (after one warm-up)."""
    samples: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(runs + 1):
            interp = TimingInterpreter(gm)
            interp.run(*flat_inputs)
            if i == 0:
                continue
            for name, t in interp.times.items():
                samples.setdefault(name, []).append(t)
    return {name: statistics.median(ts) for name, ts in samples.items()}


# --------------------------------------------------------------------------- analyze


def _has_meta(gm: fx.GraphModule) -> bool:
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return bool(calls) and all("val" in n.meta for n in calls)


def _resolve(model_or_graph: Any, example_inputs: Any, example_kwargs: dict[str, Any] | None
             ) -> tuple[fx.GraphModule, tuple[Any, ...] | None, dict[str, Any], str]:
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs) if example_inputs is not None else None
    kwargs = dict(example_kwargs or {})
    if isinstance(model_or_graph, OptimizeResult):
        return (model_or_graph.module, args or model_or_graph.example_args,
                kwargs or model_or_graph.example_kwargs, model_or_graph.report.model)
    if isinstance(model_or_graph, torch.export.ExportedProgram):
        example = model_or_graph.example_inputs
        if args is None and example:
            args, kwargs = tuple(example[0]), dict(example[1] or {})
        return model_or_graph.module(), args, kwargs, ""
    if isinstance(model_or_graph, fx.GraphModule) and _has_meta(model_or_graph):
        return model_or_graph, args, kwargs, ""
    if isinstance(model_or_graph, torch.nn.Module):
        if args is None:
            raise TypeError(f"analyze({type(model_or_graph).__name__}) needs example_inputs to capture the model; "
                            "pass them, or an already captured GraphModule")
        return capture(model_or_graph, args, kwargs).module, args, kwargs, type(model_or_graph).__name__
    raise TypeError(f"analyze expects an nn.Module, a captured fx.GraphModule, an ExportedProgram or an "
                    f"OptimizeResult, got {type(model_or_graph).__name__}")


def _device(gm: fx.GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    for n in gm.graph.nodes:
        v = val_of(n)
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _shapes(node: Any) -> list[list[int]]:
    return [list(shape(t)) for t in tensors_in(val_of(node))]


def _profile_costs(gm: Any, flat: list[Any], runs: int) -> float:
    """Time each node ``runs`` times, store it as the node cost's ``measured_s``; return the measured total."""
    times = profile_nodes(gm, flat, runs=runs)
    for node in gm.graph.nodes:
        cost = node.meta.get(meta.COST)
        if isinstance(cost, NodeCost) and node.op == "call_function":
            cost.measured_s = times.get(node.name, 0.0)
    return sum(times.values())


def _node_reports(
    costs: dict[Any, NodeCost], profile: bool, predicted_total: float, measured_total: float | None,
) -> list[NodeReport]:
    """One :class:`NodeReport` per costed node (views and free ops left out unless measured), unsorted."""
    ranked_total = measured_total if profile else predicted_total
    reports = []
    for node, cost in costs.items():
        if cost.category in ("none", "view") and not cost.measured_s:
            continue
        t = cost.measured_s if profile and cost.measured_s is not None else cost.predicted_s
        dtype = node_dtype(node)
        reports.append(NodeReport(
            name=node.name, op=ir.op_name(node), category=cost.category, module=ir.module_path(node),
            source=ir.source_line(node), shapes=_shapes(node),
            input_shapes=[s for n in node.all_input_nodes for s in _shapes(n)],
            dtype=str(dtype).replace("torch.", "") if dtype is not None else "",
            flops=cost.flops, bytes=cost.bytes, intensity=cost.intensity, bound=cost.bound,
            predicted_s=cost.predicted_s, measured_s=cost.measured_s,
            share=t / ranked_total if ranked_total else 0.0,
            predicted_share=cost.predicted_s / predicted_total if predicted_total else 0.0,
            measured_share=(cost.measured_s / measured_total if measured_total and cost.measured_s is not None
                            else None),
        ))
    return reports


@preserves_user_state
def analyze(
    model_or_graph: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    target: Roofline | str | None = None,
    profile: bool = False,
    top: int = 10,
    profile_runs: int = 3,
) -> Analysis:
    """Analyse a model or graph: costs, roofline, peak memory, hot spots, attention/FFN sites, layers.

    ``model_or_graph``: an ``nn.Module`` (captured with :func:`graphopt.capture`
    on ``example_inputs``/``example_kwargs``), an already captured
    ``fx.GraphModule`` (nodes with ``meta["val"]``), an ``ExportedProgram`` or
    an :class:`graphopt.OptimizeResult`. ``target``: a :class:`graphopt.target.Roofline`,
    a device string, or None for the measured, cached roofline of the graph's
    device. ``profile=True`` runs the graph (needs example inputs) to measure
    each node's time and the peak of torch's allocations. ``top``: how many
    hot spots the table and JSON list.
    """
    gm, args, kwargs, model_name = _resolve(model_or_graph, example_inputs, example_kwargs)
    device = _device(gm)
    if isinstance(target, str):
        target = get_roofline(target)
    elif target is None:
        target = get_roofline(device)
    flat = ir.flat_inputs(args, kwargs, gm) if args is not None else []
    ctx = OptimizeContext(args=args or (), kwargs=kwargs, flat_inputs=flat, device=device,
                          target=TargetInfo(given=target))

    ctx.analysis(CostAnnotation, gm)
    measured_total = None
    if profile:
        if args is None:
            raise ValueError("profile=True runs the graph: pass example_inputs (or an OptimizeResult)")
        measured_total = _profile_costs(gm, flat, profile_runs)
    hot_matmuls = ctx.analysis(HotMatmuls, gm)  # after profiling: ranked by measured time when there is one
    ffn_chains, repeated_blocks = ctx.analysis(FFNChains, gm), ctx.analysis(RepeatedBlocks, gm)
    try:
        sites = list(find_attention_sites(gm))
    except Exception as exc:  # the attention search must not take the whole analysis down
        log.warning("attention-site search failed: %s", exc)
        sites = []

    memory = peak_memory(gm)
    if profile:
        measured = measure_peak(gm, args or (), kwargs, warmup=True)
        memory.measured_peak_bytes, memory.measured_method = measured.bytes, measured.method

    costs = {n: n.meta[meta.COST] for n in gm.graph.nodes if isinstance(n.meta.get(meta.COST), NodeCost)}
    predicted_total = sum(c.predicted_s for c in costs.values())
    reports = _node_reports(costs, profile, predicted_total, measured_total)
    reports.sort(key=lambda r: -(r.measured_s if profile and r.measured_s is not None else r.predicted_s))
    return Analysis(
        gm=gm, target=target, nodes=reports, memory=memory, attention_sites=sites,
        ffn_chains=ffn_chains, repeated_blocks=repeated_blocks, hot_matmuls=hot_matmuls,
        total_flops=sum(c.flops for c in costs.values() if c.is_matmul_class),
        other_flops=sum(c.flops for c in costs.values() if not c.is_matmul_class),
        total_bytes=sum(c.bytes for c in costs.values()),
        predicted_seconds=predicted_total, measured_seconds=measured_total, profiled=profile, top=top,
        model=model_name,
    )
