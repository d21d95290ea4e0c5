"""Verification inputs that respect structure (issue 21 item 5).

Fresh random inputs follow the rule the graph gives each integer input
(embedding-bag offsets sorted from 0 and bounded by their indices, indices
inside their table); ``verify_inputs=`` gives the sets where no rule fits; the
report says which were used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.capture import capture
from graphopt.cli import main
from graphopt.errors import BadInput, VerifyInputsError
from graphopt.examples_models import dlrm
from graphopt.fresh_inputs import input_specs, random_inputs
from graphopt.specs import load_spec


def test_dlrm_optimizes_and_exports_to_onnx_with_default_verification(tmp_path):
    model, args = dlrm()
    result = graphopt.optimize(model, args)
    assert result.report.final_numerics.ok and result.report.final_numerics.inputs_checked == 3
    used = result.report.verification_inputs
    assert used["sets"] == ["example", "rule-drawn", "rule-drawn"]
    assert used["rules"]["offsets_0"].startswith("offsets of embedding_bag over input indices_0")
    assert used["rules"]["indices_2"].startswith("index in [0, 50)")
    assert "verification inputs: 1 example, 2 rule-drawn; rules: " in str(result.report)
    assert "**Verification inputs:** 1 example, 2 rule-drawn" in result.report.to_markdown()
    torch.testing.assert_close(result(*args), model(*args), rtol=1e-5, atol=1e-6)
    info = graphopt.export_onnx(result, tmp_path / "dlrm.onnx")
    assert info.numerics.ok and info.numerics.inputs_checked == 3


def test_examples_dlrm_spec_builds():
    spec = load_spec("examples:dlrm?n_tables=2&rows=20&batch=3")
    dense, indices, offsets = spec.args
    assert dense.shape == (3, 8) and len(indices) == len(offsets) == 2
    assert spec.model(*spec.args).shape == (3, 1)


class LastOffsetBag(nn.Module):
    """An EmbeddingBag with include_last_offset, its indices reshaped on the way in."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 4, mode="mean", include_last_offset=True)

    def forward(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return self.bag(ids.reshape(-1), starts)


def test_offsets_and_indices_follow_the_graph_not_the_names():
    ids, starts = torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.tensor([0, 2, 5, 6])  # 3 bags over 6 ids
    gm = capture(LastOffsetBag(), (ids, starts)).module
    specs = input_specs(gm, [ids, starts])
    assert [s.kind for s in specs] == ["index", "offsets"]
    assert specs[0].high == 30 and specs[1].of == 0 and specs[1].last
    for seed in range(20):
        new_ids, new_starts = random_inputs(specs, [ids, starts], seed)
        assert new_ids.shape == ids.shape and 0 <= int(new_ids.min()) and int(new_ids.max()) < 30
        assert new_starts[0] == 0 and new_starts[-1] == ids.numel() and new_starts.shape == starts.shape
        assert bool((new_starts[1:] > new_starts[:-1]).all())  # sorted, no bag empty (6 ids >= 3 bags)


def test_more_bags_than_indices_gives_sorted_offsets_with_empty_bags():
    model = nn.EmbeddingBag(10, 4)
    ids, starts = torch.tensor([1, 2]), torch.tensor([0, 1, 2, 2, 2])
    specs = input_specs(capture(model, (ids, starts)).module, [ids, starts])
    for seed in range(20):
        _, new_starts = random_inputs(specs, [ids, starts], seed)
        assert new_starts[0] == 0 and bool((new_starts[1:] >= new_starts[:-1]).all()) and int(new_starts[-1]) <= 2


def _like(args: tuple, seed: int) -> tuple:
    """Inputs of the example's sizes: new dense features, row ids and bag boundaries."""
    g = torch.Generator().manual_seed(seed)
    dense, indices, offsets = args
    new_offsets = [torch.cat([torch.zeros(1, dtype=torch.long),
                              (torch.randperm(len(i) - 1, generator=g)[: len(o) - 1] + 1).sort().values])
                   for i, o in zip(indices, offsets)]
    return (torch.randn(dense.shape, generator=g), [torch.randint(0, 50, i.shape, generator=g) for i in indices],
            new_offsets)


def test_verify_inputs_as_a_list_is_used_and_reported():
    model, args = dlrm()
    given = [(_like(args, seed), {}) for seed in range(3)]
    result = graphopt.optimize(model, args, verify_inputs=given)
    verifier = result.context.verifier
    assert result.report.verification_inputs == {"sets": ["example"] + ["user-given"] * 3, "rules": {}}
    assert verifier.input_sets[1][0][0] is given[0][0][0]
    assert result.report.final_numerics.inputs_checked == 4 and result.report.final_numerics.ok


def test_verify_inputs_as_a_callable_is_called_once_per_seed():
    model, args = dlrm()
    seeds = []

    def draw(seed: int):
        seeds.append(seed)
        return _like(args, seed), {}

    result = graphopt.optimize(model, args, verify_inputs=draw, n_random_inputs=3)
    assert seeds == [1, 2, 3]
    assert result.report.verification_inputs["sets"] == ["example"] + ["user-given"] * 3
    assert result.report.final_numerics.ok


def _raises(seed: int):
    raise RuntimeError("no data for this seed\nsecond line")


@pytest.mark.parametrize("value, says", [
    (42, "verify_inputs is a int; pass a list of (args, kwargs) pairs"),
    ([(torch.randn(2, 8),)], "verify_inputs[0] is a tuple, not an (args, kwargs) pair"),
    ([((torch.randn(2, 8),), {})], "verify_inputs[0] is not structured like the example inputs"),
    (lambda seed: ((torch.randn(4, 8), [torch.zeros(3)] * 3, [torch.zeros(4, dtype=torch.long)] * 3), {}),
     "verify_inputs(1): input leaf 1 is torch.float32 where the example has a torch.int64 tensor"),
    (_raises, "your verify_inputs callable raised RuntimeError: no data for this seed (called with seed 1)"),
    (lambda seed: ((torch.randn(5, 8), [torch.zeros(3, dtype=torch.long)] * 3,
                    [torch.zeros(4, dtype=torch.long)] * 3), {}),
     "verify_inputs(1): input dense has shape (5, 8) where the model was captured with (4, 8); use the example's"),
])
def test_bad_verify_inputs_is_refused_in_one_line(value, says):
    model, args = dlrm()
    with pytest.raises(VerifyInputsError) as info:
        graphopt.optimize(model, args, verify_inputs=value)
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2
    assert str(info.value).startswith(says) and "\n" not in str(info.value)


def test_convert_examples_dlrm_writes_every_output_and_names_the_rules(tmp_path):
    out = tmp_path / "dlrm"
    assert main(["convert", "examples:dlrm?n_tables=2", "-o", str(out), "--no-speed"]) == 0
    assert {"model.onnx", "model.pt2", "report.md"} <= {p.name for p in out.iterdir()}
    assert "**Verification inputs:** 1 example, 2 rule-drawn; rules: indices_0: index in [0, 50)" in \
        (out / "report.md").read_text()


class Gathers(nn.Module):
    """Three index inputs, each bounded by the dimension it indexes (not by its example's values)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 5))

    def forward(self, rows: torch.Tensor, cols: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        a = self.table.index_select(0, rows)  # rows < 7
        b = self.table[:, cols]  # cols < 5
        return a.sum() + b.sum() + torch.gather(self.table, 1, pick).sum()  # pick < 5


def test_index_inputs_are_bounded_by_the_dimension_they_index():
    rows, cols, pick = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([[1], [2], [0], [3], [4], [2], [1]])
    gm = capture(Gathers(), (rows, cols, pick)).module
    specs = input_specs(gm, [rows, cols, pick])
    assert [(s.kind, s.low, s.high) for s in specs] == [("index", 0, 7), ("index", 0, 5), ("index", 0, 5)]
    assert all(s.rule.startswith("index in [0, ") for s in specs)
