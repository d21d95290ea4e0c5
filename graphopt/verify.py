"""Numeric verification: run the model before and after a rewrite and compare.

Inputs are the user's example inputs plus fresh random inputs of the same
spec (:mod:`graphopt.fresh_inputs`): same dtype and shape, integer inputs
drawn by the rule the graph gives them (indices inside the table or dimension
they index, embedding-bag offsets sorted from 0, 0/1 masks kept 0/1), floats
with the example's mean and spread; or the caller's own input sets.

Tolerances by dtype (relative L2 of each output against the reference):
fp32/fp64 1e-5, bf16/fp16 1e-2; integer and bool outputs must be equal.
A model that itself runs in bf16/fp16 is off from exact arithmetic by more
than that on long sequences, so a rewrite that rounds differently (a fused
attention) can miss 1e-2 against the model while being as accurate: such an
output is then judged against an fp32 run of the model instead, and passes
when its error there is at most :data:`FP32_MATCH_MARGIN` times the model's
own (:class:`Fp32Reference`). The same holds for an fp32 model whose own
conditioning turns fp32 rounding into more than 1e-5 at an output (a
LayerNorm over two nearly equal features): its outputs are judged against an
fp64 run of the model.
Passes that trade accuracy for speed (reduced precision) are verified against
the user's :class:`ErrorBudget` instead.

A model that draws random numbers in its forward (ViT-MAE's random masking,
a noise input made inside) would differ from itself run to run: every run of
one input set, the model's and each candidate's, starts from the same random
seed (:func:`same_random_numbers`), and the caller's random state is put back
after it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphopt.error_norms import finite_errors
from graphopt.errors import OptionError
from graphopt.fresh_inputs import InputChain, describe_rules, input_specs, random_inputs
from graphopt.user_state import TensorSnapshot

log = logging.getLogger(__name__)

REL_L2_TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

#: outputs whose every element is within this of the reference pass whatever their relative
#: error: a numerically-zero output (the mean of a normalised tensor) has no meaningful relative L2
ABS_FLOOR = {
    torch.float64: 1e-9,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-3,
    torch.float16: 1e-3,
}

#: reduced-precision float dtypes: outputs a rewrite may round differently from the model
REDUCED_FLOATS = (torch.bfloat16, torch.float16)
#: the random seed of input set ``i``'s runs is this plus ``i``
RANDOM_SEED = 1234


@contextlib.contextmanager
def same_random_numbers(input_index: int) -> Iterator[None]:
    """Run the body from input set ``input_index``'s random seed, the random state outside put back after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(RANDOM_SEED + input_index)
        yield


#: a reduced-precision output that misses its tolerance against the model passes when its relative L2 against an
#: fp32 run of the model is at most this multiple of the model's own (as accurate as the model, within 10%)
FP32_MATCH_MARGIN = 1.1

@dataclass(frozen=True)
class ErrorBudget:
    """How much output error a reduced-precision rewrite may introduce.

    ``rel_l2``: relative L2 error of each floating output against fp32.
    ``top1``: minimum top-1 agreement (fraction) over the last axis of
    classifier/LM outputs, or None to skip that check. Agreement is a rate
    over positions, so a verifier pools it over all its input sets (every
    row of every set, per output); a set of two rows alone would turn one
    flip into 50%.
    """

    rel_l2: float = 1e-2
    top1: float | None = None

    def __post_init__(self) -> None:
        number = isinstance(self.rel_l2, (int, float)) and not isinstance(self.rel_l2, bool)
        if not number or not math.isfinite(self.rel_l2) or self.rel_l2 < 0:
            raise OptionError("error_budget", self.rel_l2, "a relative L2 error must be a finite number >= 0")
        if self.top1 is not None and not (isinstance(self.top1, (int, float)) and 0 <= self.top1 <= 1):
            raise OptionError("top1", self.top1, "a top-1 agreement is a fraction between 0 and 1")


@dataclass
class OutputError:
    index: int
    dtype: str
    max_abs: float
    rel_l2: float
    top1: float | None = None
    ok: bool = True
    reason: str = ""
    #: the rows (positions) ``top1`` was taken over; pooled over input sets by :func:`summarize`
    positions: int = 0
    #: when judged against a wider run of the model (fp32 for bf16/fp16, fp64 for fp32; ``wide`` names it):
    #: this output's relative L2 there, and the model's own
    fp32_rel_l2: float | None = None
    model_fp32_rel_l2: float | None = None
    wide: str = ""


@dataclass
class Numerics:
    """Comparison of a candidate against the reference over all input sets."""

    ok: bool
    max_abs: float = 0.0
    rel_l2: float = 0.0
    top1: float | None = None
    inputs_checked: int = 0
    reason: str = ""
    outputs: list[OutputError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = d["outputs"][:16]
        return d

    def summary(self) -> str:
        s = f"rel_l2 {self.rel_l2:.1e}, max_abs {self.max_abs:.1e}"
        if self.top1 is not None:
            s += f", top1 {self.top1:.3f}"
        judged = [o for o in self.outputs if o.fp32_rel_l2 is not None]
        if judged:
            worst = max(judged, key=lambda o: o.fp32_rel_l2 / max(o.model_fp32_rel_l2 or 0.0, 1e-30))
            s += (f"; against {worst.wide or 'fp32'}: {worst.fp32_rel_l2:.1e} (the model's own "
                  f"{worst.model_fp32_rel_l2:.1e}, {len(judged)} output(s) judged there)")
        return s


def _leaves(out: Any) -> list[Any]:
    return pytree.tree_leaves(out)


def compare_outputs(
    reference: Any, candidate: Any, budget: ErrorBudget | None = None
) -> list[OutputError]:
    """Compare two output structures leaf by leaf."""
    ref_leaves, cand_leaves = _leaves(reference), _leaves(candidate)
    if len(ref_leaves) != len(cand_leaves):
        return [OutputError(-1, "", math.inf, math.inf, ok=False,
                            reason=f"output structure changed: {len(ref_leaves)} leaves -> {len(cand_leaves)}")]
    errors = []
    for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
        if not isinstance(r, torch.Tensor):
            ok = r == c
            errors.append(OutputError(i, type(r).__name__, 0.0 if ok else math.inf, 0.0 if ok else math.inf,
                                      ok=bool(ok), reason="" if ok else f"value {r!r} -> {c!r}"))
            continue
        if not isinstance(c, torch.Tensor) or tuple(r.shape) != tuple(c.shape):
            errors.append(OutputError(i, str(r.dtype), math.inf, math.inf, ok=False,
                                      reason=f"output {i} shape {tuple(r.shape)} -> "
                                      f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"))
            continue
        if not (r.dtype.is_floating_point or r.dtype.is_complex):
            equal = bool(torch.equal(r, c.to(r.dtype)))
            errors.append(OutputError(i, str(r.dtype), 0.0 if equal else math.inf, 0.0 if equal else math.inf,
                                      ok=equal, reason="" if equal else f"integer output {i} differs"))
            continue
        measured = finite_errors(r, c)
        if measured is None:
            errors.append(OutputError(i, str(r.dtype), math.inf, math.inf, ok=False,
                                      reason=f"output {i} has NaN/inf where the reference is finite"))
            continue
        max_abs, diff_norm, denom = measured
        rel = diff_norm / denom if denom > 0 else (0.0 if max_abs == 0 else math.inf)
        top1, positions = None, 0
        if r.ndim >= 2 and r.shape[-1] > 1:
            top1 = float((r.argmax(-1) == c.argmax(-1).to(r.device)).float().mean())
            positions = r.numel() // r.shape[-1]
        if budget is not None:
            tol = budget.rel_l2
        else:
            tol = REL_L2_TOLERANCE.get(r.dtype, 1e-2)
        ok = rel <= tol or (budget is None and max_abs <= ABS_FLOOR.get(r.dtype, 0.0))
        reason = "" if ok else f"output {i} relative L2 {rel:.2e} > {tol:.0e}"
        errors.append(OutputError(i, str(r.dtype), max_abs, rel, top1, ok, reason, positions))
    return errors


def pooled_top1(per_input: Sequence[list[OutputError]]) -> dict[int, tuple[float, int]]:
    """Per output index: top-1 agreement over every row of every input set, and that row count."""
    agree: dict[int, float] = {}
    rows: dict[int, int] = {}
    for errs in per_input:
        for e in errs:
            if e.top1 is not None and e.positions:
                agree[e.index] = agree.get(e.index, 0.0) + e.top1 * e.positions
                rows[e.index] = rows.get(e.index, 0) + e.positions
    return {i: (agree[i] / rows[i], rows[i]) for i in rows}


def summarize(per_input: Sequence[list[OutputError]], budget: ErrorBudget | None = None) -> Numerics:
    """One :class:`Numerics` over all input sets: the worst relative L2 and max-abs of any set, and top-1
    agreement pooled over the sets' rows (:func:`pooled_top1`), judged against ``budget.top1``."""
    flat = [e for errs in per_input for e in errs]
    pooled = pooled_top1(per_input)
    if budget is not None and budget.top1 is not None:
        for i, (top1, rows) in sorted(pooled.items()):
            if top1 < budget.top1:
                first = next(e for e in flat if e.index == i and e.top1 is not None and e.positions)
                first.ok = False
                first.reason = first.reason or (f"output {i} top-1 agreement {top1:.4f} < {budget.top1} "
                                                f"(over {rows} rows of {len(per_input)} input set(s))")
    bad = [e for e in flat if not e.ok]
    return Numerics(
        ok=not bad,
        max_abs=max((e.max_abs for e in flat), default=0.0),
        rel_l2=max((e.rel_l2 for e in flat), default=0.0),
        top1=min(t for t, _ in pooled.values()) if pooled else None,
        inputs_checked=len(per_input),
        reason=bad[0].reason if bad else "",
        outputs=flat,
    )


class Fp32Reference:
    """A wider run of the model on the verification inputs, made once on first use: fp32 for a bf16/fp16
    model, fp64 for an fp32 one (whose fp64 copy takes at most :data:`WIDE_REFERENCE_MAX_BYTES`).

    For each input set and output leaf narrower than ``wide``: the wide output
    and the model's own relative L2 against it. That error is the model's own
    conditioning at its dtype (a LayerNorm over two nearly equal features turns
    a rounding in its input into 1e-4 at its output): a rewrite whose output
    misses its tolerance against the model but is as accurate as the model
    against the wide run is right. A deep copy of the model is cast for the run
    and dropped after it (the user's model is not touched); narrower float
    inputs are cast too. ``available`` is False for anything but an
    ``nn.Module`` whose wide copy runs and returns the same structure, and for
    a model that draws random numbers (its outputs change with the seed).
    """

    def __init__(self, model: Any, input_sets: Sequence[tuple[tuple, dict]], references: Sequence[Any],
                 chained: bool = False) -> None:
        self.outputs: list[list[torch.Tensor | None]] = []
        self.model_errors: list[list[float | None]] = []
        self.wide = _wide_dtype(model)
        if self.wide is None:
            return
        # a chain's sets share their state: each tensor is widened once, so the wide run writes and reads it too
        widened: dict[int, Any] = {}

        def widen(x: Any) -> Any:
            if not chained:
                return self._widen(x)
            if id(x) not in widened:
                widened[id(x)] = self._widen(x)
            return widened[id(x)]

        try:
            wide_model = copy.deepcopy(model).to(self.wide)
            with torch.no_grad():
                for i, ((a, kw), ref) in enumerate(zip(input_sets, references)):
                    a_w, kw_w = pytree.tree_map(widen, (a, kw))
                    with same_random_numbers(i):
                        out = _leaves(wide_model(*a_w, **kw_w))
                    ref_leaves = _leaves(ref)
                    if len(out) != len(ref_leaves):
                        self.outputs, self.model_errors = [], []
                        return
                    if i == 0 and self._draws_random_numbers(wide_model, a_w, kw_w, out):
                        log.info("no %s reference: the model draws random numbers, which differ by dtype", self.wide)
                        return
                    self.outputs.append([o if self._narrower(r) else None for o, r in zip(out, ref_leaves)])
                    self.model_errors.append([_rel_l2(r, o) if self._narrower(r) else None
                                              for o, r in zip(out, ref_leaves)])
        except Exception as exc:  # noqa: BLE001 - no wide reference: outputs are judged against the model alone
            log.info("no %s reference for the model: %s", self.wide, exc)
            self.outputs, self.model_errors = [], []

    @staticmethod
    def _draws_random_numbers(model: Any, args: tuple, kwargs: dict, out: list[Any]) -> bool:
        """Whether ``model`` gives other outputs from another random seed. A model drawing random numbers
        draws other ones in another dtype (fp64 takes more bits per number), so its wide run is no reference."""
        with same_random_numbers(-1):
            again = _leaves(model(*args, **kwargs))
        return any(not (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
                   for x, y in zip(out, again))

    @property
    def available(self) -> bool:
        return bool(self.outputs)

    def _narrower(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype in JUDGED_WIDER.get(self.wide, ())

    def _widen(self, x: Any) -> Any:
        return x.to(self.wide) if self._narrower(x) else x

    def rejudge(self, input_index: int, candidate: Any, errors: list[OutputError]) -> None:
        """Pass each failing output of ``candidate`` that is as accurate as the model against the wide run."""
        leaves = _leaves(candidate)
        name = _SHORT.get(self.wide, str(self.wide))
        for e in errors:
            if e.ok or e.index < 0 or e.index >= len(leaves):
                continue
            wide = self.outputs[input_index][e.index]
            own = self.model_errors[input_index][e.index]
            if wide is None or own is None or not isinstance(leaves[e.index], torch.Tensor):
                continue
            rel = _rel_l2(leaves[e.index], wide)
            e.fp32_rel_l2, e.model_fp32_rel_l2, e.wide = rel, own, name
            allowed = max(REL_L2_TOLERANCE.get(wide.dtype, 1e-5), FP32_MATCH_MARGIN * own)
            if rel <= allowed:
                e.ok, e.reason = True, ""
            else:
                e.reason += f"; against {name} {rel:.2e} > {FP32_MATCH_MARGIN:g} x the model's own {own:.2e}"


#: the output dtypes judged again against a run at each wide dtype
JUDGED_WIDER = {torch.float32: REDUCED_FLOATS, torch.float64: (torch.float32,)}
_SHORT = {torch.float32: "fp32", torch.float64: "fp64"}

#: an fp32 model whose fp64 copy would take more than this (half as many bytes of fp32 weights) gets no fp64 reference
WIDE_REFERENCE_MAX_BYTES = 2**30


def _wide_dtype(model: Any) -> torch.dtype | None:
    """fp32 for a model holding bf16/fp16 floats, fp64 for a small enough fp32 one, else None."""
    if not isinstance(model, torch.nn.Module):
        return None
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.dtype in REDUCED_FLOATS for t in tensors):
        return torch.float32
    if sum(t.numel() * t.element_size() for t in tensors) <= WIDE_REFERENCE_MAX_BYTES // 2:
        return torch.float64
    return None


def _rel_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    measured = finite_errors(reference, candidate)
    if measured is None:
        return math.inf
    _, diff_norm, ref_norm = measured
    return diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)


class Verifier:
    """Holds the reference outputs for a fixed set of inputs and checks candidates.

    The reference is computed once from ``reference_fn`` (the user's model) on
    the example inputs and ``n_random`` fresh random input sets, or on the
    caller's ``input_sets`` (``(args, kwargs)`` pairs) instead of random ones:
    inputs with structure no rule of :mod:`graphopt.fresh_inputs` captures (a
    decode step's KV cache and positions). ``sources`` and ``rules`` say which
    sets were used (:meth:`describe`). For a model
    that runs in bf16/fp16, an exact rewrite's reduced-precision outputs that
    miss their tolerance are judged again against an fp32 run of the model
    (:class:`Fp32Reference`, made on first need).
    """

    def __init__(
        self,
        reference_fn: Any,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
        gm: fx.GraphModule | None = None,
        n_random: int = 2,
        seed: int = 0,
        input_sets: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None = None,
    ) -> None:
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        leaves, self._spec = pytree.tree_flatten((self.args, self.kwargs))
        # the module's placeholders follow the flattened inputs, one per leaf
        specs = input_specs(gm, leaves)
        self.input_sets: list[tuple[tuple, dict]] = [(self.args, self.kwargs)]
        #: where each input set came from: "example", "rule-drawn" (fresh, by the graph's rules), "user-given"
        self.sources: list[str] = ["example"]
        #: the structural rule each rule-drawn input followed, by input name (see graphopt.fresh_inputs)
        self.rules: dict[str, str] = {}
        #: the caller's sets are an :class:`~graphopt.fresh_inputs.InputChain`: steps over shared state
        self.chained = isinstance(input_sets, InputChain)
        if input_sets is not None:  # the caller's own inputs replace the random ones
            self.input_sets += [(tuple(a), dict(kw or {})) for a, kw in input_sets]
            self.sources += ["user-given"] * (len(self.input_sets) - 1)
            n_random = 0
        elif n_random:
            self.rules = describe_rules(gm, specs)
        for k in range(n_random):
            fresh = random_inputs(specs, leaves, seed + 1 + k)
            a, kw = pytree.tree_unflatten(fresh, self._spec)
            self.input_sets.append((tuple(a), dict(kw)))
            self.sources.append("rule-drawn")
        # every run starts from the user's buffers and inputs (a forward may mutate them) and leaves them so
        self._state = TensorSnapshot(reference_fn, self.input_sets)
        with torch.no_grad():
            self.references = [self._run(reference_fn, a, kw, i) for i, (a, kw) in enumerate(self.input_sets)]
        self._reference_fn = reference_fn
        self._fp32: Fp32Reference | None = None

    def describe(self) -> dict[str, Any]:
        """Which input sets verification uses: ``{"sets": [source, ...], "rules": {input: rule}}`` (and
        ``"chained": True`` for an :class:`~graphopt.fresh_inputs.InputChain`)."""
        return {"sets": list(self.sources), "rules": dict(self.rules), **({"chained": True} if self.chained else {})}

    def fp32_reference(self) -> Fp32Reference:
        """The wider run of the model (fp32 for bf16/fp16, fp64 for fp32; empty where none), made once."""
        if self._fp32 is None:
            self._fp32 = Fp32Reference(self._reference_fn, self.input_sets, self.references, self.chained)
            self._state.restore()  # its fp32 runs share the float32 input tensors
        return self._fp32

    def check(self, candidate_fn: Any, budget: ErrorBudget | None = None) -> Numerics:
        per_input = []
        try:
            with torch.no_grad():
                for i, ((a, kw), ref) in enumerate(zip(self.input_sets, self.references)):
                    out = self._run(candidate_fn, a, kw, i)
                    errors = compare_outputs(ref, out, budget)
                    if budget is None and any(not e.ok and e.dtype in _JUDGED_NAMES for e in errors) \
                            and self.fp32_reference().available:
                        self.fp32_reference().rejudge(i, out, errors)
                    per_input.append(errors)
        except Exception as exc:  # a rewritten graph that does not even run
            return Numerics(ok=False, max_abs=math.inf, rel_l2=math.inf, inputs_checked=len(per_input),
                            reason=f"candidate failed to run: {type(exc).__name__}: {exc}".splitlines()[0][:300])
        finally:
            self._state.restore()  # a chain that stopped part way
        return summarize(per_input, budget)

    def _run(self, fn: Any, args: tuple, kwargs: dict, input_index: int) -> Any:
        """``fn(*args, **kwargs)`` from the input set's random seed, then the user's buffers and the input sets
        put back as they were (in a chain, after its last set only)."""
        try:
            with same_random_numbers(input_index):
                return fn(*args, **kwargs)
        finally:
            if not (self.chained and 0 < input_index < len(self.input_sets) - 1):
                self._state.restore()


_JUDGED_NAMES = {str(d) for d in REDUCED_FLOATS + (torch.float32,)}
