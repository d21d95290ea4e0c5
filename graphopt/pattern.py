"""Pattern / check / rewrite, and the one way to decline with a reason.

Every local rewrite in graphopt is a :class:`Rule` in three parts, as in
onnxscript's rewriter (``onnxscript/rewriter``):

- ``pattern(node)``: the structural match anchored at one node -- cheap, and
  ``None`` when the node is simply not this pattern (nothing to report);
- ``check(gm, match)``: whether the matched site may be rewritten; it returns
  ``None`` to accept or a **reason** (a string the report shows) to decline;
- ``rewrite(gm, match)``: the rewrite itself, only for accepted matches.

Code that walks a larger subgraph (an attention site, a tensor-parallel
region) declines from deep inside the walk by raising :class:`Decline`;
:func:`attempt` turns that into a value. Whatever the route, what reaches the
report is a :class:`Declined` record (site, reason): one way to say no.

Example::

    class DropIdentityMul(Rule):
        name = "mul_by_one"

        def pattern(self, node):        # x * 1 -> x
            return node if node.target == aten.mul.Tensor and node.args[1] == 1 else None

        def check(self, gm, node):
            return None if node.args[0].meta["val"].dtype == node.meta["val"].dtype else "changes the dtype"

        def rewrite(self, gm, node):
            node.replace_all_uses_with(node.args[0])
            return [node.args[0]]

    outcome = apply_rules(gm, [DropIdentityMul()])
    outcome.declined   # [Declined(site='mul_3', reason='changes the dtype'), ...]
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch.fx as fx

__all__ = ["Decline", "Declined", "Rule", "RulesOutcome", "apply_rules", "attempt", "declined_from"]

M = TypeVar("M")
T = TypeVar("T")


@dataclass
class Declined:
    """A site a pass looked at and left alone, with the reason the report shows."""

    site: str  # node name or a short description of the site
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Decline(Exception):
    """Raised inside a check or a walk to decline the site being examined.

    ``raise Decline("softmax over the sharded dim")``; :func:`attempt` or
    :func:`apply_rules` catches it and keeps the reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def attempt(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | Decline:
    """``fn(*args, **kwargs)``, or the :class:`Decline` it raised (returned, not raised)."""
    try:
        return fn(*args, **kwargs)
    except Decline as decline:
        return decline


def declined_from(site: str, outcome: Any) -> Declined | None:
    """A :class:`Declined` record when ``outcome`` is a decline, else None.

    Accepts a :class:`Decline`, a reason string, or anything with a truthy
    ``declined`` attribute holding the reason (a site object).
    """
    if isinstance(outcome, Decline):
        return Declined(site, outcome.reason)
    if isinstance(outcome, str):
        return Declined(site, outcome)
    reason = getattr(outcome, "declined", None)
    if isinstance(reason, str) and reason:
        return Declined(site, reason)
    return None


class Rule(abc.ABC, Generic[M]):
    """One local rewrite: ``pattern`` -> ``check`` -> ``rewrite`` (see the module docstring)."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def pattern(self, node: fx.Node) -> M | None:
        """The match anchored at ``node``, or None when ``node`` is not this pattern."""

    def check(self, gm: fx.GraphModule, match: M) -> str | None:
        """None to accept ``match``; a reason (shown in the report) to decline it."""
        return None

    @abc.abstractmethod
    def rewrite(self, gm: fx.GraphModule, match: M) -> Sequence[fx.Node] | None:
        """Rewrite an accepted match; returns the nodes it created or rewired (for the report)."""

    def site_name(self, match: M) -> str:
        """How the report names a match (its anchor node's name by default)."""
        anchor = match if isinstance(match, fx.Node) else getattr(match, "anchor", None)
        return anchor.name if isinstance(anchor, fx.Node) else str(match)


@dataclass
class RulesOutcome:
    """What :func:`apply_rules` did: rewritten sites, nodes involved, declines with reasons."""

    applied: list[str] = field(default_factory=list)
    nodes_involved: list[str] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.applied)


def apply_rules(gm: fx.GraphModule, rules: Iterable[Rule[Any]]) -> RulesOutcome:
    """Try each rule at each node (graph order, one sweep); rewrite what its check accepts.

    A ``check`` that returns a reason or a ``check``/``rewrite`` that raises
    :class:`Decline` leaves the site alone and records the reason.
    """
    outcome = RulesOutcome()
    rules = list(rules)
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):  # erased by an earlier rewrite in this sweep
            continue
        for rule in rules:
            match = rule.pattern(node)
            if match is None:
                continue
            site = rule.site_name(match)
            try:
                reason = rule.check(gm, match)
                if reason is None:
                    touched = rule.rewrite(gm, match) or ()
            except Decline as decline:
                reason = decline.reason
            if reason is not None:
                outcome.declined.append(Declined(site, reason))
                continue
            outcome.applied.append(site)
            outcome.nodes_involved.extend(n.name for n in touched)
            break
    return outcome
