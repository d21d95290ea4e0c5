"""Capture a PyTorch model into graphopt's canonical IR.

The ladder, in order (DESIGN.md):

1. ``torch.export.export(strict=False)`` -- works for Hugging Face models;
2. ``torch.export.export(strict=True)`` -- TorchDynamo, for code non-strict
   tracing trips on;
3. ``torch.fx.symbolic_trace`` then ``torch.export`` of the traced module,
   so the result is lowered to the same ATen-level graph.

Whatever the route, the result is ``ExportedProgram.module()``: one canonical
ATen-level ``GraphModule`` (see :mod:`graphopt.ir`). When every route fails,
:class:`CaptureError` lists each attempt with the construct that stopped it
(the user's source line) and a hint.

The model is captured in eval mode (graphopt optimizes for inference); its
``training`` flags are restored afterwards, so the user's model is left as it
was.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from graphopt.errors import BadInput
from graphopt.user_state import preserves_user_state

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHOPT_DIR = os.path.dirname(__file__)


@dataclass
class CaptureAttempt:
    """One rung of the capture ladder and what stopped it."""

    route: str
    error_type: str
    message: str
    source: str = ""  # 'file:line: code' of the user construct, when found
    diagnostics: str = ""  # what torch printed while the route ran (partial graph, warnings)

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.route}: {self.error_type}{where}: {self.message}"


@dataclass
class Captured:
    """The canonical graph and what produced it."""

    module: fx.GraphModule
    exported_program: torch.export.ExportedProgram | None
    route: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attempts: list[CaptureAttempt] = field(default_factory=list)


class CaptureError(RuntimeError):
    """No capture route could turn the model into a graph.

    ``attempts`` lists each route tried and what stopped it.
    """

    def __init__(self, attempts: Sequence[CaptureAttempt], hint: str) -> None:
        self.attempts = list(attempts)
        self.hint = hint
        lines = ["could not capture the model into a graph; every route failed:"]
        lines += [f"  - {a}" for a in self.attempts]
        lines.append(f"hint: {hint}")
        super().__init__("\n".join(lines))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame in user code (outside torch and graphopt)."""
    best = ""
    tb_frames: list[traceback.FrameSummary] = []
    e: BaseException | None = exc
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb_frames += traceback.extract_tb(e.__traceback__)
        e = e.__cause__ or e.__context__
    for fr in tb_frames:
        fn = fr.filename or ""
        if fn.startswith(_TORCH_DIR) or fn.startswith(_GRAPHOPT_DIR) or "site-packages" in fn or "<" in fn:
            continue
        best = f"{os.path.basename(fn)}:{fr.lineno}: {(fr.line or '').strip()}"
    if not best:
        # strict export reports user code inside its message
        text = str(exc)
        for ln in text.splitlines():
            s = ln.strip()
            if s.startswith("File ") and "site-packages" not in s and _TORCH_DIR not in s:
                parts = s[5:].split(",")
                best = f"{os.path.basename(parts[0].strip(chr(34)))}:{parts[1].replace('line', '').strip()}"
    return best


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for ln in text.splitlines():
        if ln.strip():
            return ln.strip()[:300]
    return type(exc).__name__


_DATA_DEPENDENT_MARKERS = (
    "data-dependent",
    "data dependent",
    "symbolically traced variables cannot be used as inputs to control flow",
    "GuardOnDataDependentSymNode",
    "generic_jump",
    "Dynamic control flow",
)


#: a transformers KV cache in the output: ``DynamicCache``, ``StaticCache``, ``EncoderDecoderCache``, ...
_CACHE_OUTPUT = re.compile(r"\b(\w*Cache)\b[^\n]*(in output|at output)|(in output|at output)[^\n]*\b(\w*Cache)\b")


#: torch.export's message when a dynamic axis cannot hold: ``Constraints violated (seq)! ...``
_VIOLATED_AXES = re.compile(r"Constraints violated \(([^)]*)\)")


def _hint(attempts: Sequence[CaptureAttempt]) -> str:
    text = " ".join(a.message + a.error_type for a in attempts)
    cache = next((m.group(1) or m.group(4) for a in attempts if (m := _CACHE_OUTPUT.search(a.message))), None)
    if cache:
        return (f"the model returns a KV cache object ({cache}), which a graph cannot output; pass "
                "use_cache=False (as a forward argument, or in its config), or call graphopt.optimize "
                "without example inputs, which does that for transformers models")
    violated = next((m.group(1) for a in attempts if (m := _VIOLATED_AXES.search(a.message))), None)
    if violated:
        return (f"the model does not run at every size of the dynamic axis {violated} (it fixes the size or "
                f"excludes some); leave {violated} out of dynamic= (or dynamic_shapes) or give a range it allows, "
                "or call graphopt.optimize without example inputs or dynamic=, which keeps dynamic what torch can")
    if any(m.lower() in text.lower() for m in _DATA_DEPENDENT_MARKERS):
        src = next((a.source for a in attempts if a.source), "")
        where = f" ({src})" if src else ""
        return (
            f"the forward branches on a tensor's value{where}; a graph cannot follow it. "
            "Make the branch depend on shapes or Python values, or use torch.cond."
        )
    return _GENERIC_HINT


_GENERIC_HINT = ("check that the model runs eagerly on these example inputs; run with --debug (CLI) "
                 "or inspect .attempts for each route's full error")


#: torch loggers that narrate a failing capture route (partial graphs, guard warnings)
_NOISY_TORCH_LOGGERS = ("torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                        "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _torch_diagnostics_held(buffer: io.StringIO) -> Iterator[None]:
    """Hold back what torch writes while a route runs.

    A failing ``torch.export`` prints its partial graph straight to
    ``sys.stderr`` and logs guard warnings; a route that fails is expected
    here, so that output is kept in ``buffer`` (the caller attaches it to the
    attempt) instead of flooding the terminal before graphopt's one-line
    error. With graphopt's debug logging on, nothing is held back.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        if any(flags.values()):
            log.info("capturing in eval mode (graphopt optimizes for inference)")
        try:
            model.eval()
        except NotImplementedError:  # torch.export's unlifted modules (a loaded .pt2) refuse eval()
            for m in flags:
                m.training = False
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, strict: bool):
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)


@preserves_user_state
def capture(
    model: torch.nn.Module,
    args: Sequence[Any] | Any,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> Captured:
    """Capture ``model`` called as ``model(*args, **kwargs)`` into the canonical IR.

    Returns a :class:`Captured` whose ``module`` is an ATen-level GraphModule
    called exactly like ``model``. Raises :class:`CaptureError` when every
    route fails.

    >>> import torch, graphopt
    >>> cap = graphopt.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> cap.route
    'export(strict=False)'
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"capture expects a torch.nn.Module, got {type(model).__name__}; wrap functions in a Module")
    if not isinstance(args, (tuple, list)):
        args = (args,)
    args, kwargs = tuple(args), dict(kwargs or {})
    attempts: list[CaptureAttempt] = []
    routes = [
        ("export(strict=False)", lambda: _export(model, args, kwargs, dynamic_shapes, strict=False)),
        ("export(strict=True)", lambda: _export(model, args, kwargs, dynamic_shapes, strict=True)),
        ("symbolic_trace", lambda: _export(fx.symbolic_trace(model), args, kwargs, dynamic_shapes, strict=False)),
    ]
    with eval_mode(model), torch.no_grad():
        for route, run in routes:
            held = io.StringIO()
            try:
                with _torch_diagnostics_held(held):
                    ep = run()
            except Exception as exc:  # each route's failure is recorded, not raised
                attempt = CaptureAttempt(route, type(exc).__name__, _first_line(exc), _user_frame(exc),
                                         held.getvalue())
                log.info("capture route %s failed: %s", route, attempt)
                attempts.append(attempt)
                continue
            if held.getvalue():  # warnings of a route that worked are the user's to see
                sys.stderr.write(held.getvalue())
            gm = _unlifted(ep, model)
            log.info("captured with %s: %d nodes", route, len(gm.graph.nodes))
            return Captured(gm, ep, route, args, kwargs, attempts)
    hint = _hint(attempts)
    if hint == _GENERIC_HINT:
        hint = _eager_failure(model, args, kwargs) or hint
    raise CaptureError(attempts, hint)


def _unlifted(ep: torch.export.ExportedProgram, model: torch.nn.Module) -> fx.GraphModule:
    """``ep.module()``, which writes Python code naming every parameter: a name that is not an identifier
    (``add_module('"><svg', ...)``) breaks that code, so it is refused naming the attribute."""
    try:
        return ep.module()
    except SyntaxError as exc:
        odd = next((n for n, _ in [*model.named_modules(), *model.named_parameters(), *model.named_buffers()]
                    if n and not all(part.isidentifier() for part in n.split("."))), None)
        if odd is None:
            raise
        raise BadInput(f"the model has an attribute named {odd!r}, not a Python identifier; torch.export cannot "
                       "rebuild a graph that names it: rename it (letters, digits and _ only)") from exc


def _eager_failure(model: torch.nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Run the model once eagerly: when the user's own forward raises, that is the error to report."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # the user's code: reported, not raised
        where = _user_frame(exc)
        where = f" at {where}" if where else ""
        return (f"your model raised {type(exc).__name__}: {_first_line(exc)}{where} (run eagerly on the example "
                "inputs); fix the example inputs (shape, dtype, values) or the forward")
    return None
