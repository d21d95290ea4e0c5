"""Real models through the default pipeline: capture, optimize, compare on fresh inputs.

GPT-2, BERT (with an attention mask) and Llama (GQA) from tiny transformers
configs, the nanoGPT-style model and the CIFAR CNN from
:mod:`graphopt.examples_models`. Outputs must match the user's model to
fp32 relative L2 <= 1e-5 on inputs the optimizer never saw, and the user's
model must be left exactly as it was.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from tests.conftest import MODEL_NAMES, build_cnn
from tests.support.helpers import FP32_REL_L2, aliasing, assert_outputs_close, assert_state_unchanged, call, op_targets, snapshot_state

FRESH_SEEDS = (11, 12, 13)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_optimized_model_matches_original_on_fresh_inputs(optimized, name):
    oc = optimized(name)
    report = oc.result.report
    assert report.capture_route, "the report names the capture route"
    assert not report.rolled_back, f"default pipeline rolled back on {name}: {[r.to_dict() for r in report.rolled_back]}"
    assert report.final_numerics is not None and report.final_numerics.ok, report.final_numerics
    assert any(r.status == "applied" for r in report.passes), f"no pass changed {name}:\n{report}"
    for seed in FRESH_SEEDS:
        args, kwargs = oc.case.fresh_inputs(seed)
        assert not torch.equal(args[0], oc.case.args[0]), "fresh inputs must differ from the example"
        reference = call(oc.case.model, args, kwargs)
        out = call(oc.result.module, args, kwargs)
        assert_outputs_close(reference, out, FP32_REL_L2)
        # no output shares memory with an input, a weight or another output unless it did before
        assert aliasing(out, (args, kwargs), oc.case.model, oc.result.module) <= \
            aliasing(reference, (args, kwargs), oc.case.model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_optimize_leaves_the_users_model_alone(optimized, name):
    oc = optimized(name)
    assert oc.result.module is not oc.case.model
    assert_state_unchanged(oc.case.model, oc.state_before)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_transformers_output_structure_is_preserved(optimized, name):
    oc = optimized(name)
    assert oc.case.model.config._attn_implementation == "eager"
    reference = call(oc.case.model, oc.case.args, oc.case.kwargs)
    out = call(oc.result.module, oc.case.args, oc.case.kwargs)
    assert type(out) is type(reference)  # e.g. CausalLMOutputWithCrossAttentions
    assert list(out.keys()) == list(reference.keys())


def test_bert_mask_changes_the_output(optimized):
    """The attention mask is a real input of the optimized BERT, not baked in."""
    oc = optimized("bert")
    args, kwargs = oc.case.fresh_inputs(5)
    assert int(kwargs["attention_mask"].sum()) < kwargs["attention_mask"].numel()
    masked = call(oc.result.module, args, kwargs).last_hidden_state
    unmasked = call(oc.result.module, args, {"attention_mask": torch.ones_like(kwargs["attention_mask"])})
    assert not torch.allclose(masked[0:1], masked[0:1] * 0)  # sanity: not all zeros
    assert not torch.allclose(masked[1], unmasked.last_hidden_state[1], atol=1e-4)


def test_llama_is_grouped_query_attention(llama):
    attn = llama.model.model.layers[0].self_attn
    assert llama.model.config.num_attention_heads == 4 and llama.model.config.num_key_value_heads == 2
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2


def test_cnn_conv_batchnorm_pairs_are_folded(optimized):
    oc = optimized("cnn")
    before = op_targets(oc.result.captured.module)
    after = op_targets(oc.result.module)
    assert before.count("aten.batch_norm") + before.count("aten._native_batch_norm_legit_no_training") == 2
    assert not [t for t in after if "batch_norm" in t], after
    assert after.count("aten.conv2d") == 2
    record = oc.result.report.record("fold_conv_bn")
    assert record.status == "applied" and len(record.nodes_involved) == 2, record.to_dict()
    assert record.numerics is not None and record.numerics.ok


def test_model_in_training_mode_is_optimized_for_inference_and_left_training():
    """A model handed over in train mode: BatchNorm must not update its running stats,
    the flags come back as they were, and the result computes the eval-mode function."""
    case = build_cnn()
    case.model.train()
    before = snapshot_state(case.model)
    result = graphopt.optimize(case.model, case.args)
    assert_state_unchanged(case.model, before)
    assert case.model.training and case.model.bn1.training
    args, _ = case.fresh_inputs(3)
    case.model.eval()
    try:
        reference = call(case.model, args)
    finally:
        case.model.train()
    assert_outputs_close(reference, call(result.module, args))
    assert not [t for t in op_targets(result.module) if "batch_norm" in t]
