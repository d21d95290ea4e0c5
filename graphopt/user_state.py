"""Leave the user's model, inputs and global RNG state as they were (issue 21 item 4).

A forward may mutate state (``self.steps += 1`` on a buffer, ``x.mul_(2)`` on
its input). graphopt runs the model and its captured graph many times (the
verification references, every check, profiling, the ONNX check); each run
must start from the user's state and none may leave a trace.

- :class:`TensorSnapshot` copies a model's buffers and the input tensors once
  and, after a run, puts back exactly those that changed (by the tensor's
  version counter, or a module attribute reassigned to a new tensor).
  Parameters are not copied (that would double the model's memory); one that
  a run changes in place is logged as a warning.
- :func:`preserved_user_state` wraps a public entry point: the snapshot plus
  torch's global RNG state (CPU, and CUDA when initialised), restored on exit.

The captured graph still contains the mutation as the model does it; only
graphopt's own runs are undone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger(__name__)


class TensorSnapshot:
    """Copies of a model's buffers and of the tensors in ``inputs``, restorable after any number of runs."""

    def __init__(self, model: Any = None, inputs: Any = ()) -> None:
        self._buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self._saved: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._params: list[tuple[str, torch.Tensor, int]] = []
        seen: set[int] = set()
        if isinstance(model, torch.nn.Module):
            for module in model.modules():
                for name, buf in module._buffers.items():
                    if isinstance(buf, torch.Tensor):
                        self._buffers.append((module, name, buf))
                        self._keep(buf, seen)
            self._params = [(n, p, p._version) for n, p in model.named_parameters()]
        for leaf in pytree.tree_leaves(inputs):
            if isinstance(leaf, torch.Tensor):
                self._keep(leaf, seen)

    def _keep(self, t: torch.Tensor, seen: set[int]) -> None:
        if id(t) in seen or t.device.type == "meta" or isinstance(t, FakeTensor):
            return
        seen.add(id(t))
        self._saved.append((t, t.detach().clone(), t._version))

    def restore(self) -> int:
        """Put back every buffer and input tensor a run changed; return how many were."""
        changed = 0
        for module, name, buf in self._buffers:
            if module._buffers.get(name) is not buf:
                module._buffers[name] = buf
                changed += 1
        with torch.no_grad():
            for k, (t, copy, version) in enumerate(self._saved):
                if t._version != version:
                    t.copy_(copy)
                    self._saved[k] = (t, copy, t._version)
                    changed += 1
        for name, p, version in self._params:
            if p._version != version:
                log.warning("parameter %s was changed in place by the model's forward; graphopt cannot "
                            "restore parameters (it keeps no copy of them)", name)
        return changed


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's global RNG state (CPU, and CUDA when initialised) on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_user_state(model: Any = None, inputs: Any = ()) -> Iterator[TensorSnapshot]:
    """Run a block that may run ``model`` on ``inputs``; its buffers, the inputs and the RNG are as before after.

    >>> m = torch.nn.BatchNorm1d(2).train(); x = torch.randn(4, 2)
    >>> with preserved_user_state(m, (x,)):
    ...     _ = m(x)
    >>> int(m.num_batches_tracked)
    0
    """
    snapshot = TensorSnapshot(model, inputs)
    with preserved_rng():
        try:
            yield snapshot
        finally:
            snapshot.restore()


def preserves_user_state(fn: Any) -> Any:
    """Decorate a public entry point ``fn(model_or_result, example_inputs=None, example_kwargs=None, ...)``.

    Its first three parameters (by position) name the model (or a result
    holding one as ``.module``) and the inputs; they and the RNG are restored
    when ``fn`` returns or raises.
    """
    names = list(inspect.signature(fn).parameters)[:3]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = dict(zip(names, args))
        given.update({k: v for k, v in kwargs.items() if k in names})
        values = [given.get(n) for n in names]
        model = values[0] if isinstance(values[0], torch.nn.Module) else getattr(values[0], "module", None)
        with preserved_user_state(model, values[1:]):
            return fn(*args, **kwargs)

    return wrapper
