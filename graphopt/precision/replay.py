"""Re-run a graph with one node's value replaced, computing only what depends on that node.

The error search measures each candidate node's whole-model error alone (one
model run per node). Everything upstream of the node, and every branch that
does not depend on it, is the same as in the fp32 run, so :class:`SuffixReplay`
runs the graph once with ``torch.fx.Interpreter`` keeping every value, then
for each node evaluates only the nodes downstream of it, in graph order, on
those recorded values. On average that is half a forward per candidate instead
of a graph copy, a recompile and a whole forward.

We keep our own loop rather than subclassing ``fx.Interpreter`` for the
replay because the Interpreter always walks every node from the placeholders.

It keeps every value of one forward: :func:`recorded_bytes` says how much,
so a caller can decline large graphs; and it cannot replay graphs that write
into a value in place (:func:`writes_in_place`). The precision pass rebuilds
and runs the whole graph per candidate in both cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphopt import ir


def writes_in_place(gm: fx.GraphModule) -> list[str]:
    """Nodes of ``gm`` that write into another node's value in place (``add_``, ``copy_``, ...; see
    :func:`graphopt.ir.writer_of`).

    A replay cannot run such a graph: the write would change a recorded value
    that later replays read (and the recording holds the value after the
    write, not before it).
    """
    writers = (ir.writer_of(node) for node in gm.graph.nodes)
    return sorted({w.name for w in writers if w is not None})


def recorded_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every tensor value of ``gm`` (from ``meta['val']``): what a replay would keep."""
    total = 0
    for node in gm.graph.nodes:
        val = ir.tensor_meta(node)
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return total


class SuffixReplay:
    """One fp32 run of ``gm`` on ``flat_inputs``, replayable with one node replaced.

    >>> replay = SuffixReplay(gm, flat_inputs)                       # doctest: +SKIP
    >>> out = replay.run("linear_3", lambda args, kwargs: my_op(*args))  # doctest: +SKIP
    """

    def __init__(self, gm: fx.GraphModule, flat_inputs: Sequence[Any]) -> None:
        interpreter = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interpreter.run(*flat_inputs)
        self.gm = gm
        self.env: dict[fx.Node, Any] = interpreter.env
        self.nodes = list(gm.graph.nodes)
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self._by_name = {n.name: n for n in self.nodes}
        self.output = next(n for n in reversed(self.nodes) if n.op == "output")

    def downstream(self, node: fx.Node) -> list[fx.Node]:
        """``node`` and every node that depends on it, in graph order."""
        seen, stack = {node}, [node]
        while stack:
            for user in stack.pop().users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        return sorted(seen, key=self._index.__getitem__)

    def run(self, name: str, replacement: Callable[[tuple, dict], Any]) -> Any:
        """The graph's outputs with node ``name`` computed by ``replacement(args, kwargs)``.

        Arguments are the node's recorded inputs; nodes that do not depend on
        it keep their recorded values. Returns what ``gm(...)`` returns (the
        output structure of the captured model).
        """
        node = self._by_name[name]
        overlay: dict[fx.Node, Any] = {}

        def value(n: fx.Node) -> Any:
            return overlay[n] if n in overlay else self.env[n]

        order = self.downstream(node)
        if self.output not in order:
            order.append(self.output)
        with torch.no_grad():
            for n in order:
                args = fx.node.map_arg(n.args, value)
                kwargs = fx.node.map_arg(n.kwargs, value)
                if n is node:
                    overlay[n] = replacement(args, kwargs)
                elif n.op == "call_function":
                    overlay[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    overlay[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_module":
                    overlay[n] = self.gm.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "output":
                    return self.gm.graph._codegen.process_outputs(args[0])
                else:  # placeholders and get_attr never depend on another node
                    overlay[n] = self.env[n]
        raise AssertionError("graph without an output node")  # pragma: no cover
