"""The attention analysis and rewrite on one minimal model per recognised form, and the near misses."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support import attention_cases as C
import graphopt
from graphopt.pass_infra import OptimizeContext
from graphopt.passes import attention as attention_pass
from graphopt.passes.analysis.sites import find_attention_sites
from graphopt.passes.attention import FuseAttention, sdpa_decline

aten = torch.ops.aten


def _sites(model, args):
    return find_attention_sites(graphopt.capture(model, args).module)


def _check_fused(model, args, fresh, **options):
    """Fuse, and check: one sdpa, no softmax left, pass applied, outputs equal on fresh inputs."""
    result = C.fuse(model, args, **options)
    record = result.report.record("fuse_attention")
    assert record.status == "applied", (record.status, record.declined, record.error)
    assert len(C.sdpa_nodes(result.module)) == 1
    assert C.softmax_nodes(result.module) == []
    with torch.no_grad():
        ref, out = model(*fresh), result.module(*fresh)
    tol = 1e-5 if ref.dtype == torch.float32 else 1e-2
    assert C.rel_l2(ref, out) <= tol
    return result, C.sdpa_nodes(result.module)[0]


def _sdpa_args(node):
    q, k, v, mask, dropout, is_causal = (list(node.args) + [None, 0.0, False])[:6]
    return dict(q=q, k=k, v=v, mask=mask, dropout=dropout, is_causal=is_causal, **node.kwargs)


PLAIN_FORMS = [
    (C.QKTranspose, "matmul"),
    (C.TorchMatmulDiv, "matmul"),
    (C.BmmFlat, "bmm"),
    (C.Baddbmm, "baddbmm"),
    (C.Einsum, "einsum"),
    (C.EinsumSeqFirst, "einsum"),
    (C.PrescaledQ, "matmul"),
    (C.PrescaledQK, "matmul"),
    (C.SqrtTensorScale, "matmul"),
    (C.Float32Softmax, "matmul"),
    (C.EvalDropout, "matmul"),
]


@pytest.mark.parametrize("cls,form", PLAIN_FORMS, ids=[c.__name__ for c, _ in PLAIN_FORMS])
def test_golden_ops_and_numerics_of_unmasked_forms(cls, form):
    model = cls().eval()
    args = C.qkv()
    (site,) = _sites(model, args)
    assert site.declined is None and site.layout_declined is None
    assert site.form == form
    assert site.scale == pytest.approx(C.SCALE, rel=1e-6)
    assert site.mask is None and not site.is_causal
    assert site.num_heads == C.H
    placeholders = {n.name for n in (site.q, site.k, site.v)}
    if form in ("matmul",) and cls not in (C.PrescaledQK,):
        # q, k, v resolve to the inputs themselves (transposes and pre-scales looked through)
        assert placeholders == {"q", "k", "v"}
    _, node = _check_fused(model, args, C.qkv(seed=7))
    a = _sdpa_args(node)
    assert a["mask"] is None and a["is_causal"] is False
    assert a["scale"] == pytest.approx(C.SCALE, rel=1e-6)


def test_bmm_on_flattened_heads_is_lifted_to_four_dims():
    model = C.BmmFlat().eval()
    (site,) = _sites(model, C.qkv())
    assert (site.q.name, site.k.name, site.v.name) == ("q", "k", "v")
    assert site.score_shape == (C.B, C.H, C.T, C.T)


def test_einsum_layout_is_permuted():
    (site,) = _sites(C.EinsumSeqFirst().eval(), C.qkv())
    assert site.q_perm == (0, 2, 1, 3) and site.v_perm == (0, 2, 1, 3) and site.out_perm == (0, 2, 1, 3)


def test_prescaled_q_moves_into_the_scale():
    result, node = _check_fused(C.PrescaledQ().eval(), C.qkv(), C.qkv(seed=3))
    assert _sdpa_args(node)["q"].op == "placeholder"
    assert not any(n.target == aten.mul.Tensor for n in result.module.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_float32_softmax_then_cast(dtype):
    for cls in (C.Float32Softmax, C.UpcastScores):
        model = cls().eval()
        args = C.qkv(dtype=dtype)
        (site,) = _sites(model, args)
        assert site.declined is None and site.layout_declined is None
        _, node = _check_fused(model, args, C.qkv(seed=5, dtype=dtype))
        assert node.meta["val"].dtype == dtype


def test_additive_input_mask():
    keep = C.padding_mask()
    mask = torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    model = C.AdditiveMask().eval()
    (site,) = _sites(model, (*C.qkv(), mask))
    assert site.mask.name == "mask" and site.mask_kind == "input" and not site.is_causal
    fresh_keep = C.padding_mask(seed=9)
    fresh = (*C.qkv(seed=2), torch.zeros(keep.shape).masked_fill(~fresh_keep, -1e9))
    _, node = _check_fused(model, (*C.qkv(), mask), fresh)
    assert _sdpa_args(node)["mask"].name == "mask"


@pytest.mark.parametrize("cls", [C.WhereBool, C.MaskedFillBool])
def test_boolean_input_mask_becomes_a_bool_attn_mask(cls):
    model = cls().eval()
    args = (*C.qkv(), C.padding_mask())
    (site,) = _sites(model, args)
    assert site.mask.name == "keep" and site.mask_kind == "input"
    term = site.mask_terms[0]
    assert term.kind == "fill" and term.fill == float("-inf")
    _, node = _check_fused(model, args, (*C.qkv(seed=4), C.padding_mask(seed=4)))
    mask = _sdpa_args(node)["mask"]
    assert mask.meta["val"].dtype == torch.bool


def test_masked_fill_with_a_finite_value_becomes_additive():
    model = C.MaskedFillFinite().eval()
    args = (*C.qkv(), C.padding_mask())
    _, node = _check_fused(model, args, (*C.qkv(seed=4), C.padding_mask(seed=4)))
    assert _sdpa_args(node)["mask"].meta["val"].dtype == torch.float32


def test_baddbmm_input_is_an_additive_mask():
    model = C.BaddbmmBias().eval()
    bias = torch.randn(C.B * C.H, C.T, C.T)
    (site,) = _sites(model, (*C.qkv(), bias))
    assert site.form == "baddbmm" and site.mask_terms[0].kind == "additive"
    _check_fused(model, (*C.qkv(), bias), (*C.qkv(seed=8), torch.randn(C.B * C.H, C.T, C.T)))


@pytest.mark.parametrize("cls", [C.TrilBuffer, C.TriuBuffer, C.InlineCausal])
def test_constant_causal_masks_become_is_causal(cls):
    model = cls().eval()
    (site,) = _sites(model, C.qkv())
    assert site.is_causal and site.mask_kind == "causal"
    result, node = _check_fused(model, C.qkv(), C.qkv(seed=6))
    a = _sdpa_args(node)
    assert a["is_causal"] is True and a["mask"] is None
    # the mask computation is gone
    left = {n.target for n in result.module.graph.nodes if n.op == "call_function"}
    assert not left & {aten.masked_fill.Scalar, aten.eq.Scalar, aten.where.ScalarOther, aten.tril.default}


def test_constant_non_causal_mask_is_kept():
    model = C.BandMask().eval()
    (site,) = _sites(model, C.qkv())
    assert not site.is_causal and site.mask_kind == "constant"
    _, node = _check_fused(model, C.qkv(), C.qkv(seed=6))
    assert _sdpa_args(node)["mask"] is not None and _sdpa_args(node)["is_causal"] is False


@pytest.mark.parametrize("cls", [C.RepeatKV, C.RepeatInterleave])
@pytest.mark.parametrize("mode", ["enable_gqa", "expand"])
def test_grouped_query_attention(cls, mode):
    model = cls().eval()
    args = C.qkv(kv_heads=2)
    (site,) = _sites(model, args)
    assert site.gqa and site.num_heads == 4 and site.num_kv_heads == 2
    assert (site.k.name, site.v.name) == ("k", "v")
    result, node = _check_fused(model, args, C.qkv(kv_heads=2, seed=3), attention_gqa=mode)
    a = _sdpa_args(node)
    if mode == "enable_gqa":
        assert a.get("enable_gqa") is True and a["k"].name == "k"
        assert not any(n.target in (aten.expand.default, aten.repeat_interleave.self_int)
                       for n in result.module.graph.nodes if n.op == "call_function")
    else:
        assert "enable_gqa" not in a and a["k"].name != "k"


def test_gqa_auto_uses_enable_gqa_on_cpu():
    _, node = _check_fused(C.RepeatKV().eval(), C.qkv(kv_heads=2), C.qkv(kv_heads=2, seed=3))
    assert node.kwargs.get("enable_gqa") is True and _sdpa_args(node)["k"].name == "k"


def test_gqa_auto_keeps_the_expand_on_cuda_with_a_mask():
    from graphopt.passes.attention import _use_enable_gqa

    model = C.RepeatKV().eval()
    (site,) = _sites(model, C.qkv(kv_heads=2))
    cuda = OptimizeContext(device=torch.device("cuda"))
    assert _use_enable_gqa(site, cuda)  # no mask: the flash kernel takes grouped heads
    site.mask_kind = "input"
    assert not _use_enable_gqa(site, cuda)  # a mask would send sdpa to its math kernel
    assert _use_enable_gqa(site, OptimizeContext(device=torch.device("cpu")))


DECLINED = [
    (C.SoftmaxOverQueries, "softmax over dim 2, not the key dim"),
    (C.ReturnsWeights, "output_attentions"),
    (C.LearnedTemperature, "multiplied by a tensor"),
    (C.ActiveDropout, "dropout on the attention weights is active"),
    (C.Classifier, "learned projection, not Q @ K^T"),
]


@pytest.mark.parametrize("cls,reason", DECLINED, ids=[c.__name__ for c, _ in DECLINED])
def test_near_misses_are_declined_with_their_reason(cls, reason):
    torch.manual_seed(0)
    model = cls().eval()
    (site,) = _sites(model, C.qkv())
    assert reason in sdpa_decline(site)
    result = graphopt.optimize(model, C.qkv(), passes=[FuseAttention()], verify=False)
    record = result.report.record("fuse_attention")
    assert record.status == "unchanged"
    assert [d.reason for d in record.declined] == [sdpa_decline(site)]
    assert record.declined[0].site.startswith(site.softmax.name)
    assert C.sdpa_nodes(result.module) == []


def test_one_site_for_both_consumers():
    """A learned bias: no consumer-wide decline; fuse_attention takes it (or leaves it when the blocked pass
    runs), the blocked planner takes the same site."""
    from graphopt.passes.analysis.blockable_sites import find_blockable_sites

    gm = graphopt.capture(C.LearnedBias().eval(), C.qkv()).module
    (site,) = find_attention_sites(gm)
    assert site.declined is None and site.mask_terms[0].learned
    assert sdpa_decline(site) is None
    assert sdpa_decline(site, leave_learned=True).startswith("scores biased by a learned tensor: left for blocked")
    blockable, declined = find_blockable_sites(gm, ("attention",))
    assert declined == [] and [s.softmax.name for s in blockable] == [site.softmax.name]
    assert [b.name for b in blockable[0].biases] == ["rel"]
    classifier = graphopt.capture(C.Classifier().eval(), C.qkv()).module
    assert find_blockable_sites(classifier, ("attention",)) == ([], [])  # not attention: no decline either


def test_pass_is_idempotent():
    model = C.TrilBuffer().eval()
    result = C.fuse(model, C.qkv())
    assert result.report.record("fuse_attention").status == "applied"
    ctx = OptimizeContext(flat_inputs=list(C.qkv()))
    second = FuseAttention()(result.module, ctx)
    assert second.modified is False and second.declined == []


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_no_sites_in_models_without_attention(name):
    from graphopt import examples_models

    model, args = examples_models.BUILDERS[name]()
    gm = graphopt.capture(model, args).module
    assert find_attention_sites(gm) == []
    result = FuseAttention()(gm, OptimizeContext(flat_inputs=list(args)))
    assert result.modified is False


def test_a_site_that_fails_verification_is_rolled_back_alone(monkeypatch):
    """Break the rewrite of one site: that site is rolled back and reported, the other fused."""

    class TwoSites(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = C.QKTranspose(), C.TorchMatmulDiv()

        def forward(self, q, k, v):
            return self.b(self.a(q, k, v), k, v)

    model = TwoSites().eval()
    sites = _sites(model, C.qkv())
    assert len(sites) == 2 and all(s.ok for s in sites)
    bad = sites[1].softmax.name
    real = attention_pass.rewrite_site

    def broken(gm, site, use_gqa, replaced=None):
        if site.softmax.name == bad:
            site.scale = site.scale * 2  # a wrong scale: numerics must catch it
        return real(gm, site, use_gqa, replaced)

    monkeypatch.setattr(attention_pass, "rewrite_site", broken)
    result = C.fuse(model, C.qkv())
    record = result.report.record("fuse_attention")
    assert record.status == "applied"
    assert len(C.sdpa_nodes(result.module)) == 1 and len(C.softmax_nodes(result.module)) == 1
    (declined,) = record.declined
    assert declined.site.startswith(bad) and "rolled back" in declined.reason and "rel_l2" in declined.reason
    with torch.no_grad():
        fresh = C.qkv(seed=11)
        assert C.rel_l2(model(*fresh), result.module(*fresh)) <= 1e-5


def test_site_records_scale_for_non_default_values():
    class OddScale(torch.nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1) * 0.3 / 2.0).softmax(-1) @ v

    (site,) = _sites(OddScale().eval(), C.qkv())
    assert site.scale == pytest.approx(0.15)
    _, node = _check_fused(OddScale().eval(), C.qkv(), C.qkv(seed=1))
    assert node.kwargs["scale"] == pytest.approx(0.15)
    assert not math.isclose(0.15, C.SCALE)


def test_subtracted_penalty_is_an_additive_mask_with_negative_coefficient():
    model = C.SubtractedPenalty().eval()
    args = (*C.qkv(), C.padding_mask().float())
    (site,) = _sites(model, args)
    assert site.ok and site.mask_terms[0].kind == "additive" and site.mask_terms[0].coefficient == -1.0
    _check_fused(model, args, (*C.qkv(seed=2), C.padding_mask(seed=2).float()))


def test_dynamic_sequence_length():
    """4-d sites fuse with a symbolic sequence length (the causal mask stays an explicit mask);
    flattened batch*heads sites are declined, since the rewrite would write static shapes."""
    seq = torch.export.Dim("seq", min=2, max=30)
    dyn = ({2: seq}, {2: seq}, {2: seq})
    result = C.fuse(C.TrilBuffer().eval(), C.qkv(), dynamic_shapes=dyn)
    assert result.report.record("fuse_attention").status == "applied"
    longer = C.qkv(t=24, seed=4)
    with torch.no_grad():
        assert C.rel_l2(C.TrilBuffer().eval()(*longer), result.module(*longer)) <= 1e-5
    (site,) = find_attention_sites(graphopt.capture(C.BmmFlat().eval(), C.qkv(), dynamic_shapes=dyn).module)
    assert "dynamic" in sdpa_decline(site)


def test_attention_fusion_can_be_switched_off():
    result = C.fuse(C.TrilBuffer().eval(), C.qkv(), attention_fusion="off")
    record = result.report.record("fuse_attention")
    assert record.status == "unchanged" and "switched off" in record.notes[0]
    assert C.sdpa_nodes(result.module) == [] and len(C.softmax_nodes(result.module)) == 1
