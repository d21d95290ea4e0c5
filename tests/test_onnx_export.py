"""graphopt.export_onnx on real models: onnx.checker, onnxruntime vs torch, dynamic batch/seq axes."""

from __future__ import annotations

import os

import onnx
import pytest
import torch

import graphopt
import graphopt.examples_models
import graphopt.verify
from graphopt import onnx as graphopt_onnx
from graphopt.specs import load_spec
from tests.support.onnx_support import rel_l2, run_onnx, torch_leaves

MODELS = {
    "gpt2": ("hf:gpt2?n_layer=2&n_embd=64&n_head=4&seq=16&mask=1", "batch,seq"),
    "bert": ("hf:bert?num_hidden_layers=2&hidden_size=64&num_attention_heads=4&intermediate_size=128"
             "&seq=16&mask=1", "batch,seq"),
    "llama": ("hf:llama?num_hidden_layers=2&hidden_size=64&num_attention_heads=4&num_key_value_heads=2"
              "&intermediate_size=128&vocab_size=256&seq=16", "batch,seq"),
    "nanogpt": ("examples:nanogpt?n_layer=2&n_embd=64&seq=16", "batch,seq"),
    "cnn": ("examples:cnn?batch=2&width=8", "batch"),
}


def _fresh_inputs(example: list[torch.Tensor], batch: int, seq: int, seed: int = 7) -> list[torch.Tensor]:
    """Inputs like ``example`` at another batch size / sequence length, drawn independently of graphopt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in example:
        if x.dtype.is_floating_point:
            out.append(torch.randn((batch,) + tuple(x.shape[1:]), generator=g))
        elif int(x.max()) <= 1:  # attention mask: pad the end of the first row
            mask = torch.ones(batch, seq, dtype=x.dtype)
            mask[0, seq - 2:] = 0
            out.append(mask)
        else:
            out.append(torch.randint(0, int(x.max()) + 1, (batch, seq), generator=g))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_optimized_model_exports_and_matches_torch_at_other_shapes(name, tmp_path):
    spec_text, dynamic = MODELS[name]
    spec = load_spec(spec_text)
    args, kwargs = graphopt_onnx.widen_for_dynamic(spec.args, spec.kwargs, dynamic)
    result = graphopt.optimize(spec.model, args, kwargs,
                               dynamic_shapes=graphopt_onnx.dynamic_shapes_for(spec.model, args, kwargs, dynamic))
    path = tmp_path / "model.onnx"
    info = graphopt.export_onnx(result, path, dynamic=dynamic)

    onnx.checker.check_model(str(path), full_check=True)
    assert info.numerics is not None and info.numerics.ok, info.numerics
    assert info.numerics.rel_l2 <= 1e-4
    # the example, 2 fresh inputs of its spec, and one set at another batch/seq
    assert info.numerics.inputs_checked == 4
    assert info.checked_shapes[-1] != info.checked_shapes[0]
    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch", dims
        if "seq" in dynamic:
            assert dims[1] == "seq", dims
    assert "onnx" not in result.report.extra  # export_onnx returns the export; the caller records it
    graphopt.record_onnx_export(result.report, info)
    assert result.report.extra["onnx"]["numerics"]["ok"]

    # independently of graphopt's check: other shapes, compared with the user's original model
    example = [x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)]
    batch, seq = 3, 9
    fresh = _fresh_inputs(example, batch, seq)
    names = list(kwargs)
    with torch.no_grad():
        expected = torch_leaves(spec.model(*fresh[:len(args)], **dict(zip(names, fresh[len(args):]))))
    got = run_onnx(str(path), fresh)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        assert rel_l2(e, g) <= 1e-4


def test_plain_module_exports_with_its_example_inputs(tmp_path):
    model, args = graphopt.examples_models.mlp()
    info = graphopt.export_onnx(model, tmp_path / "mlp.onnx", args)
    assert info.numerics.ok and info.numerics.inputs_checked == 3
    assert info.files == [str(tmp_path / "mlp.onnx")]
    assert sorted(os.listdir(tmp_path)) == ["mlp.onnx"]  # no scratch left behind
    (got,) = run_onnx(str(tmp_path / "mlp.onnx"), list(args))
    assert rel_l2(model(*args).detach().numpy(), got) <= 1e-4


def test_dynamic_axes_on_a_statically_captured_result_say_how_to_fix_it(tmp_path):
    spec = load_spec("examples:nanogpt?n_layer=1&n_embd=32&seq=8&batch=2")
    result = graphopt.optimize(spec.model, spec.args)
    with pytest.raises(graphopt.OnnxExportError, match="dynamic_shapes_for"):
        graphopt.export_onnx(result, tmp_path / "m.onnx", dynamic="batch,seq")
    assert os.listdir(tmp_path) == []


def test_dynamic_axis_names_are_checked():
    with pytest.raises(ValueError, match="batch and/or seq"):
        graphopt_onnx.parse_dynamic("batch,time")
    assert graphopt_onnx.parse_dynamic("seq, batch") == ("seq", "batch")
    assert graphopt_onnx.parse_dynamic(None) == ()


def test_axes_of_input_follow_the_layout():
    assert graphopt_onnx.axes_of_input(torch.zeros(2, 5, dtype=torch.long), ("batch", "seq")) == {0: "batch", 1: "seq"}
    assert graphopt_onnx.axes_of_input(torch.zeros(2, 5, 8), ("batch", "seq")) == {0: "batch", 1: "seq"}
    assert graphopt_onnx.axes_of_input(torch.zeros(2, 3, 32, 32), ("batch", "seq")) == {0: "batch"}  # image
    assert graphopt_onnx.axes_of_input(torch.zeros(2, 64), ("seq",)) == {}  # (batch, features)


def test_size_one_axes_are_widened_for_export():
    ids = torch.tensor([[3, 4, 5]])
    (wide,), _ = graphopt_onnx.widen_for_dynamic((ids,), {}, "batch")
    assert wide.shape == (2, 3) and torch.equal(wide[1], ids[0])
    (same,), _ = graphopt_onnx.widen_for_dynamic((ids,), {}, None)
    assert same is ids


def test_a_seq_axis_no_input_has_is_refused():
    model, args = graphopt.examples_models.cnn(batch=2, width=4)
    with pytest.raises(ValueError, match="no input has a 'seq' axis"):
        graphopt_onnx.dynamic_shapes_for(model, args, {}, "batch,seq")


class HalfLinear(torch.nn.Module):
    """Computes in float16, returns float32: the check must use float16's tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.half()).float()


def test_reduced_precision_graphs_are_checked_at_their_compute_precision(tmp_path):
    torch.manual_seed(0)
    info = graphopt.export_onnx(HalfLinear().eval(), tmp_path / "half.onnx", (torch.randn(8, 64),))
    assert info.tolerance == {"float32": 1e-2}
    assert any("float16" in note for note in info.notes)
    assert info.numerics.ok


def test_int8_operator_from_the_precision_pass_exports_through_its_translation(tmp_path):
    model, args = graphopt.examples_models.mlp(batch=8)
    result = graphopt.optimize(model, args, precision="int8", error_budget=0.05)
    targets = {str(n.target) for n in result.module.graph.nodes if n.op == "call_function"}
    assert "graphopt.int8_linear.default" in targets
    info = graphopt.export_onnx(result, tmp_path / "int8.onnx")
    # int8_linear's ONNX translation, its dequantization folded into onnxruntime's integer GEMM
    assert info.op_counts.get("com.microsoft.MatMulIntegerToFloat", 0) == 2
    # checked against the original model, within the budget the precision pass held in torch
    assert info.numerics.ok and 1e-4 < info.numerics.rel_l2 <= 0.05
    assert info.tolerance == {"float32": 0.05}
    assert any("against the original model" in n for n in info.notes), info.notes
    assert info.checked_against == "the original model" and "onnxruntime vs the original model ok" in info.summary()
    assert graphopt_onnx.compute_precision(torch.export.export(result.module, args, strict=False)) == "int8"
    # and the translation is the same arithmetic as torch's int8 graph (two layers: no room to drift)
    fresh = torch.randn(*args[0].shape, generator=torch.Generator().manual_seed(3))
    (got,) = run_onnx(str(tmp_path / "int8.onnx"), [fresh])
    with torch.no_grad():
        assert rel_l2(result.module(fresh).numpy(), got) <= 1e-4


def test_a_precision_result_outside_its_budget_in_onnxruntime_is_refused(tmp_path):
    """The check holds onnxruntime to the optimize() call's error budget against the original model: a
    budget the graph cannot meet (set after the fact here) is a mismatch naming the original model, and
    nothing is written."""
    model, args = graphopt.examples_models.mlp(batch=8)
    result = graphopt.optimize(model, args, precision="int8", error_budget=0.05)
    result.context.error_budget = graphopt.verify.ErrorBudget(rel_l2=1e-6)
    with pytest.raises(graphopt_onnx.OnnxMismatchError, match="differ from the original model"):
        graphopt.export_onnx(result, tmp_path / "int8.onnx")
    assert not (tmp_path / "int8.onnx").exists()
    # a plain module computing in int8 has no budget: compared with its own graph, at int8's tolerance
    info = graphopt.export_onnx(result.module, tmp_path / "plain.onnx", args)
    assert info.tolerance == {"float32": 1e-2} and info.numerics.rel_l2 <= 1e-4
    assert any("against torch's graph" in n for n in info.notes), info.notes
    assert "onnxruntime vs torch ok" in info.summary()
