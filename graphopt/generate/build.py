"""Prefill and decode graphs of a causal LM, each optimized by graphopt's pipeline and verified on real steps.

``prepare_generation(model, **options)`` captures :class:`~graphopt.generate.step.CausalLMStep`
twice through :func:`graphopt.optimize` with the same options (precision, passes, budgets):

* **prefill**: dynamic batch, prompt length and cache length; verified on
  real prompts (a left-padded one among them);
* **decode**: one token per row; dynamic batch and cache length; verified on
  the states of real decode steps (the eager model's own cache after a
  prompt and a few greedy tokens), not on random caches.

Then the pair is checked end to end: teacher-forced logits of a prompt plus
``check_steps`` decode steps against the eager model (relative L2 and top-1
agreement), the check that also covers the cache writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim

from graphopt.capture import eval_mode
from graphopt.errors import BadInput
from graphopt.fresh_inputs import InputChain
from graphopt.generate.aot import aot_compiler
from graphopt.generate.bundle import save_generation_programs
from graphopt.generate.cache_check import require_static_cache, window_cap
from graphopt.generate.compiled import CompiledDecode
from graphopt.generate.cuda_graphs import CudaGraphDecode
from graphopt.generate.decode_attention import math_decode_attention
from graphopt.generate.end_to_end import (
    GenerationCheckError,
    StepCheck,
    fall_back_within_budget,
    pair_budget,
    precision_not_applied,
)
from graphopt.generate.loop import GenerationTimes, prefill_view, prompt_positions, run_generation, weights_device
from graphopt.generate.settings import generation_defaults, request_for
from graphopt.generate.step import CacheLayout, CausalLMStep, read_cache_layout
from graphopt.model_inputs import is_causal_lm, max_positions
from graphopt.ops.kernel_calls import inline_kernel_calls
from graphopt.optimize import OptimizeResult, optimize
from graphopt.target import TargetInfo
from graphopt.verify import ErrorBudget

log = logging.getLogger(__name__)

#: example sizes the graphs are captured at (none is 0 or 1, which torch.export would specialise)
EXAMPLE_BATCH, EXAMPLE_PROMPT, EXAMPLE_NEW = 2, 8, 8
#: the prefill graph's weight layout is also timed at this many times its example's rows (2 x 8 -> 1,024: eight
#: 128-token prompts), so a layout that pays for short prompts is not kept where it costs long ones
PREFILL_LONG_SCALE = 64
#: ``compile_decode`` values: what compiles the decode step (:meth:`GenerationGraphs.decode_step`)
COMPILE_MODES: dict[bool | str, str] = {False: "not compiled", True: "torch.compile", "aot": "AOTInductor"}
#: the prompt length the prefill graph's precision plan is timed at, as a whole
TIMED_PROMPT = 128
#: ``eos_token_id`` not given: the model's generation config decides (``None`` means none, as in transformers)
MODEL_DEFAULT: Any = type("ModelDefault", (), {"__repr__": lambda self: "<the model's>"})()
#: the end-to-end check teacher-forces CHECK_STEPS decode steps (CHECK_STEPS_REDUCED where reduced precision is in
#: the plan) after a CHECK_PROMPT-token prompt over CHECK_ROWS rows, shorter where the model's length is. An exact plan
#: is judged on every logit (8 x 33 positions suffice). A reduced one is judged by top-1 agreement, a count of flips:
#: over 8 x 33 = 264 positions its standard error at 0.95 is 1.3%, and plans that passed there measured 0.946 over
#: 8 x 129 = 1,032 (auto on the benchmark Llama); and its error grows with the context (int8 weight-only Llama: rel
#: L2 1.5e-2 at 29 tokens, 2.1e-2 at 253). So reduced plans are checked over 1,032 positions at contexts up to 256.
CHECK_STEPS = 32
CHECK_STEPS_REDUCED = 128
CHECK_PROMPT = 128
CHECK_ROWS = 8
#: real decode steps the decode graph's passes are verified on, DECODE_ROWS rows each after a DECODE_PROMPT-token
#: prompt, run as one chain (:class:`~graphopt.fresh_inputs.InputChain`): each step reads the keys and values the
#: graph being checked wrote at the steps before, so half the cache read at the last step is its own, as in a
#: generation of as many tokens as its prompt. The precision search's top-1 is pooled over their 1,024 positions.
#: Before (6 steps on snapshots of an exact cache after 192 tokens, 96 positions) the check could not see the
#: error a key/value projection leaves in the cache: int4 on three merged q/k/v projections of the benchmark Llama
#: measured 1.8e-2 / 0.949 there and 4.4e-2 / 0.905 end to end (AMD EPYC Zen 5, 2026-12-08).
DECODE_STATES = 32
DECODE_ROWS = 32
DECODE_PROMPT = 32
#: the longest prompt + tokens the build's own examples and checks use
CHECK_LENGTH = 40


@dataclass
class GenerationGraphs:
    """The optimized prefill and decode graphs of one causal LM, its cache layout and limits."""

    prefill: OptimizeResult
    decode: OptimizeResult
    layout: CacheLayout
    max_length: int
    #: the most rows the graphs take (None: unchecked) and the token ids they embed (``[0, vocab_size)``)
    max_batch: int | None = None
    vocab_size: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    #: the model's generation-config settings, the defaults of each generate call
    #: (:func:`~graphopt.generate.settings.generation_defaults`)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    check: StepCheck | None = None
    times: GenerationTimes = field(default_factory=GenerationTimes)
    #: what the build did beyond the plan (a decode graph re-planned, reduced precision dropped)
    notes: list[str] = field(default_factory=list)
    #: the error budget the pair is held to end to end (the first plan's; None: exact)
    error_budget: ErrorBudget | None = None
    #: replay decode from CUDA graphs: None on a CUDA device, False never, True (also) where possible
    cuda_graphs: bool | None = None
    #: run decode compiled (:class:`~graphopt.generate.compiled.CompiledDecode`): True through torch.compile,
    #: ``"aot"`` through AOTInductor (:mod:`graphopt.generate.aot`), False not; the build sets it when asked for
    #: and its check passed
    compile_decode: bool | str = False
    _decode_runner: Any = field(default=None, repr=False)
    _compiled: Any = field(default=None, repr=False)
    _runnable: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the graphs' dynamic axes (``torch.export`` dynamic_shapes), what saving re-exports them with
    dynamic_shapes: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, directory: str) -> dict[str, Any]:
        """Write ``prefill.pt2`` and ``decode.pt2`` into ``directory``; returns the bundle's manifest fields."""
        return save_generation_programs(self, directory)

    def runnable(self, name: str) -> torch.nn.Module:
        """The ``"prefill"`` or ``"decode"`` graph as the loop runs it: its weight-only ops as direct kernel calls
        (:func:`~graphopt.ops.kernel_calls.inline_kernel_calls`: the same numbers, less overhead per op); the
        module that is saved and exported keeps the ops."""
        module = getattr(self, name).module
        cached = self._runnable.get(name)
        if cached is None or cached[0] is not module:
            cached = self._runnable[name] = (module, inline_kernel_calls(module))
        return cached[1]

    def _for_compiler(self, decode: torch.nn.Module) -> torch.nn.Module:
        """``decode`` with its one-query attentions as matmuls (:func:`math_decode_attention`), made once."""
        cached = self._runnable.get("decode for a CPU compiler")
        if cached is None or cached[0] is not decode:
            cached = self._runnable["decode for a CPU compiler"] = (decode, math_decode_attention(decode))
        return cached[1]

    def decode_step(self, device: torch.device) -> Any:
        """What the loop calls per token: the decode graph (:meth:`runnable`), compiled where
        :attr:`compile_decode` says, replayed from CUDA graphs on a GPU."""
        decode = self.runnable("decode")
        if self.compile_decode:
            if device.type == "cpu":  # one-query attention as matmuls, which the compiler fuses around
                decode = self._for_compiler(decode)
            aot = self.compile_decode == "aot"
            name = compile_mode_name(self.compile_decode)
            if self._compiled is None or self._compiled.decode is not decode or self._compiled.name != name:
                compiler = aot_compiler(self.decode.example_args, self.dynamic_shapes.get("decode")) if aot else None
                self._compiled = CompiledDecode(decode, compiler=compiler, name=name)
            decode = self._compiled
        if self.cuda_graphs is False or (self.cuda_graphs is None and device.type != "cuda"):
            return decode
        if self._decode_runner is None or self._decode_runner.decode is not decode:
            self._decode_runner = CudaGraphDecode(decode, self.layout, max_length=self.max_length)
        return self._decode_runner

    @property
    def compiled_note(self) -> str | None:
        """Why decode runs uncompiled although it was compiled (None: not asked for, or it runs compiled)."""
        return self._compiled.fallback_reason if self._compiled is not None else None

    @property
    def cuda_graphs_note(self) -> str | None:
        """Why decode ran without CUDA graphs although they were asked for (None: it did not, or they ran)."""
        return self._decode_runner.fallback_reason if self._decode_runner is not None else None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: Any = MODEL_DEFAULT, pad_token_id: int | None = None,
                 streamer: Any = None, generator: torch.Generator | None = None, **settings: Any) -> torch.Tensor:
        """Generate after ``input_ids`` (left-padded batches take ``attention_mask``); see :func:`run_generation`.

        The settings resolve as in transformers' ``generate``
        (:mod:`graphopt.generate.settings`): the call's, then a ``generation_config=``
        passed, then the model's generation config, then transformers' defaults.
        ``eos_token_id``: the model's end token(s) unless given; ``None`` generates without one.
        """
        named = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                 "top_k": top_k, "top_p": top_p, "pad_token_id": pad_token_id}
        request = request_for(self, input_ids, named, settings, eos_token_id, eos_unset=MODEL_DEFAULT)
        device = weights_device(self.prefill.module)
        if device is None:
            device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        decode = self.decode_step(device)
        return run_generation(self.runnable("prefill"), decode, self.layout, input_ids, attention_mask,
                              max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                              eos_token_id=request.eos_token_id, pad_token_id=request.pad_token_id,
                              streamer=streamer, generator=generator, max_length=self.max_length,
                              max_batch=self.max_batch, vocab_size=self.vocab_size, times=self.times, device=device)


def compile_mode_name(value: Any) -> str:
    """What compiles the decode step for ``compile_decode=value`` (:data:`COMPILE_MODES`); BadInput otherwise."""
    name = COMPILE_MODES.get(value) if isinstance(value, (bool, str)) else None
    if name is None:
        raise BadInput(f"compile_decode={value!r}: use False, True (torch.compile) or \"aot\" (AOTInductor)")
    return name


def embedded_ids(model: torch.nn.Module) -> int | None:
    """How many token ids the model embeds: its input embedding's rows (``config.vocab_size`` can be fewer)."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None


def model_max_length(model: torch.nn.Module, limit: int | None) -> int:
    """The longest prompt + generation the graphs may accept: the position table, ``limit`` (a local-attention
    window may cap it further: :func:`~graphopt.generate.cache_check.window_cap`)."""
    length = max_positions(model.config) or 8192
    return min(length, limit) if limit else length


def _dims(max_batch: int, max_length: int) -> tuple[Dim, Dim, Dim]:
    batch = Dim("batch", min=1, max=max_batch)
    prompt = Dim("prompt_len", min=2, max=max_length)
    cache = Dim("cache_len", min=4, max=max_length)
    return batch, prompt, cache


def _prompt_inputs(model: torch.nn.Module, layout: CacheLayout, batch: int, prompt: int, length: int,
                   pad_rows: int, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    mask[:, :prompt] = 1
    for row in range(min(pad_rows, batch)):  # left-pad the first rows by a few tokens
        mask[row, : 1 + row % max(1, prompt - 1)] = 0
    args = (ids, mask, prompt_positions(mask[:, :prompt]), torch.tensor(0, device=device),
            layout.allocate(batch, length, device))
    return args, {}


def _check_prompt(wanted: int, steps: int, cap: int, shortest: int) -> int:
    """A prompt length for a check of ``steps`` more tokens within ``cap`` positions: ``wanted`` where it fits."""
    return max(shortest, min(wanted, cap - steps - 1))


def _decode_states(step: CausalLMStep, layout: CacheLayout, model: torch.nn.Module, steps: int,
                   seed: int, batch: int, prompt: int = EXAMPLE_PROMPT + 3,
                   chained: bool = False) -> list[tuple[tuple, dict]]:
    """The inputs of ``steps`` real greedy decode steps of ``batch`` rows after a left-padded prompt, each a
    snapshot; ``chained``: an :class:`~graphopt.fresh_inputs.InputChain` whose steps share one cache (each writes
    its own position before it reads the cache, so the positions after it, filled here, are never read)."""
    (ids, mask, pos, start, cache), _ = _prompt_inputs(model, layout, batch, prompt, prompt + steps + 1, 2, seed)
    states = []
    with torch.no_grad():
        logits = step(ids, mask, pos, start, cache)
        positions = pos[:, -1:]
        for i in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            mask = mask.clone()
            mask[:, prompt + i] = 1
            positions = positions + 1
            args = (token, mask, positions, torch.tensor(prompt + i, device=token.device),
                    cache if chained else [c.clone() for c in cache])
            states.append((args, {}))
            logits = step(*args[:4], cache)
    return InputChain(states) if chained else states


def teacher_forced_logits(prefill: Callable, decode: Callable, layout: CacheLayout, model: torch.nn.Module,
                          steps: int = CHECK_STEPS, seed: int = 7, prompt: int = EXAMPLE_PROMPT + 5) -> torch.Tensor:
    """Last-position logits of a left-padded ``prompt``-token prompt, then of ``steps`` forced (random) tokens:
    ``[steps+1, B, V]`` (``B`` = :data:`CHECK_ROWS`, the first rows left-padded)."""
    (ids, mask, pos, start, cache), _ = _prompt_inputs(model, layout, CHECK_ROWS, prompt, prompt + steps, 3, seed)
    forced = torch.randint(0, int(model.config.vocab_size), (steps, CHECK_ROWS, 1),
                           generator=torch.Generator().manual_seed(seed + 1)).to(ids.device)
    out = []
    with torch.no_grad():
        view, view_mask = prefill_view(cache, mask, prompt)  # as the generation loop calls it
        out.append(prefill(ids, view_mask, pos, start, view)[:, -1].float())
        positions = pos[:, -1:]
        for i in range(steps):
            mask[:, prompt + i] = 1
            positions = positions + 1
            start = torch.tensor(prompt + i, device=ids.device)
            out.append(decode(forced[i], mask, positions, start, cache)[:, -1].float())
    return torch.stack(out)


def check_steps(graphs: GenerationGraphs, model: torch.nn.Module, steps: int | None = None,
                prompt: int | None = None, seed: int = 7) -> StepCheck:
    """Compare the optimized pair with the eager model on teacher-forced prompt + decode logits (fp32 reference).

    ``steps`` None: :data:`CHECK_STEPS_REDUCED` where the plan has reduced precision, else :data:`CHECK_STEPS`.
    ``prompt`` None: :data:`CHECK_PROMPT` tokens where the graphs' length allows (a benchmark passes its own).
    ``seed`` draws the prompt and the forced tokens (another seed: other positions than the build's check)."""
    step = CausalLMStep(model)
    if steps is None:
        steps = CHECK_STEPS_REDUCED if pair_budget(graphs) is not None else CHECK_STEPS
    if prompt is None:  # within the lengths the graphs take (at least CHECK_LENGTH)
        limit = max(graphs.max_length, CHECK_LENGTH)
        steps = max(1, min(steps, limit - EXAMPLE_PROMPT - 5))
        prompt = _check_prompt(CHECK_PROMPT, steps - 1, limit, EXAMPLE_PROMPT + 5)
    reference = teacher_forced_logits(step, step, graphs.layout, model, steps, seed=seed, prompt=prompt)
    device = next(model.parameters()).device
    got = teacher_forced_logits(graphs.runnable("prefill"), graphs.decode_step(device), graphs.layout, model,
                                steps, seed=seed, prompt=prompt)
    rel = float((got - reference).norm() / reference.norm().clamp_min(1e-30))
    top1 = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    return StepCheck(rel if math.isfinite(rel) else math.inf, top1, steps, graphs.layout.dtype,
                     int(reference.shape[1]), prompt)


def prepare_generation(model: torch.nn.Module, *, max_batch: int = 64, max_length: int | None = None,
                       compile_decode: bool | str = False, progress: Callable[[str], None] | None = None,
                       **optimize_options: Any) -> GenerationGraphs:
    """Capture, optimize and check the prefill and decode graphs of a transformers causal LM.

    ``optimize_options`` are :func:`graphopt.optimize`'s keyword arguments
    (``precision=``, ``error_budget=``, ``passes=``, pass options, ...), applied
    to both graphs. ``max_length`` caps prompt + generated tokens (default:
    the model's position table; its local-attention window where the static
    cache misses the model past it, with a note). The user's model is not
    modified.

    Reduced precision is planned per graph on single steps; errors then add up
    through the cache. When the pair's teacher-forced logits miss the budget,
    both graphs are planned again at a budget tightened by the miss
    (:func:`replan_scale`), then at half that (``int4``: in ``int8wo`` at the
    pair's budget instead), then built exact; ``graphs.notes`` says what
    happened.

    ``compile_decode=True`` runs the decode graph through ``torch.compile``
    (:mod:`graphopt.generate.compiled`: its small ops fused, a few seconds to
    compile); ``compile_decode="aot"`` compiles it ahead of time with
    AOTInductor (:mod:`graphopt.generate.aot`: the same fusions without
    torch.compile's per-call guards and Python wrapper; 15-30 s to compile).
    Either is checked end to end like the graphs; where it fails to compile
    or misses the check, decode runs uncompiled and ``graphs.notes`` says why.
    """
    compile_mode_name(compile_decode)  # an unknown value is refused before any build
    if not is_causal_lm(model):
        raise BadInput(f"{type(model).__name__} is not a transformers causal LM (a PreTrainedModel with "
                       "generate()); generation graphs are built for those only")
    say = progress or (lambda _msg: None)
    with eval_mode(model):
        builder = _Builder(model, max_batch, max_length, progress)
        say("generation: prefill graph")
        prefill = builder.prefill(optimize_options)
        say("generation: decode graph")
        decode = builder.decode(optimize_options)
        config = getattr(model, "generation_config", None) or model.config
        graphs = GenerationGraphs(prefill, decode, builder.layout, builder.length_cap,
                                  max_batch=builder.batch_cap, vocab_size=embedded_ids(model),
                                  eos_token_id=getattr(config, "eos_token_id", None),
                                  pad_token_id=getattr(config, "pad_token_id", None),
                                  generation_defaults=generation_defaults(getattr(model, "generation_config", None)),
                                  dynamic_shapes={"prefill": builder.prefill_shapes, "decode": builder.decode_shapes})
        graphs.notes += builder.notes
        say("generation: teacher-forced check")
        graphs.error_budget = pair_budget(graphs)
        graphs.check = check_steps(graphs, model)
        fall_back_within_budget(graphs, builder.rebuild(graphs), lambda: check_steps(graphs, model), optimize_options,
                                say)
        if optimize_options.get("precision"):
            graphs.notes += precision_not_applied(graphs)
        if compile_decode:
            say(f"generation: compiling the decode graph ({compile_mode_name(compile_decode)})")
            _compile_decode(graphs, model, compile_decode)
    log.info("generation graphs ready: %s", graphs.check.summary())
    return graphs


def _compile_decode(graphs: GenerationGraphs, model: torch.nn.Module, mode: bool | str) -> None:
    """Compile the decode graph (``mode``: True or ``"aot"``) and keep it where it compiles and passes the
    end-to-end check."""
    graphs.compile_decode = mode
    check = check_steps(graphs, model)
    reason = graphs.compiled_note
    if reason is None and not check.ok(pair_budget(graphs)):
        reason = f"the compiled step misses the check ({check.summary()})"
    if reason is None:
        graphs.check = check
        return
    graphs.compile_decode = False
    graphs.notes.append(f"decode not compiled: {reason}")
    log.warning("generation: decode not compiled: %s", reason)


class _Builder:
    """Captures and optimizes the two graphs of one model (the shapes and real inputs they are checked on)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_length: int | None,
                 progress: Callable[[str], None] | None) -> None:
        self.model, self.progress = model, progress
        # one machine record for every graph built and re-built here: a re-plan of the same graph reuses its timings
        self.machine = TargetInfo()
        self.layout = read_cache_layout(model)
        self.length_cap, window_note = window_cap(model, self.layout, model_max_length(model, max_length))
        #: what the build says beyond its graphs (the window that capped the length)
        self.notes = [window_note] if window_note else []
        if window_note:
            log.warning("generation: %s", window_note)
        # the step every graph is checked against must itself be the model: its logits over a static cache at the
        # lengths the checks use (or the cap) against the model's forward without a cache
        require_static_cache(model, self.layout, min(self.length_cap, CHECK_PROMPT + CHECK_STEPS))
        self.step = CausalLMStep(model)
        # the graphs take any length up to the cap; the examples and checks below need up to CHECK_LENGTH
        if not isinstance(max_batch, int) or max_batch < 1:
            raise BadInput(f"max_batch must be a positive integer (got {max_batch!r})")
        # likewise the batch: the decode graph is verified on DECODE_ROWS rows, the pair checked on CHECK_ROWS
        self.batch_cap = max(max_batch, DECODE_ROWS, CHECK_ROWS)
        self.batch, self.prompt, self.cache_len = _dims(self.batch_cap, max(self.length_cap, CHECK_LENGTH))
        self.kv = [{0: self.batch, 2: self.cache_len}] * (2 * self.layout.layers)
        self.prefill_shapes = ({0: self.batch, 1: self.prompt}, {0: self.batch, 1: self.cache_len},
                               {0: self.batch, 1: self.prompt}, None, self.kv)
        self.decode_shapes = ({0: self.batch}, {0: self.batch, 1: self.cache_len}, {0: self.batch}, None, self.kv)

    def rebuild(self, graphs: GenerationGraphs) -> Callable[[dict[str, Any]], None]:
        """What replaces both of ``graphs``' graphs with ones built with other options (a re-plan)."""
        def replace(options: dict[str, Any]) -> None:
            graphs.prefill, graphs.decode = self.prefill(options), self.decode(options)
        return replace

    def prefill(self, options: dict[str, Any]) -> OptimizeResult:
        model, layout = self.model, self.layout
        example, _ = _prompt_inputs(model, layout, EXAMPLE_BATCH, EXAMPLE_PROMPT, EXAMPLE_PROMPT + EXAMPLE_NEW, 1, 0)
        checks = [_prompt_inputs(model, layout, b, t, t + n, pads, seed)
                  for b, t, n, pads, seed in ((3, 5, 7, 2, 1), (1, 13, 4, 0, 2), (2, 8, 9, 0, 3), (2, 6, 0, 1, 5))]
        # the last set: a cache exactly as long as the prompt, which is how the loop calls prefill (prefill_view)
        if options.get("passes") is None:  # prompts of tens to hundreds of rows; checked at a long one too
            options = {"weight_layout_policy": "measure", "weight_layout_long_scale": PREFILL_LONG_SCALE, **options}
        if options.get("precision") is not None:
            # a prompt is a hundred rows or more, where weight-only kernels are compute-bound and lose to fp32 (and
            # bf16 wins, which it does not at the example's 16 rows): precisions are kept where the whole graph is
            # faster with them at a real prompt
            length = min(TIMED_PROMPT, self.length_cap)
            prompt = _prompt_inputs(model, layout, 1, length, length, 0, 9)
            options = {"precision_speed_check": True, "precision_timing": "model", "precision_timing_inputs": prompt,
                       **options}
        return optimize(self.step, example, dynamic_shapes=self.prefill_shapes, verify_inputs=checks,
                        progress=self.progress, machine=self.machine, **options)

    def decode(self, options: dict[str, Any]) -> OptimizeResult:
        # the example (what passes time their choices on) has the fewest rows torch.export keeps dynamic, since
        # kernels rank differently by rows (int8 weight-only: 0.7 ms at 2 rows, 2.3 at 8 on an LM head); the
        # states verified on have more rows, for a top-1 agreement over more than a handful of positions
        example = _decode_states(self.step, self.layout, self.model, 1, seed=4, batch=EXAMPLE_BATCH)[0][0]
        shortest = EXAMPLE_PROMPT + 3
        steps = max(1, min(DECODE_STATES, self.length_cap - shortest - 1))
        prompt = _check_prompt(DECODE_PROMPT, steps, self.length_cap, shortest)
        states = _decode_states(self.step, self.layout, self.model, steps, seed=5, batch=DECODE_ROWS,
                                prompt=prompt, chained=True)
        if options.get("passes") is None:  # one token per row: matrix-vector products, where the layout pays
            options = {"weight_layout_policy": "measure", **options}
        # a step streams every weight from memory once: precisions are timed inside the step, not op by op, and
        # on one row (kernels rank differently by rows: fp32 matrix-vector products take half the time of two rows)
        if options.get("precision") is not None:
            one_row = _decode_states(self.step, self.layout, self.model, 1, seed=6, batch=1)[0]
            options = {"precision_timing": "model", "precision_timing_inputs": one_row, **options}
        return optimize(self.step, example, dynamic_shapes=self.decode_shapes, verify_inputs=states,
                        progress=self.progress, machine=self.machine, **options)


__all__ = ["GenerationCheckError", "GenerationGraphs", "StepCheck", "check_steps", "is_causal_lm",
           "prepare_generation"]
