"""Which FFN chains the chunked-FFN operator can take, and why not the others.

The blocked planner reads the chains of :func:`graphopt.passes.analysis.sites.ffn.find_ffn_chains`
that have the rewrite view (``x``, the ``LinearSite`` operands, ``removed``):
``linear_out(act(linear_in(x)))`` or ``linear_out(act(linear_gate(x)) * linear_in(x))``
with single-user intermediates. A chain the reach view alone found (e.g. one whose
intermediates are read outside it) is not a candidate: no
decline is reported for it.
"""

from __future__ import annotations

from graphopt.passes.analysis.sites.ffn import FFNChain
from graphopt.pattern import Decline

__all__ = ["check_blockable_ffn", "is_blockable_ffn_candidate"]


def is_blockable_ffn_candidate(chain: FFNChain) -> bool:
    """A chain the planner considers: the rewrite view found its linears and the nodes it removes."""
    return chain.x is not None and chain.lin_out is not None


def check_blockable_ffn(chain: FFNChain) -> FFNChain:
    """``chain``, or :class:`Decline` when the chunked FFN has no kernel for its activation."""
    if chain.declined is not None or chain.activation_name is None:
        raise Decline(chain.declined or f"FFN at {chain.name}: the activation is not one graphopt knows")
    return chain
