"""The declared contracts between passes: typed options, analyses by class, report data, error kinds."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import passes
from graphopt.errors import BadInput, GraphoptError, OptionError, UnknownOptionError
from graphopt.pass_infra import (
    AnalysisPass,
    FunctionPass,
    OptimizeContext,
    Option,
    Pass,
    PassManager,
    PassResult,
    check_options,
)


def _model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), (torch.randn(2, 8),)


def _declared() -> list[tuple[type[Pass], str, Option]]:
    return [(cls, name, opt) for cls in passes.all_pass_classes() for name, opt in cls.options.items()]


def test_every_pass_option_is_declared_with_a_type():
    declared = _declared()
    assert {"attention_verify", "blocked_kinds", "precision", "merge_matmuls_policy",
            "constant_fold_max_bytes"} <= {name for _, name, _ in declared}
    for cls, name, opt in declared:
        assert isinstance(opt, Option), f"{cls.name}.{name} is not an Option"
        assert opt.type is not None and opt.description, f"{cls.name}.{name}"


@pytest.mark.parametrize("cls,name", [(cls, name) for cls, name, _ in _declared()],
                         ids=[f"{cls.name}.{name}" for cls, name, _ in _declared()])
def test_a_bad_value_of_any_pass_option_fails_the_same_way(cls, name):
    """Every declared option rejects a value of the wrong kind before the pipeline runs, with one error type
    whose message names the option, the value and what is allowed."""
    with pytest.raises(OptionError) as info:
        check_options([cls()], {name: "bogus"})
    msg = str(info.value)
    assert name in msg and "'bogus'" in msg, msg
    assert info.value.name == name and info.value.value == "bogus"
    assert isinstance(info.value, ValueError) and info.value.abort_pipeline


def test_declared_defaults_are_accepted():
    for cls, name, opt in _declared():
        check_options([cls()], {name: opt.default})


@pytest.mark.parametrize("option", [{"attention_verify": "bogus"}, {"blocked_kinds": "bogus"},
                                    {"precision": "int2"}, {"merge_matmuls_policy": "sometimes"}])
def test_optimize_rejects_a_bad_option_before_any_pass_runs(option):
    ran: list[str] = []
    spy = FunctionPass(lambda gm, ctx: ran.append("spy") or False, name="spy")
    pipeline = [spy] + [cls() for cls in passes.all_pass_classes() if set(option) & set(cls.options)]
    model, args = _model()
    with pytest.raises(OptionError, match=next(iter(option))) as info:
        graphopt.optimize(model, args, passes=pipeline, verify=False, **option)
    assert ran == []  # nothing ran: not logged and rolled back
    assert "allowed" in str(info.value) or "choose" in str(info.value)


def test_unknown_option_is_a_type_error_and_bad_input():
    with pytest.raises(UnknownOptionError) as info:
        check_options([passes.ConstantFolding()], {"constant_fold_max_byte": 1})
    assert isinstance(info.value, TypeError) and isinstance(info.value, BadInput)
    assert info.value.names == ["constant_fold_max_byte"]


def test_a_pass_called_directly_validates_its_own_options():
    model, args = _model()
    gm = graphopt.capture(model, args).module
    ctx = OptimizeContext(options={"attention_verify": "bogus"})
    with pytest.raises(OptionError, match="attention_verify"):
        passes.FuseAttention()(gm, ctx)


def test_option_types():
    assert Option("", bool).validate("b", True) is None
    assert Option("", int).validate("n", 4.0) is None
    with pytest.raises(OptionError, match="give True or False"):
        Option("", bool).validate("b", "maybe")
    with pytest.raises(OptionError, match="whole number"):
        Option("", int).validate("n", True)
    with pytest.raises(OptionError, match="odd"):
        Option("", int, check=lambda v: None if v % 2 else "give an odd number").validate("n", 2)


class _Counting(AnalysisPass["int"]):
    name = "counting"
    summary = "count nodes"
    runs = 0

    def analyze(self, gm, ctx):
        type(self).runs += 1
        return len(gm.graph.nodes)

    def describe(self, gm, result, ctx):
        return PassResult(gm, False, [f"{result} nodes"])


class _AddRelu(Pass):
    name = "add_relu"

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            relu = gm.graph.call_function(torch.ops.aten.relu.default, (out.args[0][0],))
        out.args = ((relu,),)
        return PassResult(gm, True)


def test_analysis_by_class_is_computed_once_per_module_and_forgotten_after_a_rewrite():
    model, args = _model()
    gm = graphopt.capture(model, args).module
    ctx = OptimizeContext()
    _Counting.runs = 0
    n = ctx.analysis(_Counting, gm)
    assert ctx.analysis(_Counting, gm) == n and _Counting.runs == 1
    out = PassManager([_Counting(), _AddRelu(), _Counting()]).run(gm, ctx)
    assert _Counting.runs == 2  # the first pass reused the known result; the rewrite made it stale
    assert ctx.analysis(_Counting, out) == n + 1
    assert [r.notes for r in ctx.report.passes if r.name == "counting"] == [[f"{n} nodes"], [f"{n + 1} nodes"]]


def test_report_data_is_written_by_the_infrastructure():
    class Reporting(Pass):
        name = "reporting"

        def call(self, gm, ctx):
            return PassResult(gm, False, report_data={"reporting": {"seen": len(gm.graph.nodes)}})

    model, args = _model()
    result = graphopt.optimize(model, args, passes=[Reporting()], verify=False)
    assert result.report.extra["reporting"]["seen"] > 0


def test_errors_carry_their_kind():
    from graphopt.commands.common import UsageError
    from graphopt.passes.blocked import BudgetError
    from graphopt.specs import SpecError

    for kind in (UsageError, SpecError, BudgetError, OptionError):
        assert issubclass(kind, BadInput) and issubclass(kind, GraphoptError)
        assert kind.exit_code == 2 and kind.abort_pipeline
