"""Analysis on real models: FLOPs against FlopCounterMode, FFN chains, repeated blocks, hot matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import graphopt
from graphopt.cost import annotate_costs
from graphopt.target import Roofline, TargetInfo
from graphopt.passes.analysis.sites.ffn import find_ffn_chains
from graphopt.passes.analysis.hot_matmuls import find_hot_matmuls
from graphopt.passes.analysis.repeated_blocks import find_repeated_blocks
from graphopt.specs import load_spec

TARGET = Roofline("test", "cpu", {"float32": 1e11}, 1e10, 1e-6)

MODELS = {
    "gpt2": ("hf:gpt2?n_layer=2&n_embd=64&n_head=4&vocab_size=512&seq=32", 2),
    "bert": ("hf:bert?num_hidden_layers=2&hidden_size=64&num_attention_heads=4&intermediate_size=128"
             "&vocab_size=512&seq=32", 2),
    "llama": ("hf:llama?num_hidden_layers=3&hidden_size=64&intermediate_size=176&num_attention_heads=4"
              "&num_key_value_heads=2&vocab_size=512&seq=32", 3),
    "nanogpt": ("examples:nanogpt?n_layer=3&n_embd=64&seq=32", 3),
    "cnn": ("examples:cnn?batch=2", 0),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    spec_text, layers = MODELS[request.param]
    spec = load_spec(spec_text)
    gm = graphopt.capture(spec.model, spec.args, spec.kwargs).module
    annotate_costs(gm, TARGET)
    return request.param, spec, gm, layers


def test_flops_match_flop_counter_mode(model):
    name, spec, gm, _ = model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        spec.model(*spec.args, **spec.kwargs)
    expected = counter.get_total_flops()
    ours = sum(n.meta["cost"].flops for n in gm.graph.nodes if n.meta["cost"].is_matmul_class)
    assert expected > 0
    assert abs(ours - expected) / expected < 0.01, (name, ours, expected)


def test_ffn_chains_one_per_layer(model):
    name, _, gm, layers = model
    chains = [c for c in find_ffn_chains(gm) if c.reported]
    assert len(chains) == layers, [c.to_dict() for c in chains]
    for chain in chains:
        assert chain.up in chain.nodes and chain.down in chain.nodes
        assert chain.activation and all(a in chain.nodes for a in chain.activation)
        assert (chain.d_model, chain.d_hidden) == (64, {"gpt2": 256, "bert": 128, "llama": 176, "nanogpt": 256}[name])
        assert chain.gated == (name == "llama")
        if chain.gated:
            assert chain.gate.meta["nn_module_stack"] and "gate_proj" in graphopt.ir.module_path(chain.gate)
            assert "up_proj" in graphopt.ir.module_path(chain.up)
            assert "down_proj" in graphopt.ir.module_path(chain.down)


def test_repeated_blocks_are_the_layers(model):
    name, _, gm, layers = model
    blocks = find_repeated_blocks(gm)
    if layers == 0:
        assert blocks == []
        return
    assert len(blocks) == 1, [b.to_dict() for b in blocks]
    block = blocks[0]
    assert block.count == layers
    assert len({len(nodes) for nodes in block.nodes}) == 1
    expected_class = {"gpt2": "GPT2Block", "bert": "BertLayer", "llama": "LlamaDecoderLayer", "nanogpt": "Block"}
    assert block.module_class == expected_class[name]
    # instances are disjoint
    names = [n.name for nodes in block.nodes for n in nodes]
    assert len(names) == len(set(names))


def test_hot_matmuls_ranked_by_share(model):
    _, _, gm, _ = model
    hot = find_hot_matmuls(gm)
    assert hot
    times = [h.time_s for h in hot]
    assert times == sorted(times, reverse=True)
    assert 0 < sum(h.share for h in hot) <= 1.0 + 1e-9
    assert all(h.node in h.nodes for h in hot)
    linears = [h for h in hot if h.node.target is torch.ops.aten.linear.default]
    assert all(h.weight is not None and h.weight.op == "get_attr" for h in linears)


def test_analysis_passes_do_not_modify(model):
    from graphopt import passes
    from graphopt.pass_infra import OptimizeContext

    _, _, gm, _ = model
    before = gm.code
    ctx = OptimizeContext(target=TargetInfo(given=TARGET))
    for cls in (passes.CostAnnotation, passes.HotMatmuls, passes.FFNChains, passes.RepeatedBlocks):
        result = cls()(gm, ctx)
        assert cls.kind == "analysis"
        assert result.modified is False
    assert gm.code == before
    assert {passes.CostAnnotation, passes.HotMatmuls, passes.FFNChains, passes.RepeatedBlocks} <= set(ctx.analyses)
    assert ctx.analysis(passes.FFNChains, gm) is ctx.analyses[passes.FFNChains][1]  # known: not run again
