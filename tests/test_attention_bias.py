"""Attention with a learned or computed additive bias fused into SDPA: T5, MPNet, DeBERTa-v2.

The bias (T5's and MPNet's relative-position buckets, DeBERTa's
content-to-position and position-to-content terms, computed from q and k)
and the padding mask become one float ``attn_mask``; every self-attention
site is fused and the outputs equal eager on fresh inputs with other padding
(relative L2 <= 1e-5). A bias shared by the batch stays (1, heads, T, S);
with the blocked pass asked for, a learned bias is left to it.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import attention_cases as C
import graphopt
from graphopt import ir
from graphopt.passes.analysis.sites import find_attention_sites
from graphopt.passes.attention import LEFT_FOR_BLOCKED, FuseAttention, sdpa_decline
from graphopt.passes.blocked import BlockedOperators

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, HEADS = 128, 16, 2, 4


def _eager(cfg):
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cfg


def t5():
    cfg = transformers.T5Config(num_layers=2, d_model=64, num_heads=HEADS, d_kv=16, d_ff=128, vocab_size=VOCAB,
                                decoder_start_token_id=0, use_cache=False)
    return transformers.T5Model(_eager(cfg)).eval()


def mpnet():
    cfg = transformers.MPNetConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=HEADS,
                                   intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.MPNetModel(_eager(cfg)).eval()


def deberta():
    cfg = transformers.DebertaV2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=HEADS,
                                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                                       relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=32,
                                       max_relative_positions=64)
    return transformers.DebertaV2Model(_eager(cfg)).eval()


def inputs(seed, padded_row, decoder=False):
    """Token ids and a padding mask whose row ``padded_row`` ends in padding (first token kept)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)}
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[padded_row, SEQ // 2 + seed % 4:] = 0
    kwargs["attention_mask"] = mask
    if decoder:
        kwargs["decoder_input_ids"] = torch.randint(0, VOCAB, (BATCH, SEQ // 2), generator=g)
    return kwargs


def _check_fused(model, n_sites, decoder=False):
    """Every softmax fused (the default pipeline), outputs equal eager on fresh padded inputs."""
    example = inputs(0, padded_row=1, decoder=decoder)
    result = graphopt.optimize(model, (), example)
    record = result.report.record("fuse_attention")
    assert record.status == "applied", (record.status, record.error, record.declined)
    assert record.declined == []
    gm = result.module
    assert len(C.sdpa_nodes(gm)) == n_sites and C.softmax_nodes(gm) == []
    fresh = inputs(5, padded_row=0, decoder=decoder)
    with torch.no_grad():
        ref, out = model(**fresh).last_hidden_state, gm(**fresh).last_hidden_state
    assert C.rel_l2(ref, out) <= 1e-5
    return result


def test_t5_encoder_and_decoder_attention_fused():
    model = t5()
    gm = graphopt.capture(model, (), inputs(0, 1, decoder=True)).module
    sites = find_attention_sites(gm)
    encoder = [s for s in sites if s.module.startswith("encoder.") and "SelfAttention" in s.module]
    assert len(encoder) == 2 and all(any(t.learned for t in s.mask_terms) for s in encoder)
    assert all(s.scale == 1.0 for s in sites)  # T5 does not scale q @ k^T
    assert [sdpa_decline(s) for s in sites] == [None] * 6
    result = _check_fused(model, n_sites=6, decoder=True)  # 2 encoder, 2 decoder self-, 2 cross-attention
    assert "6 attention sites" in result.report.record("fuse_attention").notes[0]
    # one mask per kind of attention, shared by its layers (not one (batch, heads, T, S) constant per layer)
    masks = [n.args[3] for n in C.sdpa_nodes(result.module)]
    assert len(set(masks)) == 3 and masks[0] is masks[1] and masks[2] is masks[4] and masks[3] is masks[5]


def test_mpnet_in_place_bias_and_padding_fused():
    """MPNet adds its relative-position bias in place (``scores += bias``): the write goes with the scores."""
    model = mpnet()
    result = _check_fused(model, n_sites=2)
    gm = result.module
    assert not any(n.target == torch.ops.aten.add_.Tensor and ir.shape_of(n) == (BATCH, HEADS, SEQ, SEQ)
                   for n in gm.graph.nodes), "the in-place add of the unfused scores is still there"
    assert not any(n.target == torch.ops.aten.matmul.default and ir.shape_of(n) == (BATCH, HEADS, SEQ, SEQ)
                   for n in gm.graph.nodes), "Q @ K^T is still computed"


def test_deberta_v2_disentangled_terms_fused():
    """c2p and p2c are gathered from q @ pos_k^T and k @ pos_q^T: computed terms of the float mask."""
    _check_fused(deberta(), n_sites=2)


def test_bias_shared_by_the_batch_is_not_expanded():
    """Without a padding mask MPNet's (1, heads, T, T) bias reaches sdpa as it is, not expanded to the batch."""
    model = mpnet()
    ids = inputs(0, 1)["input_ids"]
    result = graphopt.optimize(model, (ids,))
    masks = [n.args[3] for n in C.sdpa_nodes(result.module)]
    assert len(masks) == 2 and all(ir.shape_of(m) == (1, HEADS, SEQ, SEQ) for m in masks)
    fresh = inputs(3, 1)["input_ids"]
    with torch.no_grad():
        assert C.rel_l2(model(fresh).last_hidden_state, result.module(fresh).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("case", ["padded", "causal"])
def test_learned_bias_with_a_mask_is_one_float_mask(case):
    """scale * (q @ k^T) + bias, then a padding or causal mask: one float attn_mask, the scale kept apart."""
    torch.manual_seed(0)
    model = (C.LearnedBiasPadded() if case == "padded" else C.LearnedBiasCausal()).eval()
    extra = lambda seed: (C.padding_mask(seed=seed),) if case == "padded" else ()  # noqa: E731
    result = C.fuse(model, C.qkv() + extra(1))
    (node,) = C.sdpa_nodes(result.module)
    assert node.kwargs["scale"] == pytest.approx(C.SCALE) and node.args[5] is False
    assert ir.tensor_meta(node.args[3]).dtype == torch.float32
    fresh = C.qkv(seed=4) + extra(7)
    with torch.no_grad():
        assert C.rel_l2(model(*fresh), result.module(*fresh)) <= 1e-5


def test_learned_bias_left_to_the_blocked_pass_when_it_runs():
    torch.manual_seed(0)
    model = C.LearnedBias().eval()
    (site,) = find_attention_sites(graphopt.capture(model, C.qkv()).module)
    assert sdpa_decline(site) is None and sdpa_decline(site, leave_learned=True) == LEFT_FOR_BLOCKED
    result = graphopt.optimize(model, C.qkv(), passes=[FuseAttention(), BlockedOperators()], block_q=8,
                               block_kv=8)
    assert [d.reason for d in result.report.record("fuse_attention").declined] == [LEFT_FOR_BLOCKED]
    assert result.report.record("blocked").status == "applied"
    assert C.sdpa_nodes(result.module) == []


def test_dead_in_place_write_is_removable_only_when_nothing_can_see_it():
    """``is_dead_private_write``: MPNet's ``scores += bias`` once the scores are dead, not a write others see."""
    from graphopt.opsets import is_dead_private_write

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, b = g.placeholder("x"), g.placeholder("b")
    private = g.call_function(aten.div.Tensor, (x, 2.0))
    dead = g.call_function(aten.add_.Tensor, (private, b))  # writes a fresh tensor nobody else reads
    returned = g.call_function(aten.mul.Tensor, (x, 3.0))
    seen = g.call_function(aten.add_.Tensor, (returned, b))  # the output reads what it wrote
    view = g.call_function(aten.view.default, (x, [-1]))
    into_input = g.call_function(aten.add_.Tensor, (view, 1.0))  # writes the input through a view
    g.output(returned)
    assert is_dead_private_write(dead)
    assert not is_dead_private_write(seen) and not is_dead_private_write(into_input)
