"""Dead-code elimination.

Rewrites:
    node whose value nobody uses (and that has no side effect) -> removed
    _assert_tensor_metadata(x) where nothing else reads x     -> removed (and x with it)
    dropout(x, p, train=False) whose value nobody uses         -> removed
    buffer registered by graphopt that no node references any more -> deleted

Declines: nodes with side effects (in-place ops, value asserts, random ops are
kept by ``Node.is_impure``); placeholders (they are the module's signature).

Uses torch.fx's ``Graph.eliminate_dead_code``, which knows which ops are impure,
through :func:`graphopt.opsets.erase_dead`, which also drops the metadata
asserts and inactive dropouts that only look impure (an assert on transformers'
folded T x T causal mask kept the constant in the module after attention fusion).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.opsets import erase_dead
from graphopt.pass_infra import OptimizeContext, Pass, PassResult


class DeadCodeElimination(Pass):
    name = "dead_code"
    summary = "remove nodes whose values nobody uses"

    def call(self, gm: fx.GraphModule, ctx: OptimizeContext) -> PassResult:
        removed = erase_dead(gm)
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        stale = [name for name, _ in gm.named_buffers(recurse=False)
                 if name.startswith("_graphopt_") and name not in used]
        for name in stale:
            delattr(gm, name)
        notes = [f"removed {removed} dead nodes"] if removed else []
        if stale:
            notes.append(f"deleted {len(stale)} unused constants")
        return PassResult(gm, bool(removed or stale), notes)
