"""Per-node measurements of a ``precision`` run: calibration, input shifts, each node's own error and timings.

A mixin of :class:`graphopt.passes.precision.run.PrecisionRun`: the methods
read and fill the run's state (``options``, ``cal``, ``errors``,
``timings``, ``choice``, ``reasons``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import constant_nodes, flat_inputs
from graphopt.ops.kernel_calls import inline_kernel_calls
from graphopt.passes.precision.quantized_linears import QUANTIZED, QuantizableLinear, QuantizedWeights
from graphopt.precision.calibrate import Calibration, calibrate
from graphopt.precision.ops_classes import FLOAT_DTYPES
from graphopt.precision.quantize import input_shift
from graphopt.precision.search import relative_l2
from graphopt.precision.speed import choose_precision
from graphopt.precision.target import PrecisionTarget

log = logging.getLogger(__name__)

__all__ = ["MODEL_MIN_SPEEDUP", "MODEL_TIMING_REPEAT", "MODEL_TIMING_ROUNDS", "NodeMeasurements"]

#: timed in the model (``precision_timing='model'``), a group converts when the whole graph is this much faster
#: (a group is a few linears of a step: 1% of the graph is above the noise of the fastest of 10 interleaved runs)
MODEL_MIN_SPEEDUP = 1.01
#: interleaved runs of each whole graph timed in the model (the fastest is kept)
MODEL_TIMING_ROUNDS = 10
#: each in-model timing is the last of this many back-to-back runs of the graph: a decode step repeats with the
#: same weights, which stay in the last-level cache where the plan's working set fits (timed right after another
#: plan, a graph reads them cold and every precision looks DRAM-bound)
MODEL_TIMING_REPEAT = 3


def _close_call(seconds: dict[str, float]) -> bool:
    """Some graph timed faster than the ``fp32`` one, but by less than :data:`MODEL_MIN_SPEEDUP`."""
    fastest = min(seconds.values())
    return fastest < seconds["fp32"] and seconds["fp32"] / fastest < MODEL_MIN_SPEEDUP


class NodeMeasurements:
    """Calibrate, shift int8 inputs, and measure each candidate node alone (error, speed)."""

    gm: fx.GraphModule
    target: PrecisionTarget
    timer: Callable[..., dict[str, float]]
    nodes: dict[str, fx.Node]
    options: dict[str, list[str]]
    sites: dict[str, QuantizableLinear]
    weights: QuantizedWeights
    cal: Calibration | None
    errors: dict[tuple[str, str], float]
    timings: dict[str, dict[str, float]]
    choice: dict[str, str]
    reasons: dict[str, str]
    shift_gain: dict[str, float]
    #: timed in the model: node -> how many same-shape nodes its group converted together
    group_size: dict[str, int]
    notes: list[str]
    _min_speedup: float

    def calibrate(self, input_sets: list[list[Any]]) -> None:
        self.cal = calibrate(self.gm, input_sets, self.options)

    def choose_shifts(self) -> None:
        """int8 sites whose calibrated input has a large shared component get an input shift."""
        shifted = 0
        for name, opts in self.options.items():
            if "int8" not in opts or name not in self.cal.args:
                continue
            args, _ = self.cal.args[name]
            x = args[1] if self.nodes[name].target == torch.ops.aten.addmm.default else args[0]
            if not isinstance(x, torch.Tensor):
                continue
            mu, gain = input_shift(x)
            if mu is not None:
                self.weights.shifts[name] = mu
                self.shift_gain[name] = gain
                shifted += 1
        if shifted:
            self.notes.append(f"int8 input shift (calibrated channel means, W @ mu folded into the bias) on "
                              f"{shifted} of {sum('int8' in o for o in self.options.values())} linears")


    def _quantized_call(self, name: str, precision: str, args: tuple, kwargs: dict) -> Any:
        """The quantized (int8, fp8, weight-only) replacement of linear site ``name`` on concrete arguments of the original node."""
        node = self.nodes[name]
        addmm = node.target == torch.ops.aten.addmm.default
        x = args[1] if addmm else args[0]
        bias = (args[0] if addmm
                else (args[2] if len(args) > 2 else kwargs.get("bias")) if node.target == torch.ops.aten.linear.default
                else None)
        return self.weights.call(self.sites[name], precision, x, bias)

    def _isolated(self, name: str, precision: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
        """(low-precision call, fp32 call) of one node on its recorded arguments."""
        node = self.nodes[name]
        args, kwargs = self.cal.args[name]
        ref = lambda: node.target(*args, **kwargs)  # noqa: E731
        if precision == "fp32":
            return ref, ref
        if precision in QUANTIZED:
            self.weights.get(self.sites[name], precision)
            return (lambda: self._quantized_call(name, precision, args, kwargs)), ref
        dtype = FLOAT_DTYPES[precision]
        const = self._const
        graph_args = list(node.args) + list(node.kwargs.values())
        values = list(args) + list(kwargs.values())
        low_values = [v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                      and isinstance(g, fx.Node) and g in const else v for g, v in zip(graph_args, values)]
        n_args = len(args)
        keys = list(kwargs)

        def low() -> Any:
            vals = [v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v
                    for v in low_values]
            out = node.target(*vals[:n_args], **dict(zip(keys, vals[n_args:])))
            return out.float() if isinstance(out, torch.Tensor) else out
        return low, ref

    @property
    def _const(self) -> set[fx.Node]:
        if not hasattr(self, "_const_cache"):
            self._const_cache = constant_nodes(self.gm)
        return self._const_cache

    def measure_local_errors(self) -> None:
        with torch.no_grad():
            for name, opts in self.options.items():
                low_ref = None
                for p in opts:
                    low, ref = self._isolated(name, p)
                    if low_ref is None:
                        low_ref = ref()
                    try:
                        self.errors[(name, p)] = relative_l2(low(), low_ref)
                    except Exception as exc:  # the op has no low-precision kernel here
                        log.info("%s in %s failed: %s", name, p, exc)
                        self.errors[(name, p)] = float("inf")

    def local_error(self, name: str, precision: str) -> float:
        return self.errors.get((name, precision), float("inf"))

    def choose_requested(self) -> None:
        for name, opts in self.options.items():
            p = opts[0]
            self.choice[name] = p
            self.reasons[name] = f"requested ({self._int8_detail(name)})" if p == "int8" else "requested"

    def _int8_detail(self, name: str) -> str:
        scheme = self.target.int8_scheme or "reference kernel"
        if name in self.weights.shifts:
            return f"{scheme}, input shifted: per-token range x{self.shift_gain.get(name, 1.0):.2f}"
        return scheme

    def measure_speed(self) -> None:
        groups: dict[tuple, list[str]] = {}
        for name, opts in self.options.items():
            opts = [p for p in opts if self.local_error(name, p) != float("inf")]

            def measure(name: str = name, opts: list[str] = opts) -> dict[str, float]:
                fns = {"fp32": self._isolated(name, "fp32")[0]}
                fns.update({p: self._isolated(name, p)[0] for p in opts})
                return self.timer(fns, device=self.target.device)

            # nodes of one shape and scheme are timed once per optimization (the context's timing cache)
            key = ("precision", self._signature(name), tuple(opts))
            self.timings[name] = self.ctx.target.timings.get_or_measure(key, measure)
            groups.setdefault(key, []).append(name)
        if self.times_in_model:
            self.time_in_model([names for key, names in groups.items() if len(key[2])])
        for name in self.options:
            choice, reason = choose_precision(self.timings[name], self._min_speedup)
            if self.times_in_model and name in self.group_size:
                reason += (f" (the whole graph, with the {self.group_size[name]} nodes of this shape converted after "
                           "the larger groups)")
            if choice == "int8":
                reason += f" ({self._int8_detail(name)})"
            self.choice[name], self.reasons[name] = choice, reason

    @property
    def timing_inputs(self) -> tuple[tuple, dict]:
        """What the whole graph is timed on: option ``precision_timing_inputs``, else the example inputs."""
        given = self.ctx.option("precision_timing_inputs")
        return (tuple(given[0]), dict(given[1])) if given is not None else (self.ctx.args, self.ctx.kwargs)

    @property
    def times_in_model(self) -> bool:
        return self.ctx.option("precision_timing", "isolated") == "model"

    def time_in_model(self, groups: list[list[str]]) -> None:
        """Time each group of same-shape nodes inside the whole graph, cumulatively, and set the nodes' timings.

        An op timed alone reads its weight hot from the cache; in a decode step
        every weight streams from memory once per step, and whether the step's
        weights fit the last-level cache depends on the whole plan (a Llama
        step's linears in fp32: 110 MB, all in int8: 27 MB): converting one
        group of small linears alone measured no faster, all of them together
        about twice. So the groups are decided one after another, the largest
        first (by their fp32 time alone): the graph with the decisions so far
        is timed against the same graph with the group also converted to each
        of its precisions (interleaved, fastest of 10, each the last of
        :data:`MODEL_TIMING_REPEAT` back-to-back runs: warm, as a repeating step
        runs), and the group takes the
        fastest precision that makes the whole graph :data:`MODEL_MIN_SPEEDUP`
        faster (a group faster by less is timed once more, and the fastest of
        both timings decides). Each graph is timed with its weight-only ops as direct kernel
        calls (:func:`~graphopt.ops.kernel_calls.inline_kernel_calls`), as the
        generation loop runs it. Those whole-graph seconds become the nodes' timings (the
        ``fp32`` entry: the graph before the group), so the search ranks by the
        saving per node (:meth:`saved_seconds`).

        The results are kept on the machine record (``ctx.target.timings``) under the graph, its candidates and
        the timing inputs' shapes (:meth:`_in_model_key`): a re-plan of the same graph at another budget, whose
        context shares the record (generation's builds do), reuses them and says so in the notes.
        """
        a, kw = self.timing_inputs
        key = self._in_model_key(groups, a, kw)
        names = [n for group in groups for n in group]
        reused = key in self.ctx.target.timings  # measured before, for the same graph on this machine (a re-plan)
        timings, group_size, notes = self.ctx.target.timings.get_or_measure(
            key, lambda: self._time_in_model_now(groups, names))
        if reused:
            self.notes.append("speed timed in the model: reused this graph's timings on this machine (measured "
                              "once per build: a re-plan times nothing again)")
            self.notes += notes
        for name in names:
            self.timings[name] = dict(timings[name])
            if name in group_size:
                self.group_size[name] = group_size[name]

    def _in_model_key(self, groups: list[list[str]], args: tuple, kwargs: dict) -> tuple:
        """What the in-model timings depend on: the graph (its code and each candidate's signature and
        precisions), the timing inputs' shapes, and the mode."""
        shapes = tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else type(x).__name__
                       for x in flat_inputs(args, kwargs, self.gm))
        per_node = tuple((n, self._signature(n), tuple(sorted(self.timings[n].items()))) for g in groups for n in g)
        return ("precision in the model", self.mode, hash(self.gm.code), shapes, per_node,
                tuple(tuple(g) for g in groups))

    def _time_in_model_now(self, groups: list[list[str]], names: list[str]) -> tuple:
        """Measure :meth:`time_in_model`; its nodes' timings, group sizes and notes, for the machine's cache."""
        before = len(self.notes)
        self._time_groups(groups)
        notes = self.notes[before:]
        return ({n: dict(self.timings[n]) for n in names}, {n: self.group_size[n] for n in names
                                                           if n in self.group_size}, list(notes))

    def _time_groups(self, groups: list[list[str]]) -> None:
        a, kw = self.timing_inputs
        accepted: dict[str, str] = {}
        base = inline_kernel_calls(self.gm)  # each graph as generation runs it
        ordered = sorted(groups, key=lambda names: -self.timings[names[0]]["fp32"] * len(names))
        alone = {n: choose_precision(self.timings[n], MODEL_MIN_SPEEDUP)[0] for names in ordered for n in names}
        for i, names in enumerate(ordered):
            self.ctx.step(f"precision: timing in the model, group {i + 1} of {len(ordered)} ({len(names)} nodes)")
            precisions = [p for p in self.timings[names[0]] if p != "fp32"]
            runs = {"fp32": base, **{p: inline_kernel_calls(self.build({**accepted, **{n: p for n in names}}))
                                     for p in precisions}}
            # faster, but by less than the threshold: one more interleaved timing before the group stays fp32
            # (a group of small linears saves 1-3% of a step, about the noise of one timing)
            whole = self._time_graphs(runs, a, kw, again_if=_close_call)
            choice, _ = choose_precision(whole, MODEL_MIN_SPEEDUP)
            for name in names:
                self.timings[name] = dict(whole)
                self.group_size[name] = len(names)
                if choice != "fp32":
                    accepted[name] = choice
            base = runs[choice]
        self.notes.append(f"speed timed in the model: {len(ordered)} groups of same-shape nodes, largest first, the "
                          f"whole graph with each group also converted against the graph before it (converted where "
                          f">= {MODEL_MIN_SPEEDUP:g}x); {len(accepted)} nodes converted on speed")
        self._convert_the_rest_together(accepted, alone, base, a, kw)

    def _convert_the_rest_together(self, accepted: dict[str, str], alone: dict[str, str], base: fx.GraphModule,
                                   args: tuple, kwargs: dict) -> None:
        """The nodes the groups left in fp32 that are faster alone, converted all at once and timed as one.

        Each small group saves less of a step than one timing can resolve (a
        group of four 512 x 512 linears: ~1% of a Llama decode step), so group by
        group they stay fp32 by the luck of the timing, and the plan moves from
        run to run (measured on the benchmark's Llama, 2 cores: 5 to 20 of 21
        nodes converted on speed); together their saving is measurable. Taken
        when the whole graph is :data:`MODEL_MIN_SPEEDUP` faster with them (timed
        twice when faster by less); their timings become those two graphs'.
        """
        rest = {n: p for n, p in alone.items() if p != "fp32" and n not in accepted}
        if not rest:
            return
        together = inline_kernel_calls(self.build({**accepted, **rest}))
        runs = {"fp32": base, "together": together}
        whole = self._time_graphs(runs, args, kwargs, again_if=_close_call)
        taken = whole["fp32"] / whole["together"] >= MODEL_MIN_SPEEDUP
        for name, p in rest.items() if taken else ():  # not taken: each keeps its group's timings (fp32)
            self.timings[name] = {"fp32": whole["fp32"], p: whole["together"]}
            self.group_size[name] = len(rest)
            accepted[name] = p
        self.notes.append(f"the {len(rest)} nodes left in fp32 that are faster alone, converted together: whole graph "
                          f"{whole['together'] * 1e3:.3f} ms vs {whole['fp32'] * 1e3:.3f} ms "
                          f"({whole['fp32'] / whole['together']:.2f}x): " + ("taken" if taken else "left in fp32"))

    def _time_graphs(self, graphs: dict[str, fx.GraphModule], args: tuple, kwargs: dict,
                     again_if: Callable[[dict[str, float]], bool] | None = None,
                     budget_s: float | None = None) -> dict[str, float]:
        """Seconds per run of each graph, interleaved (fastest of :data:`MODEL_TIMING_ROUNDS`, warm, each the last of
        :data:`MODEL_TIMING_REPEAT` back-to-back runs; at most ``budget_s`` seconds). Where ``again_if(seconds)``,
        timed once more and the faster of both timings kept (a close call, within one timing's noise)."""
        def timed() -> dict[str, float]:
            return self.timer({p: (lambda g=g: g(*args, **kwargs)) for p, g in graphs.items()},
                              rounds=MODEL_TIMING_ROUNDS, device=self.target.device, give_up=100.0,
                              repeat=MODEL_TIMING_REPEAT, **({"budget_s": budget_s} if budget_s else {}))

        seconds = timed()
        if again_if is not None and again_if(seconds):
            again = timed()
            seconds = {p: min(t, again[p]) for p, t in seconds.items()}
        return seconds

    def _signature(self, name: str) -> tuple:
        node = self.nodes[name]
        args, kwargs = self.cal.args[name]
        shapes = tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a)
                       for a in list(args) + list(kwargs.values()))
        return (str(node.target), shapes, self.target.int8_scheme, name in self.weights.shifts)
