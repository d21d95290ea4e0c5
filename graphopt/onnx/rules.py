"""onnxscript rewrite rules whose declines reach the report, run as onnx_ir passes.

graphopt's ONNX-side rewrites for onnxruntime are onnxscript rewriter rules
(``pattern / check / rewrite``, ``onnxscript/rewriter``). A :class:`CheckedRule`
writes its check as graphopt's :class:`~graphopt.pattern.Rule` does --
:meth:`CheckedRule.decline_reason` returns ``None`` to accept or a reason to
decline (or raises :class:`~graphopt.pattern.Decline`) -- and this module is
the one place that turns a reason into onnxscript's failed ``MatchResult`` and
into a :class:`~graphopt.pattern.Declined` record for the report.

A :class:`RulesPass` is an ``onnx_ir.passes.InPlacePass`` that applies its
rules with onnxscript's rewriter, counts the rewrites (``rewritten``) and
keeps the declines (``declined``, each site once).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from graphopt.pattern import Decline, Declined, attempt


class CheckedRule(pattern.RewriteRuleClassBase):
    """An onnxscript rewrite rule whose check returns a reason; declines go to ``self.declined``."""

    def __init__(self, name: str, declined: list[Declined] | None = None) -> None:
        super().__init__(name=name)
        self.declined: list[Declined] = declined if declined is not None else []

    def matches(self, context: Any, **bindings: Any) -> bool:
        """A structural condition the pattern cannot say; False: not this pattern (nothing to report)."""
        return True

    @abc.abstractmethod
    def decline_reason(self, context: Any, **bindings: Any) -> str | None:
        """None to accept the match; a reason (shown in the report) to decline it."""

    def check(self, context: Any, **bindings: Any) -> MatchResult:
        """onnxscript's check: the reason of :meth:`decline_reason`, recorded as a :class:`Declined`."""
        if not self.matches(context, **bindings):
            return MatchResult().fail(f"not the {self.name} pattern")
        outcome = attempt(self.decline_reason, context, **bindings)
        reason = outcome.reason if isinstance(outcome, Decline) else outcome
        if reason is None:
            return MatchResult()
        self.declined.append(Declined(self.site_name(context), reason))
        return MatchResult().fail(reason)

    def site_name(self, context: Any) -> str:
        """How the report names a site: the matched root node's name (its op type when unnamed)."""
        root = context.root
        return root.name or root.op_type

    def as_rule(self) -> pattern.RewriteRule:
        """This instance as the ``RewriteRule`` onnxscript's rewriter applies (``rule()`` makes a new instance)."""
        return pattern.RewriteRule(self.pattern, self.rewrite, self.check, name=self.name,
                                   remove_nodes=self.remove_nodes, graph_pre_visitor=self.setup,
                                   graph_post_visitor=self.cleanup, as_function=self.as_function)


class RulesPass(ir.passes.InPlacePass):
    """Apply :meth:`rules` with onnxscript's rewriter; ``rewritten`` counts the new ``counted_op`` nodes."""

    #: the report's name for this rewrite (a key of ``OnnxExport.rewrites``)
    name: ClassVar[str] = ""
    #: (domain, op_type) whose count grows by one per rewrite
    counted_op: ClassVar[tuple[str, str]] = ("", "")

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0
        self.declined: list[Declined] = []

    @abc.abstractmethod
    def rules(self) -> list[CheckedRule]:
        """The rules, created fresh for one run (their declines land in ``self.declined``)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = count_ops(model, *self.counted_op)
        found: list[Declined] = []
        rules = self.rules()
        for rule in rules:
            rule.declined = found
        rewriter.rewrite(model, pattern_rewrite_rules=[rule.as_rule() for rule in rules])
        self.rewritten = count_ops(model, *self.counted_op) - before
        # the rewriter may look at a site more than once; report each once
        self.declined = list({(d.site, d.reason): d for d in found}.values())
        return ir.passes.PassResult(model, modified=self.rewritten > 0)


def count_ops(model: ir.Model, domain: str, op_type: str) -> int:
    """How many ``domain.op_type`` nodes the model's graph (subgraphs included) holds."""
    return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph)
               if n.op_type == op_type and n.domain == domain)
