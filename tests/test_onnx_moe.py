"""Mixture-of-experts models to ONNX: the grouped matmul's translation, Mixtral and DeepSeek-V3 converted and
matched in onnxruntime, DeepSeek-V2's complex rotary refused with an error naming it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers.integrations.moe  # noqa: F401 (registers torch.ops.transformers.grouped_mm_fallback)

import graphopt
from graphopt.cli import main
from graphopt.commands import convert
from graphopt.errors import BadInput
from graphopt.onnx import NoOnnxForm
from graphopt.specs import load_spec
from tests.support.onnx_support import rel_l2, run_onnx, torch_leaves

_ROPE = "qk_rope_head_dim=8&qk_nope_head_dim=8&v_head_dim=16&kv_lora_rank=16&q_lora_rank=32"
_DEEPSEEK = ("num_hidden_layers=2&hidden_size=64&intermediate_size=128&moe_intermediate_size=32&num_attention_heads=4"
             f"&num_key_value_heads=4&n_routed_experts=4&n_shared_experts=1&num_experts_per_tok=2&n_group=2"
             f"&topk_group=1&first_k_dense_replace=1&vocab_size=128&{_ROPE}&seq=16")
MIXTRAL = ("hf:mixtral?num_hidden_layers=2&hidden_size=64&intermediate_size=128&num_attention_heads=4"
           "&num_key_value_heads=2&num_local_experts=4&num_experts_per_tok=2&vocab_size=128&seq=16")
DEEPSEEK_V3 = f"hf:deepseek_v3?{_DEEPSEEK}"
DEEPSEEK_V2 = f"hf:deepseek_v2?{_DEEPSEEK}"


class GroupedMM(torch.nn.Module):
    """One grouped matmul over fixed group ends: 4 experts, (10, 16) x (4, 16, 8)."""

    def __init__(self, op: str, offs: list[int]) -> None:
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.randn(4, 16, 8))
        self.register_buffer("offs", torch.tensor(offs, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "fallback":
            return torch.ops.transformers.grouped_mm_fallback(x, self.weight, self.offs)
        # aten._grouped_mm takes bf16 only: float32 in and out, bf16 between (onnxruntime feeds no bf16 inputs)
        return torch._grouped_mm(x.bfloat16(), self.weight.bfloat16(), offs=self.offs).float()


# an empty group (1) and, for grouped_mm_fallback, a row routed to no group (9: past offs[-1]), which it leaves zero
@pytest.mark.parametrize("op", ["fallback", "aten"])
def test_grouped_mm_translation_matches_torch_with_an_empty_group_and_an_unrouted_row(op, tmp_path):
    torch.manual_seed(0)
    # aten._grouped_mm leaves unrouted rows unwritten (garbage): there every row is routed
    module, x = GroupedMM(op, [3, 3, 7, 9] if op == "fallback" else [3, 3, 7, 10]).eval(), torch.randn(10, 16)
    path = tmp_path / "gmm.onnx"
    info = graphopt.export_onnx(module, path, (x,))
    assert info.numerics.ok and info.op_counts["MatMul"] == 4  # one per expert
    fresh = torch.randn(10, 16)
    with torch.no_grad():
        expected = module(fresh)
    (got,) = run_onnx(str(path), [fresh])
    routed = int(module.offs[-1])
    assert rel_l2(expected[:routed].numpy(), got[:routed]) <= (1e-6 if op == "fallback" else 1e-2)
    if op == "fallback":
        assert (got[9] == 0).all() and (expected[9] == 0).all()


@pytest.fixture
def no_viewer(monkeypatch):
    monkeypatch.setattr(convert, "write_graph_html", lambda result, path: "graph.html skipped in this test")


@pytest.mark.parametrize("spec", [MIXTRAL, DEEPSEEK_V3], ids=["mixtral", "deepseek_v3"])
def test_moe_models_convert_with_graphopts_rewrites_and_match_in_onnxruntime(spec, tmp_path, no_viewer):
    out = tmp_path / "out"
    assert main(["convert", spec, "-o", str(out), "--speed-runs", "1", "--dynamic", "batch,seq"]) == 0
    onnx_part = json.loads((out / "report.json").read_text())["extra"]["onnx"]
    assert onnx_part["numerics"]["ok"] and onnx_part["numerics"]["rel_l2"] <= 1e-4
    # the plain export timed against (it needs the translation too) and the KV-cache graph's decode
    assert onnx_part["speed"]["plain"]["runs"] == 1 and onnx_part["decode_speed"]["same_tokens"]
    assert onnx_part["rewrites"]["causal_attention_to_gqa"] == 2  # graphopt's rewrites reached the file
    original = load_spec(spec).model  # same seed: the same random weights
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        (expected,) = torch_leaves(original(ids))
    (got,) = run_onnx(str(out / "model.onnx"), [ids])
    assert rel_l2(expected, got) <= 1e-4


def test_deepseek_v2_complex_rotary_is_refused_naming_the_construct():
    spec = load_spec(DEEPSEEK_V2)
    result = graphopt.optimize(spec.model, spec.args)
    with pytest.raises(NoOnnxForm) as caught:
        graphopt.export_onnx(result, "never-written.onnx")
    message = str(caught.value)
    assert isinstance(caught.value, BadInput) and caught.value.exit_code == 2 and "\n" not in message
    assert caught.value.node == "view_as_complex"
    assert "aten.view_as_complex.default -> complex64, from modeling_deepseek_v2.py:" in message
    assert "original model does not export to ONNX either" in message
    with pytest.raises(Exception):  # what the message claims: plain torch.onnx.export of the eager model fails too
        torch.onnx.export(spec.model, spec.args, dynamo=True, verbose=False)
