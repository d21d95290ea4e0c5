"""merge_matmuls (horizontal fusion): golden ops, numerics, idempotence, declines."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import ir
from graphopt.examples_models import nanogpt
from graphopt.pass_infra import OptimizeContext
from graphopt.passes import default_pipeline
from graphopt.passes.merge_matmuls import MergeCandidate, MergeDecision, MergeMatmuls, MergeShape, measured_decision

aten = torch.ops.aten


def always(candidate: MergeCandidate) -> MergeDecision:
    return MergeDecision(True, "test: always")


def tiny_llama(layers: int = 2, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads,
                      intermediate_size=128, vocab_size=256, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, 256, (1, 8)),)


def count(gm, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def run_pass(model, args, pass_):
    cap = graphopt.capture(model, args)
    ctx = OptimizeContext(args=cap.args, kwargs=cap.kwargs, flat_inputs=ir.flat_inputs(cap.args, cap.kwargs, cap.module))
    gm = ir.copy_graph_module(cap.module)
    return cap.module, pass_(gm, ctx), ctx


def max_abs(a, b) -> float:
    la = a.logits if hasattr(a, "logits") else a
    lb = b.logits if hasattr(b, "logits") else b
    return float((la - lb).abs().max())


def test_golden_ops_llama_qkv_and_gate_up_merged():
    model, args = tiny_llama()
    before, result, ctx = run_pass(model, args, MergeMatmuls(decide=always))
    gm = result.module
    assert result.modified
    # per layer: q, k, v -> 1 and gate, up -> 1; lm_head and o_proj/down_proj stay
    assert count(before, aten.linear.default) == 2 * 7 + 1
    assert count(gm, aten.linear.default) == 2 * 4 + 1
    splits = [n for n in gm.graph.nodes if n.target == aten.split_with_sizes.default]
    assert sorted(tuple(n.args[1]) for n in splits) == [(64, 32, 32), (64, 32, 32), (128, 128), (128, 128)]
    assert all(all(u.target is operator.getitem for u in n.users) for n in splits)
    labels = [note for note in result.notes]
    assert any("self_attn.q_proj+k_proj+v_proj" in note for note in labels)
    assert any("mlp.gate_proj+up_proj" in note for note in labels)
    with torch.no_grad():
        assert max_abs(model(*args), gm(*args)) <= 1e-5


def test_numerics_on_fresh_inputs_and_user_weights_untouched():
    model, args = tiny_llama(layers=1)
    q = model.model.layers[0].self_attn.q_proj.weight
    q_before, q_ptr = q.detach().clone(), q.data_ptr()
    _, result, _ = run_pass(model, args, MergeMatmuls(decide=always))
    other = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_abs(model(other), result.module(other)) <= 1e-5
    assert q.data_ptr() == q_ptr and torch.equal(q.detach(), q_before)


def test_idempotent():
    model, args = tiny_llama(layers=1)
    _, first, ctx = run_pass(model, args, MergeMatmuls(decide=always))
    second = MergeMatmuls(decide=always)(ir.copy_graph_module(first.module), ctx)
    assert first.modified and not second.modified


def test_nanogpt_with_separate_qkv_linears():
    model, args = nanogpt(n_layer=2, n_embd=64, seq=8, split_qkv=True)
    before, result, _ = run_pass(model, args, MergeMatmuls(decide=always))
    # per layer: q, k, v, attn c_proj, mlp c_fc, mlp c_proj; q/k/v become one
    assert count(before, aten.linear.default) == 2 * 6 + 1
    assert count(result.module, aten.linear.default) == 2 * 4 + 1
    merged = [n for n in result.module.graph.nodes if n.target == aten.linear.default and "merged_from" in n.meta]
    assert [n.meta["merged_from"] for n in merged] == ["h.0.attn.q_proj+k_proj+v_proj", "h.1.attn.q_proj+k_proj+v_proj"]
    assert all(len(n.args) == 3 for n in merged)  # biases concatenated
    with torch.no_grad():
        assert float((model(*args) - result.module(*args)).abs().max()) <= 1e-5


def test_nanogpt_fused_c_attn_has_nothing_to_merge():
    model, args = nanogpt(n_layer=1, n_embd=64, seq=8)
    _, result, _ = run_pass(model, args, MergeMatmuls(decide=always))
    assert not result.modified


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_different_inputs_not_merged():
    model = TwoInputs().eval()
    _, result, _ = run_pass(model, (torch.randn(2, 16), torch.randn(2, 16)), MergeMatmuls(decide=always))
    assert not result.modified
    assert count(result.module, aten.linear.default) == 2


class SharedInputMixedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 24, bias=False)
        self.c = nn.Parameter(torch.randn(16, 12))  # x @ c: a matmul with a constant weight

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1).sum(-1) + (x @ self.c).sum(-1)


def test_mixed_bias_gets_zero_bias_and_numerics_hold():
    model = SharedInputMixedBias().eval()
    x = torch.randn(3, 5, 16)
    _, result, _ = run_pass(model, (x,), MergeMatmuls(decide=always))
    assert result.modified
    assert count(result.module, aten.linear.default) == 1
    with torch.no_grad():
        assert float((model(x) - result.module(x)).abs().max()) <= 1e-5


def test_measured_slower_is_declined_with_the_ratio():
    model, args = tiny_llama(layers=1)

    def slower(candidate: MergeCandidate) -> MergeDecision:
        return MergeDecision(False, "merged matmul measured slower: separate 10.0 us vs merged 20.0 us (0.50x)",
                             10e-6, 20e-6)

    _, result, _ = run_pass(model, args, MergeMatmuls(decide=slower))
    assert not result.modified
    assert len(result.declined) == 2
    assert all("0.50x" in d.reason for d in result.declined)
    assert {d.site for d in result.declined} == {"model.layers.0.self_attn.q_proj+k_proj+v_proj",
                                                 "model.layers.0.mlp.gate_proj+up_proj"}


def test_measured_decision_uses_the_micro_benchmark(monkeypatch):
    from graphopt.passes import merge_matmuls as mod

    shape = MergeShape(8, 64, (64, 32, 32), torch.float32, False, "cpu")
    candidate = MergeCandidate([], shape, torch.device("cpu"))
    monkeypatch.setattr(mod, "measure_merge", lambda s, timings=None: (30e-6, 20e-6))
    faster = measured_decision(candidate)
    monkeypatch.setattr(mod, "measure_merge", lambda s, timings=None: (20e-6, 40e-6))
    slower = measured_decision(candidate)
    assert faster.merge and faster.speedup == pytest.approx(1.5)
    assert not slower.merge and "0.50x" in slower.reason and "measured slower" in slower.reason


def test_measure_merge_times_both_and_caches():
    from graphopt.passes.merge_matmuls import measure_merge
    from graphopt.target import TimingCache

    shape = MergeShape(4, 32, (32, 16), torch.float32, True, "cpu")
    timings = TimingCache()
    sep, merged = measure_merge(shape, rounds=2, budget_seconds=0.05, timings=timings)
    assert sep > 0 and merged > 0
    assert measure_merge(shape, timings=timings) == (sep, merged)  # cached per shape, in the cache given
    assert any(k[0] == shape for k in timings.keys())


def test_policy_option_off_and_default_pipeline_order():
    model, args = tiny_llama(layers=1)
    result = graphopt.optimize(model, args, passes=[MergeMatmuls()], merge_matmuls_policy="off")
    assert result.report.record("merge_matmuls").status == "unchanged"
    names = [p.name for p in default_pipeline()]
    assert names.index("merge_matmuls") > names.index("dead_code")


def test_optimize_verifies_the_merge():
    model, args = tiny_llama(layers=1)
    result = graphopt.optimize(model, args, passes=[MergeMatmuls()], merge_matmuls_policy="always")
    record = result.report.record("merge_matmuls")
    assert record.status == "applied" and record.numerics is not None and record.numerics.ok
    assert result.report.final_numerics.ok


def test_gain_below_the_margin_is_declined_with_both_timings(monkeypatch):
    from graphopt.passes import merge_matmuls as mod

    shape = MergeShape(8, 64, (64, 32, 32), torch.float32, False, "cpu")
    candidate = MergeCandidate([], shape, torch.device("cpu"))
    monkeypatch.setattr(mod, "measure_merge", lambda s, timings=None: (50.5e-6, 50.0e-6))  # 1.01x
    noise = measured_decision(candidate)
    assert not noise.merge
    assert "merged 50.0 us vs separate 50.5 us" in noise.reason and "1.01x < 1.05x" in noise.reason
    monkeypatch.setattr(mod, "measure_merge", lambda s, timings=None: (60e-6, 50e-6))  # 1.2x
    clear = measured_decision(candidate)
    assert clear.merge and "merged 50.0 us vs separate 60.0 us" in clear.reason and "1.20x >= 1.05x" in clear.reason
    assert measured_decision(candidate, min_speedup=1.25).merge is False  # the margin is the caller's


def test_min_speedup_option_reaches_the_decision_and_the_report(monkeypatch):
    from graphopt.passes import merge_matmuls as mod

    monkeypatch.setattr(mod, "measure_merge", lambda s, timings=None: (50.5e-6, 50.0e-6))  # 1.01x
    model, args = tiny_llama(layers=1)
    default = graphopt.optimize(model, args, passes=[MergeMatmuls()])
    record = default.report.record("merge_matmuls")
    assert record.status == "unchanged" and all("1.01x < 1.05x" in d.reason for d in record.declined)
    lowered = graphopt.optimize(model, args, passes=[MergeMatmuls()], merge_min_speedup=1.0)
    assert lowered.report.record("merge_matmuls").status == "applied"
    assert any("1.01x >= 1.00x" in note for note in lowered.report.record("merge_matmuls").notes)


@pytest.mark.parametrize("bad", [0.9, -1.0, float("nan"), float("inf"), "fast"])
def test_min_speedup_option_validated(bad):
    from graphopt.errors import OptionError

    model, args = tiny_llama(layers=1)
    with pytest.raises(OptionError, match="merge_min_speedup"):
        graphopt.optimize(model, args, passes=[MergeMatmuls()], merge_min_speedup=bad)
