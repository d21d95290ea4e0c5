"""``graphopt.optimize``: capture, run a pipeline of verified passes, return the result."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir
from graphopt.capture import Captured, CaptureError, capture, eval_mode
from graphopt.errors import BadInput, OptionError
from graphopt import fresh_inputs, model_inputs, saved
from graphopt.pass_infra import (
    Instrument,
    OptimizeContext,
    Pass,
    PassManager,
    ProgressInstrument,
    VerifyInstrument,
    check_options,
)
from graphopt.report import Report
from graphopt.target import TargetInfo
from graphopt.verify import ErrorBudget, Verifier
from graphopt import passes as pipelines
from graphopt.user_state import preserves_user_state

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """Parse a memory size: ``2GiB``, ``512MB``, ``1.5g``, or a number of bytes (> 0).

    Raises :class:`graphopt.errors.OptionError` (a ``ValueError``) for anything
    else: text it cannot read, zero, a negative, NaN or infinite size.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError("memory_budget", value, "a memory size is a number of bytes or text like '2GiB'")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise OptionError("memory_budget", value, "cannot read this memory size; write it like '2GiB', "
                              "'512MB' or a number of bytes")
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(size) or size < 1:
        raise OptionError("memory_budget", value, "a memory budget must be a finite size of at least 1 byte, "
                          "e.g. '2GiB'")
    return int(size)


@dataclass
class OptimizeResult:
    """What :func:`graphopt.optimize` returns.

    ``module`` is called exactly like the original model (same arguments, same
    output structure). ``report`` says what each pass did. ``save(dir)``
    writes ``model.pt2`` and ``report.json``.
    """

    module: fx.GraphModule
    report: Report
    captured: Captured
    context: OptimizeContext
    #: the applied passes that spent the error budget (reduced precision); empty: the result is exact
    approximate: tuple[str, ...] = ()
    #: the model it came from and the options it was optimized with (generation builds its graphs with them)
    source_model: torch.nn.Module | None = field(default=None, repr=False)
    options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the prefill / decode graphs, built by the first :meth:`generate` (or :meth:`prepare_generation`)
    generation: Any = field(default=None, repr=False)

    @property
    def example_args(self) -> tuple[Any, ...]:
        return self.captured.args

    @property
    def example_kwargs(self) -> dict[str, Any]:
        return self.captured.kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def exported_program(self) -> torch.export.ExportedProgram:
        """The optimized module as an ``ExportedProgram`` (re-exported from the graph)."""
        with torch.no_grad():
            return torch.export.export(self.module, self.example_args, self.example_kwargs, strict=False)

    def prepare_generation(self, **overrides: Any) -> Any:
        """Build (once) the optimized prefill and decode graphs of a transformers causal LM.

        They are optimized with this result's options (``precision=`` and the
        rest; ``overrides`` replace some, e.g. ``max_length=``) and checked on
        real decode steps. Returns :class:`graphopt.generate.GenerationGraphs`.
        """
        if self.generation is None or overrides:
            from graphopt.generate.build import prepare_generation

            if self.source_model is None:
                raise ValueError("this result has no source model to build generation graphs from")
            self.generation = prepare_generation(self.source_model, **{**self.options, **overrides})
        return self.generation

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: Any = ...,
                 pad_token_id: int | None = None, streamer: Any = None,
                 generator: torch.Generator | None = None, **settings: Any) -> torch.Tensor:
        """Generate tokens after ``input_ids`` with a KV cache, like transformers' ``model.generate``.

        The settings are transformers' and resolve as there (:mod:`graphopt.generate.settings`):
        the call's, a ``generation_config=`` passed, the model's generation config, then
        transformers' defaults. So a plain call is greedy (token-identical to the original
        model's greedy ``generate`` at fp32) unless the model's config samples;
        ``do_sample=True`` samples with ``temperature``, ``top_k`` (50 unless set; 0: none),
        ``top_p``, ``min_p`` (pass a seeded ``generator`` to repeat a draw); ``repetition_penalty``
        applies greedy or sampled. ``max_new_tokens``, or ``max_length`` counting the prompt
        (20 new tokens where nothing sets a length). Settings graphopt does not apply
        (``num_beams``, ``no_repeat_ngram_size``, ...) are accepted at their "off" value and
        refused at another; ``use_cache`` is accepted.
        A left-padded batch takes its ``attention_mask``. Generation stops at the length
        or when every row produced an ``eos_token_id`` (default: the model's; ``None``: no
        end token, as in transformers); ended rows are filled with ``pad_token_id``.
        ``streamer`` is called with each new token column (or is a transformers streamer).
        Returns ``[batch, prompt + generated]``. The first call builds the prefill and
        decode graphs (:meth:`prepare_generation`).
        """
        eos = {} if eos_token_id is ... else {"eos_token_id": eos_token_id}
        return self.prepare_generation().generate(
            input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=pad_token_id, streamer=streamer,
            generator=generator, **eos, **settings)

    def save(self, directory: str | os.PathLike[str], *, generation: bool = False) -> dict[str, str]:
        """Write ``model.pt2``, ``graphopt.json`` and ``report.json`` into ``directory``; returns the paths.

        ``generation=True`` (a transformers causal LM) also writes the generation
        bundle: ``prefill.pt2`` and ``decode.pt2`` (built by :meth:`prepare_generation`
        if not yet), the cache layout and generation config in ``graphopt.json``;
        ``graphopt.load(directory).generate(...)`` then gives this result's tokens.

        ``model.pt2`` returns a flat tuple of tensors, so plain ``torch.export.load``
        reads it anywhere torch is (no transformers, no model code);
        ``graphopt.json`` records the output's structure, and
        :func:`graphopt.load` rebuilds it (see :mod:`graphopt.saved`).
        Files are written to temporary names and renamed, so a failure leaves no partial file.
        """
        os.makedirs(directory, exist_ok=True)
        paths = {"pt2": os.path.join(directory, "model.pt2"), "report": os.path.join(directory, "report.json")}
        structure = saved.save_program(self.module, self.example_args, self.example_kwargs, paths["pt2"])
        extra: dict[str, Any] = {}
        if generation:
            extra["generation"] = self.prepare_generation().save(os.fspath(directory))
            paths.update(prefill=os.path.join(directory, "prefill.pt2"), decode=os.path.join(directory, "decode.pt2"))
        paths["manifest"] = saved.write_manifest(
            os.fspath(directory), "generation" if generation else "model", program="model.pt2", outputs=structure,
            model=self.report.model, approximate=list(self.approximate), torch=torch.__version__, **extra)
        tmp = paths["report"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.report.to_json())
        os.replace(tmp, paths["report"])
        return paths


@preserves_user_state
def optimize(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    passes: Sequence[Pass] | None = None,
    verify: bool = True,
    dynamic_shapes: Any = None,
    dynamic: Any = None,
    memory_budget: int | str | None = None,
    error_budget: ErrorBudget | float | None = None,
    n_random_inputs: int = 2,
    verify_inputs: Sequence[tuple[Sequence[Any], dict[str, Any]]] | Callable[[int], Any] | None = None,
    instruments: Sequence[Instrument] = (),
    progress: Callable[[str], None] | None = None,
    machine: TargetInfo | None = None,
    **options: Any,
) -> OptimizeResult:
    """Optimize ``model`` for inference on inputs like ``example_inputs``.

    Captures the model (:func:`graphopt.capture`), runs ``passes`` (default:
    :func:`graphopt.passes.default_pipeline` for the given options), checks each
    rewrite numerically against the original model on the example inputs and
    ``n_random_inputs`` fresh ones drawn by the rules the graph gives each input
    (:mod:`graphopt.fresh_inputs`) or ``verify_inputs`` instead (``(args, kwargs)`` pairs, or ``f(seed)``
    returning one; ``report.verification_inputs`` says which), rolls back what
    breaks numerics, and returns an :class:`OptimizeResult`. The user's model is not modified.

    ``example_inputs`` may be left out for a transformers model (built from its config, use_cache=False,
    dynamic batch/seq); ``dynamic``: "batch,seq", "batch", names, {"seq": (lo, hi)} or False
    (None: on for built inputs, off for given ones); see :mod:`graphopt.model_inputs`.
    ``machine``: a :class:`graphopt.target.TargetInfo` shared with other calls (its timings measured once).
    Pass options are keyword arguments (see ``graphopt passes``), checked
    against the pipeline's declarations before any pass runs: an unknown one
    raises :class:`graphopt.errors.UnknownOptionError` (a ``TypeError``), a
    value a pass does not allow :class:`graphopt.errors.OptionError` (a
    ``ValueError``).

    >>> import torch, graphopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.ReLU())
    >>> result = graphopt.optimize(model, (torch.randn(2, 8),))
    >>> torch.allclose(result.module(torch.ones(2, 8)), model.eval()(torch.ones(2, 8)))
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    budget_bytes, error_budget = _checked_budgets(model, memory_budget, error_budget)  # before any work
    target, example_inputs, example_kwargs, dynamic_shapes, default_axes = model_inputs.prepare(
        model, example_inputs, example_kwargs, dynamic, dynamic_shapes)
    fresh_inputs.check_form(verify_inputs)  # before anything is captured
    start = time.perf_counter()
    report = Report(model=type(model).__name__)
    captured = _capture(target, example_inputs, example_kwargs, dynamic_shapes, report, default_axes)
    gm = captured.module

    ctx = OptimizeContext(
        args=captured.args,
        kwargs=captured.kwargs,
        flat_inputs=ir.flat_inputs(captured.args, captured.kwargs, gm),
        device=_device_of(model, captured.args, captured.kwargs),
        memory_budget=budget_bytes,
        error_budget=error_budget,
        report=report,
        options=dict(options), target=machine or TargetInfo(),
    )
    pipeline = _checked_pipeline(passes, ctx, options)
    if verify:
        ctx.verifier = _verifier(target, captured, n_random_inputs, verify_inputs)
        report.verification_inputs = ctx.verifier.describe()
    all_instruments = _instruments(verify, progress, instruments)

    gm = PassManager(pipeline, all_instruments).run(gm, ctx)
    report.nodes_after = len(gm.graph.nodes)
    approximate = _verify_result(gm, pipeline, ctx)
    report.total_seconds = time.perf_counter() - start
    log.info("optimized %s: %d -> %d nodes in %.2f s", report.model, report.nodes_before, report.nodes_after,
             report.total_seconds)
    return _result(model, gm, captured, ctx, approximate,
                   _generation_options(passes, memory_budget, error_budget, verify, options))


def _checked_pipeline(passes: Sequence[Pass] | None, ctx: OptimizeContext, options: dict[str, Any]) -> list[Pass]:
    """The passes to run, their options checked; a warning where an error budget is given that no pass spends."""
    pipeline = list(passes) if passes is not None else pipelines.default_pipeline(ctx)
    check_options(pipeline, options)
    if ctx.error_budget is not None and not any(p.uses_error_budget for p in pipeline):
        log.warning("error_budget %s is unused: no pass here trades accuracy for speed; give precision= "
                    "(e.g. precision='auto') for it to apply", ctx.error_budget.rel_l2)
    return pipeline


def _verifier(target: torch.nn.Module, captured: Captured, n_random_inputs: int, verify_inputs: Any) -> Verifier:
    """The verifier: the example and rule-drawn fresh inputs, or the caller's checked ``verify_inputs``."""
    user_sets = None if verify_inputs is None else fresh_inputs.user_input_sets(
        verify_inputs, n_random_inputs, (captured.args, captured.kwargs), captured.module)
    with eval_mode(target):
        return Verifier(target, captured.args, captured.kwargs, captured.module, n_random=n_random_inputs,
                        input_sets=user_sets)


def _result(model: torch.nn.Module, gm: fx.GraphModule, captured: Captured, ctx: OptimizeContext,
            approximate: tuple[str, ...], options: dict[str, Any]) -> OptimizeResult:
    result = OptimizeResult(gm, ctx.report, captured, ctx, approximate, source_model=model, options=options)
    if model_inputs.is_causal_lm(model):  # existing code calling module.generate(...) changes one line
        gm.generate = result.generate
    return result


def _generation_options(passes: Sequence[Pass] | None, memory_budget: Any, error_budget: Any, verify: bool,
                        options: dict[str, Any]) -> dict[str, Any]:
    """The optimize arguments generation graphs are built with (inputs and shapes are theirs)."""
    kept: dict[str, Any] = {"verify": verify, **options}
    if passes is not None:
        kept["passes"] = passes
    if memory_budget is not None:
        kept["memory_budget"] = memory_budget
    if error_budget is not None:
        kept["error_budget"] = error_budget
    return kept




def _checked_budgets(model: torch.nn.Module, memory_budget: int | str | None,
                     error_budget: ErrorBudget | float | None) -> tuple[int | None, ErrorBudget | None]:
    """The budgets validated (OptionError), and the model refused if it has no weight values."""
    if isinstance(error_budget, (int, float)):
        error_budget = ErrorBudget(rel_l2=float(error_budget))
    budget_bytes = parse_bytes(memory_budget)
    _refuse_meta_weights(model)
    return budget_bytes, error_budget


def _refuse_meta_weights(model: torch.nn.Module) -> None:
    """A model whose weights are on the meta device has no values to rewrite or check against."""
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise BadInput(f"the model's {meta!r} is on the meta device (no values): load its weights first "
                       "(e.g. model.to_empty(device='cpu') then load_state_dict), or use graphopt.analyze, "
                       "which needs only shapes")


def _capture(model: torch.nn.Module, example_inputs: Sequence[Any], example_kwargs: dict[str, Any] | None,
             dynamic_shapes: Any, report: Report, default_axes: Sequence[str] = ()) -> Captured:
    """Capture the model, its route, time and node count written into ``report``.

    Where the axes made dynamic by default (``default_axes``) are more than
    the model allows (``torch.export``: "Constraints violated"), captures again
    with them as torch allows (:func:`graphopt.model_inputs.relaxed_dynamic_shapes`)
    and says in ``report.capture_notes`` which became static.
    """
    t0 = time.perf_counter()
    try:
        captured = capture(model, tuple(example_inputs), example_kwargs, dynamic_shapes=dynamic_shapes)
    except CaptureError as exc:
        violation = next((a.message for a in exc.attempts if "Constraints violated" in a.message), None)
        if not default_axes or violation is None:
            raise
        captured = capture(model, tuple(example_inputs), example_kwargs,
                           dynamic_shapes=model_inputs.relaxed_dynamic_shapes(dynamic_shapes))
        report.capture_notes.append(_relaxed_note(captured, default_axes, violation))
        log.warning("%s", report.capture_notes[-1])
    report.capture_seconds = time.perf_counter() - t0
    report.capture_route = captured.route
    report.nodes_before = len(captured.module.graph.nodes)
    return captured


def _relaxed_note(captured: Captured, axes: Sequence[str], violation: str) -> str:
    """What a capture with the default axes as torch allows made of them."""
    kept = model_inputs.dynamic_axis_names(captured.module, axes)
    fixed = [a for a in axes if a not in kept]
    why = f"torch.export: {violation.split('!')[0]}"
    if fixed:
        sizes = ", ".join(fixed)
        return (f"{sizes} static: the model does not run at every {sizes} ({why}), so the result takes only the "
                f"example's; give example inputs of the size you run, or dynamic= with a range it allows")
    return f"dynamic {', '.join(axes)} narrowed to the sizes the model allows ({why})"


def _instruments(
    verify: bool, progress: Callable[[str], None] | None, instruments: Sequence[Instrument],
) -> list[Instrument]:
    """The pass manager's instruments: verification (when asked), progress lines, then the caller's own."""
    all_instruments: list[Instrument] = [VerifyInstrument()] if verify else []
    if progress is not None:
        all_instruments.append(ProgressInstrument(progress))
    return all_instruments + list(instruments)


def _verify_result(gm: fx.GraphModule, pipeline: Sequence[Pass], ctx: OptimizeContext) -> tuple[str, ...]:
    """Check the whole result's numerics into ``ctx.report.final_numerics`` (when verifying).

    The result is held to the budget its approximate passes spent (the first applied one's by default).
    Returns the names of those passes.
    """
    report = ctx.report
    applied = [p for p in pipeline if p.uses_error_budget
               and (r := report.record(p.name)) is not None and r.status == "applied"]
    if applied:
        ctx.error_budget = ctx.budget_for(applied[0])
    if ctx.verifier is not None:
        report.final_numerics = ctx.verify(gm, ctx.error_budget if applied else None)
    return tuple(p.name for p in applied)


def _device_of(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device:
    for p in model.parameters():
        return p.device
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")
