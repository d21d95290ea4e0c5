"""Pass machinery: :class:`Pass`, :class:`PassResult`, :class:`PassManager` and instruments.

The contract follows onnx_ir's pass infrastructure
(``onnx_ir/passes/_pass_infra.py``) and fixes torch.fx's two warts: here
``ensures`` runs on the *result*, and ``modified`` is what the pass reports.

A pass is called as ``pass_(gm, ctx) -> PassResult``:
``requires(gm, ctx)`` -> ``call(gm, ctx)`` -> lint, recompile and refresh
``meta["val"]`` when modified -> ``ensures(result, ctx)``.

The :class:`PassManager` hands every rewrite pass its own copy of the graph
(:func:`graphopt.ir.copy_graph_module`; parameters are shared), so rolling a
pass back is keeping the module from before it. Instruments hook before and
after each pass (timing, verification, dumping, progress) so passes stay free
of them; the verification instrument can reject a pass's result.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.pass_options import Option, check_options, declared_options
from graphopt.report import Declined, PassRecord, Report
from graphopt.target import TargetInfo
from graphopt.verify import ErrorBudget, Numerics, Verifier

log = logging.getLogger(__name__)

__all__ = [
    "AnalysisPass", "DumpInstrument", "FunctionPass", "Instrument", "OptimizeContext", "Option", "Pass",
    "PassManager", "PassResult", "ProgressInstrument", "VerifyInstrument", "check_options", "declared_options",
]

T = TypeVar("T")


@dataclass
class OptimizeContext:
    """What every pass may read: target, example inputs, budgets, the report.

    ``flat_inputs`` are the example inputs flattened in placeholder order.
    ``options`` holds pass options given to :func:`graphopt.optimize` as
    keyword arguments (e.g. ``precision="int8"``, ``memory_budget="2GiB"``).
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    flat_inputs: list[Any] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the machine: rooflines, kernel probes, timings -- each measured once, on first use (graphopt.target)
    target: TargetInfo = field(default_factory=TargetInfo)
    memory_budget: int | None = None  # bytes
    error_budget: ErrorBudget | None = None
    verifier: Verifier | None = None
    report: Report = field(default_factory=Report)
    options: dict[str, Any] = field(default_factory=dict)
    #: analysis results by analysis pass class: ``(the module analysed, its result)`` (see :meth:`analysis`)
    analyses: dict[type, tuple[fx.GraphModule, Any]] = field(default_factory=dict)
    #: what instruments record during the run, by instrument class (e.g. ``viz.PassHistory``'s changes)
    records: dict[type, list[Any]] = field(default_factory=dict)
    #: True while the pass manager runs a group of exact passes that it verifies once, as a group
    deferring_verification: bool = False
    #: ``(module, budget, numerics)`` of the latest numeric check, so an identical check is not run twice
    last_check: tuple[fx.GraphModule, ErrorBudget | None, Numerics] | None = None
    #: where a long pass reports its steps (set by :class:`ProgressInstrument`; None: nobody listens)
    progress: Callable[[str], None] | None = None

    def option(self, name: str, default: Any = None) -> Any:
        """The value given for pass option ``name``, else ``default``."""
        return self.options.get(name, default)

    def analysis(self, analysis: type[AnalysisPass[T]], gm: fx.GraphModule) -> T:
        """The result of the analysis pass class ``analysis`` on ``gm``, run now unless already known.

        Results are kept per class for the module they were computed on; the
        pass manager forgets them when it adopts a modifying rewrite.

        >>> from graphopt.passes.analysis.ffn_chains import FFNChains  # doctest: +SKIP
        >>> chains = ctx.analysis(FFNChains, gm)                       # doctest: +SKIP
        """
        known = self.analyses.get(analysis)
        if known is not None and known[0] is gm:
            return known[1]
        result = analysis().analyze(gm, self)
        self.analyses[analysis] = (gm, result)
        return result

    def budget_for(self, pass_: Pass) -> ErrorBudget | None:
        """The error budget ``pass_`` is held to: the one given, else the pass's default (None: exact)."""
        if not pass_.uses_error_budget:
            return None
        return self.error_budget if self.error_budget is not None else pass_.default_error_budget

    def step(self, message: str) -> None:
        """Report a step of a long pass (the CLI shows it on its progress line)."""
        if self.progress is not None:
            self.progress(message)

    def check_numerics(self, gm: fx.GraphModule, budget: ErrorBudget | None = None) -> Numerics | None:
        """Compare ``gm`` against the original model (None when verification is off or deferred).

        Passes that verify site by site (and roll back a single site) call
        this. While the pass manager defers verification to the end of a group
        of exact passes it returns None (nothing to check yet); should the
        group fail, the group is run again pass by pass and this checks.
        """
        if self.verifier is None or self.deferring_verification:
            return None
        return self.verifier.check(gm, budget)  # never cached: the pass may change gm in place between checks

    def verify(self, gm: fx.GraphModule, budget: ErrorBudget | None = None) -> Numerics:
        """Run the verifier on a pass's finished result ``gm``, reusing the latest result for the same module.

        For the pass manager and the final check, whose modules are not changed
        after they are checked (each pass works on a copy); a pass checking its
        own work in progress calls :meth:`check_numerics`.
        """
        if self.verifier is None:
            raise RuntimeError("verification is off (optimize(..., verify=False)); nothing to check against")
        if self.last_check is not None and self.last_check[0] is gm and self.last_check[1] == budget:
            return self.last_check[2]
        numerics = self.verifier.check(gm, budget)
        self.last_check = (gm, budget, numerics)
        return numerics


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    ``notes``: what changed, for the report. ``declined``: sites looked at and
    left alone, each with its reason. ``nodes_involved``: names of the nodes the
    pass created or rewrote (for the report and the viewer). ``numerics``: the
    pass's own check (``ctx.check_numerics``) of a module computing exactly what
    the returned one computes; the verification instrument then reuses it
    instead of running the model again. ``report_data``: the pass's own
    sections of the report (e.g. ``{"precision": [...]}``), written into
    ``report.extra`` by the pass infrastructure (the pass never writes the
    report itself).
    """

    module: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    nodes_involved: list[str] = field(default_factory=list)
    numerics: Numerics | None = None
    report_data: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of every graphopt pass.

    Subclasses set ``name`` and ``summary`` (one line, shown by
    ``graphopt passes``), declare their ``options`` (name -> :class:`Option`),
    and implement :meth:`call`. Analysis passes derive from
    :class:`AnalysisPass`. Passes that trade accuracy for speed set
    ``uses_error_budget = True`` and are verified against ``ctx.error_budget``
    (else their ``default_error_budget``; see :meth:`OptimizeContext.budget_for`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = "rewrite"
    uses_error_budget: ClassVar[bool] = False
    default_error_budget: ClassVar[ErrorBudget | None] = None
    options: ClassVar[Mapping[str, Option]] = {}

    def option(self, ctx: OptimizeContext, name: str) -> Any:
        """The value of this pass's option ``name``: the one given, else its declared default."""
        return ctx.option(name, self.options[name].default)

    def requires(self, gm: fx.GraphModule, ctx: OptimizeContext) -> None:
        """Raise if ``gm`` is not something this pass can work on."""

    def ensures(self, result: PassResult, ctx: OptimizeContext) -> None:
        """Raise if the result breaks an invariant this pass promises."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        """Run the pass on ``gm`` (which the pass may mutate) and say what it did."""

    def __call__(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        for name, option in self.options.items():
            if name in ctx.options:
                option.validate(name, ctx.options[name])
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name!r} returned {type(result).__name__}, expected PassResult")
        ctx.report.extra.update(result.report_data)
        if result.modified:
            result.module.graph.lint()
            result.module.recompile()
            if ctx.flat_inputs:
                ir.refresh_meta(result.module, ctx.flat_inputs)
        self.ensures(result, ctx)
        return result

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class AnalysisPass(Pass, Generic[T]):
    """A pass that computes a typed result about the graph and never modifies it.

    Subclasses implement :meth:`analyze` (it may also annotate ``node.meta``
    with the keys of :mod:`graphopt.meta`); other passes and the API ask for
    the result with ``ctx.analysis(TheClass, gm)``, which runs it once per
    module. :meth:`describe` turns the result into the pass's notes.
    """

    kind: ClassVar[str] = "analysis"

    @abc.abstractmethod
    def analyze(self, gm: fx.GraphModule, ctx: OptimizeContext) -> T:
        """Compute the result on ``gm`` (without modifying it)."""

    def describe(self, gm: fx.GraphModule, result: T, ctx: OptimizeContext) -> PassResult:
        """The :class:`PassResult` that reports ``result`` (notes, nodes involved); ``modified`` is False."""
        return PassResult(gm, False)

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        return self.describe(gm, ctx.analysis(type(self), gm), ctx)


class FunctionPass(Pass):
    """Wrap a plain function ``fn(gm, ctx) -> bool | PassResult`` as a pass."""

    def __init__(self, fn: Callable[[fx.GraphModule, OptimizeContext], Any], name: str | None = None,
                 summary: str = "") -> None:
        self.fn = fn
        self.name = name or fn.__name__  # type: ignore[misc]
        self.summary = summary or (fn.__doc__ or "").strip().split("\n")[0]  # type: ignore[misc]

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        out = self.fn(gm, ctx)
        if isinstance(out, PassResult):
            return out
        return PassResult(gm, bool(out))


class Instrument:
    """Hooks around each pass. ``after_pass`` may return a reason to reject the result."""

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: OptimizeContext) -> None:
        pass

    def after_pass(self, pass_: Pass, result: PassResult, record: PassRecord, ctx: OptimizeContext) -> str | None:
        return None


class VerifyInstrument(Instrument):
    """Check each modifying rewrite pass numerically; reject it when the check fails."""

    def after_pass(self, pass_: Pass, result: PassResult, record: PassRecord, ctx: OptimizeContext) -> str | None:
        if not result.modified or pass_.kind == "analysis" or ctx.verifier is None:
            return None
        if ctx.deferring_verification and not pass_.uses_error_budget:
            return None  # the pass manager checks the group's result once
        budget = ctx.budget_for(pass_)
        if result.numerics is not None and budget is None:
            numerics = result.numerics
            ctx.last_check = (result.module, None, numerics)
        else:
            numerics = ctx.verify(result.module, budget)
        record.numerics = numerics
        return None if numerics.ok else numerics.reason


class DumpInstrument(Instrument):
    """Write the graph's code after each modifying pass to ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.count = 0

    def after_pass(self, pass_: Pass, result: PassResult, record: PassRecord, ctx: OptimizeContext) -> str | None:
        if result.modified:
            self.count += 1
            path = os.path.join(self.directory, f"{self.count:02d}_{pass_.name}.py")
            with open(path, "w") as f:
                f.write(result.module.code)
        return None


class ProgressInstrument(Instrument):
    """Report each pass to a callback (the CLI shows it as a progress line)."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        self.callback = callback

    def before_pass(self, pass_: Pass, gm: fx.GraphModule, ctx: OptimizeContext) -> None:
        self.callback(pass_.name)
        ctx.progress = lambda message, name=pass_.name: self.callback(f"{name}: {message}")

    def after_pass(self, pass_: Pass, result: PassResult, record: PassRecord, ctx: OptimizeContext) -> str | None:
        ctx.progress = None
        return None


class PassManager:
    """Run an explicit list of passes with instruments.

    Timing is built in. Each rewrite pass works on its own copy of the graph;
    a pass that raises, or whose result an instrument rejects, is rolled back
    (the module from before it is kept) and the pipeline goes on -- except an
    exception with ``abort_pipeline = True`` (the user must act, e.g. an
    unreachable memory budget), which propagates.

    ``group_verification`` (on by default, used when the context has a
    verifier): consecutive exact passes (``uses_error_budget = False``) run
    as a group and their result is checked once, instead of once per pass --
    every check runs the model on each verification input, which is most of
    an optimization's time. When the group's check fails, the group is run
    again from its input pass by pass, each checked on its own, so the
    failing pass is rolled back alone (and a pass that checks site by site,
    like ``fuse_attention``, rolls back only the failing site). Passes that
    spend an error budget are always checked on their own.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (),
                 group_verification: bool = True) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(
                    f"{p!r} is not a graphopt Pass; subclass graphopt.Pass or wrap a function with FunctionPass"
                )
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.group_verification = group_verification

    def run(self, gm: fx.GraphModule, ctx: OptimizeContext) -> fx.GraphModule:
        grouping = self.group_verification and ctx.verifier is not None and \
            any(isinstance(i, VerifyInstrument) for i in self.instruments)
        if not grouping:
            for pass_ in self.passes:
                gm = self.run_one(pass_, gm, ctx)
            return gm
        for spends_budget, run in itertools.groupby(self.passes, key=lambda p: p.uses_error_budget):
            if spends_budget:
                for pass_ in run:
                    gm = self.run_one(pass_, gm, ctx)
            else:
                gm = self.run_group(list(run), gm, ctx)
        return gm

    def run_group(self, group: Sequence[Pass], gm: fx.GraphModule, ctx: OptimizeContext) -> fx.GraphModule:
        """Run exact passes with one numeric check of their joint result (see the class docstring)."""
        if sum(1 for p in group if p.kind != "analysis") < 2:
            for pass_ in group:
                gm = self.run_one(pass_, gm, ctx)
            return gm
        first_record = len(ctx.report.passes)
        saved_analyses = dict(ctx.analyses)
        saved_records = {k: list(v) for k, v in ctx.records.items()}
        out = gm
        ctx.deferring_verification = True
        try:
            for pass_ in group:
                out = self.run_one(pass_, out, ctx)
        finally:
            ctx.deferring_verification = False
        if out is gm:
            return gm
        numerics = ctx.verify(out)
        records = ctx.report.passes[first_record:]
        if numerics.ok:
            names = [r.name for r in records if r.status == "applied"]
            for r in records:
                if r.status == "applied":
                    r.numerics = numerics
                    r.verified_with = names
            return out
        log.info("passes %s together fail the numeric check (%s): checking them one by one",
                 ", ".join(p.name for p in group), numerics.reason)
        del ctx.report.passes[first_record:]
        ctx.analyses, ctx.records = saved_analyses, saved_records
        for pass_ in group:
            gm = self.run_one(pass_, gm, ctx)
        return gm

    def run_one(self, pass_: Pass, gm: fx.GraphModule, ctx: OptimizeContext) -> fx.GraphModule:
        n_before = len(gm.graph.nodes)
        record = PassRecord(pass_.name, "analysis" if pass_.kind == "analysis" else "unchanged",
                            nodes_before=n_before, nodes_after=n_before)
        ctx.report.passes.append(record)
        for inst in self.instruments:
            inst.before_pass(pass_, gm, ctx)
        work = gm if pass_.kind == "analysis" else ir.copy_graph_module(gm)
        start = time.perf_counter()
        try:
            result = pass_(work, ctx)
        except Exception as exc:
            if getattr(exc, "abort_pipeline", False):  # e.g. an unreachable memory budget: the user must act
                record.status, record.error = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                raise
            record.seconds = time.perf_counter() - start
            record.status = "error"
            record.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("pass %s raised and was rolled back: %s", pass_.name, record.error)
            log.debug("pass %s traceback", pass_.name, exc_info=True)
            return gm
        record.seconds = time.perf_counter() - start
        record.notes, record.declined = list(result.notes), list(result.declined)
        record.nodes_involved = list(result.nodes_involved)
        reasons = [r for inst in self.instruments if (r := inst.after_pass(pass_, result, record, ctx))]
        if pass_.kind == "analysis":
            return gm
        if reasons:
            record.status = "rolled back"
            log.warning("pass %s rolled back: %s", pass_.name, reasons[0])
            return gm
        if result.modified:
            record.status = "applied"
            record.nodes_after = len(result.module.graph.nodes)
            ctx.analyses.clear()  # computed on the module before this rewrite
            return result.module
        return gm
