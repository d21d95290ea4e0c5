"""Attention fusion on real models: transformers GPT-2, BERT, Llama (GQA) with eager attention, and nanoGPT.

Each: one site per layer, each site's q/k/v/mask/scale/causality as the model
has them, every site rewritten by the default pipeline, outputs equal to the
original on fresh inputs (relative L2 <= 1e-5). The optimized GPT-2 saves as
.pt2 and exports to ONNX that runs in onnxruntime.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support import attention_cases as C
import graphopt
from graphopt import examples_models
from graphopt.passes.analysis.sites import find_attention_sites

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten

N_LAYERS, HIDDEN, HEADS, SEQ, VOCAB = 2, 64, 4, 16, 128
HEAD_DIM = HIDDEN // HEADS


def gpt2():
    cfg = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB,
                                  n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=N_LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                  intermediate_size=2 * HIDDEN, vocab_size=VOCAB, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                   num_key_value_heads=2, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                                   max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(seed, batch=1):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def bert_mask(seed, batch=2):
    keep = (torch.rand(batch, SEQ, generator=torch.Generator().manual_seed(seed)) < 0.75).long()
    keep[:, 0] = 1
    return keep


def _ancestors(node):
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _weights_upstream(node):
    return {str(n.target) for n in _ancestors(node) if n.op == "get_attr"}


def _split_index(node):
    """For GPT-2's fused c_attn: which third (0 q, 1 k, 2 v) a node comes from.

    Breadth-first, so the nearest split wins (earlier layers' splits are ancestors too)."""
    queue, seen = [node], set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "getitem" \
                and n.args[0].target == aten.split.Tensor:
            return n.args[1]
        queue.extend(n.all_input_nodes)
    return None


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _check_optimized(model, args, kwargs, fresh_args, fresh_kwargs):
    result = graphopt.optimize(model, args, kwargs)
    record = result.report.record("fuse_attention")
    assert record.status == "applied", (record.status, record.error, record.declined)
    assert record.declined == []
    gm = result.module
    assert len(C.sdpa_nodes(gm)) == N_LAYERS
    assert C.softmax_nodes(gm) == []
    with torch.no_grad():
        ref, out = _output(model(*fresh_args, **fresh_kwargs)), _output(gm(*fresh_args, **fresh_kwargs))
    assert C.rel_l2(ref, out) <= 1e-5
    return result


def test_gpt2_sites_and_fusion():
    model = gpt2()
    gm = graphopt.capture(model, (ids(0),)).module
    sites = find_attention_sites(gm)
    assert len(sites) == N_LAYERS
    for i, site in enumerate(sites):
        assert site.ok, site.declined
        assert site.module == f"transformer.h.{i}.attn"
        assert site.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
        assert site.is_causal and site.mask_kind == "causal"
        assert (site.num_heads, site.num_kv_heads) == (HEADS, HEADS)
        assert [_split_index(n) for n in (site.q, site.k, site.v)] == [0, 1, 2]
        assert all(f"transformer.h.{i}.attn.c_attn.weight" in _weights_upstream(n) for n in (site.q, site.k, site.v))
        assert ir_shape(site.q) == (1, HEADS, SEQ, HEAD_DIM)
    result = _check_optimized(model, (ids(0),), {}, (ids(1),), {})
    for node in C.sdpa_nodes(result.module):
        assert node.args[3] is None and node.args[5] is True  # no mask, is_causal


def ir_shape(node):
    return tuple(node.meta["val"].shape)


def test_bert_with_attention_mask():
    model = bert()
    args, kwargs = (ids(0, batch=2),), {"attention_mask": bert_mask(0)}
    gm = graphopt.capture(model, args, kwargs).module
    sites = find_attention_sites(gm)
    assert len(sites) == N_LAYERS
    mask_input = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "attention_mask")
    for i, site in enumerate(sites):
        assert site.ok, site.declined
        assert site.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
        assert not site.is_causal and site.mask_kind == "input"
        assert mask_input in _ancestors(site.mask)
        prefix = f"encoder.layer.{i}.attention.self."
        for node, proj in ((site.q, "query"), (site.k, "key"), (site.v, "value")):
            ws = _weights_upstream(node)
            assert prefix + proj + ".weight" in ws
            assert not ({prefix + p + ".weight" for p in ("query", "key", "value") if p != proj} & ws)
    _check_optimized(model, args, kwargs, (ids(1, batch=2),), {"attention_mask": bert_mask(1)})


def test_llama_grouped_query_attention():
    model = llama()
    gm = graphopt.capture(model, (ids(0),)).module
    sites = find_attention_sites(gm)
    assert len(sites) == N_LAYERS
    for i, site in enumerate(sites):
        assert site.ok, site.declined
        assert site.is_causal
        assert site.scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
        assert (site.num_heads, site.num_kv_heads) == (HEADS, 2) and site.gqa
        prefix = f"model.layers.{i}.self_attn."
        for node, proj in ((site.q, "q_proj"), (site.k, "k_proj"), (site.v, "v_proj")):
            ws = _weights_upstream(node)
            assert prefix + proj + ".weight" in ws
            assert not ({prefix + p + ".weight" for p in ("q_proj", "k_proj", "v_proj") if p != proj} & ws)
        assert ir_shape(site.k) == (1, 2, SEQ, HEAD_DIM)
    _check_optimized(model, (ids(0),), {}, (ids(1),), {})


def test_nanogpt():
    model, args = examples_models.nanogpt(n_layer=N_LAYERS, seq=SEQ)
    gm = graphopt.capture(model, args).module
    sites = find_attention_sites(gm)
    assert len(sites) == N_LAYERS
    for i, site in enumerate(sites):
        assert site.ok and site.is_causal and site.module == f"h.{i}.attn"
        assert site.scale == pytest.approx(1 / math.sqrt(model.config.n_embd // model.config.n_head))
        assert site.mask_terms[0].kind == "fill" and site.mask_terms[0].fill == float("-inf")
    fresh = (torch.randint(0, model.config.vocab_size, args[0].shape, generator=torch.Generator().manual_seed(5)),)
    _check_optimized(model, args, {}, fresh, {})


def test_gpt2_optimized_saves_as_pt2_and_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = gpt2()
    result = graphopt.optimize(model, (ids(0),))
    assert len(C.sdpa_nodes(result.module)) == N_LAYERS
    paths = result.save(tmp_path)
    loaded = graphopt.load(tmp_path)
    fresh = ids(3)
    with torch.no_grad():
        ref = model(fresh).logits
        assert C.rel_l2(ref, _output(loaded(fresh))) <= 1e-5
    onnx_program = torch.onnx.export(result.exported_program(), (ids(0),), dynamo=True)
    path = tmp_path / "gpt2.onnx"
    onnx_program.save(str(path))
    import onnx

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    assert C.rel_l2(ref, torch.from_numpy(out)) <= 1e-5
