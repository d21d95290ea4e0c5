"""graphopt.optimize refuses bad budgets and weightless models before any work (issue 21 item 2)."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import BadInput, OptionError
from graphopt.optimize import parse_bytes
from graphopt.verify import ErrorBudget


@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("inf"), True, "abc", "2XB", "-1", "nan", ""])
def test_a_bad_memory_budget_is_an_option_error(value):
    with pytest.raises(OptionError, match="memory_budget") as info:
        parse_bytes(value)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, size", [("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5k", 1536), (4096, 4096),
                                        ("1e3", 1000), (None, None)])
def test_good_memory_budgets_read_as_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("rel_l2, top1", [(-1.0, None), (float("nan"), None), (float("inf"), None),
                                          (1e-2, 1.5), (1e-2, -0.1)])
def test_a_bad_error_budget_is_an_option_error(rel_l2, top1):
    with pytest.raises(OptionError):
        ErrorBudget(rel_l2=rel_l2, top1=top1)


def test_optimize_checks_budgets_before_capturing(monkeypatch):
    import importlib

    opt = importlib.import_module("graphopt.optimize")  # the module (graphopt.optimize is also the function)

    def must_not_run(*a, **k):
        raise AssertionError("captured although the options were bad")

    monkeypatch.setattr(opt, "capture", must_not_run)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(OptionError, match="memory_budget"):
        graphopt.optimize(model, (torch.randn(2, 4),), memory_budget="lots")
    with pytest.raises(OptionError, match="error_budget"):
        graphopt.optimize(model, (torch.randn(2, 4),), error_budget=float("nan"))


def test_meta_weights_are_refused_with_what_to_do():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    with pytest.raises(BadInput, match="meta device.*load its weights"):
        graphopt.optimize(model, (torch.randn(2, 4, device="meta"),))


def test_an_error_budget_no_pass_spends_is_warned_about(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with caplog.at_level("WARNING", logger="graphopt.optimize"):
        graphopt.optimize(model, (torch.randn(2, 8),), error_budget=0.1)
    assert any("error_budget 0.1 is unused" in r.getMessage() and "precision=" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="graphopt.optimize"):  # spent by reduced precision: no warning
        graphopt.optimize(model, (torch.randn(2, 8),), error_budget=0.1, precision="bf16")
    assert not any("is unused" in r.getMessage() for r in caplog.records)
