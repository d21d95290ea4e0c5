"""graphopt.ops.kernel_calls: weight-only ops as direct kernel calls, the same numbers, the original untouched."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import transformers

import graphopt
from graphopt.generate.loop import run_generation
from graphopt.generate.sampling import Sampling
from graphopt.ops import weight_only_linear as wo
from graphopt.ops.kernel_calls import inline_kernel_calls
from graphopt.ops.weight_only_linear import int4_kernel_call, int8_kernel_call
from graphopt.verify import ErrorBudget

OPS = (torch.ops.graphopt.int8_weight_only_linear.default, torch.ops.graphopt.int4_weight_only_linear.default)
pytestmark = pytest.mark.skipif(not (wo.int8_kernel("cpu") and wo.int4_kernel("cpu")),
                                reason="this torch build has no CPU weight-only kernels")


class Both(torch.nn.Module):
    """int8 and int4 weight-only linears (20 outputs: the CPU int4 packing pads them to 32), bias on one."""

    def __init__(self, n: int = 20, k: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.05
        q, s = wo.quantize_int8_weight_only(w)
        p, sz, group = wo.quantize_int4(w)
        for name, t in (("q", q), ("s", s), ("p", p), ("sz", sz), ("b", torch.randn(n, generator=g))):
            self.register_buffer(name, t)
        self.group = group

    def forward(self, x):
        a = torch.ops.graphopt.int8_weight_only_linear(x, self.q, self.s, self.b)
        return a + torch.ops.graphopt.int4_weight_only_linear(x.relu(), self.p, self.sz, self.group, None)


def _targets(module: fx.GraphModule) -> list:
    return [getattr(n.target, "default", n.target) for n in module.graph.nodes if n.op == "call_function"]


def test_ops_become_kernel_calls_with_the_same_numbers_and_the_original_is_kept():
    gm = fx.symbolic_trace(Both())
    before = list(_targets(gm))
    lowered = inline_kernel_calls(gm)
    assert lowered is not gm
    assert not set(_targets(lowered)) & set(OPS)
    assert int8_kernel_call in _targets(lowered) and int4_kernel_call in _targets(lowered)
    assert _targets(gm) == before  # the module handed in still runs (and saves) its ops
    for shape in [(1, 64), (3, 64), (2, 5, 64)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
        assert torch.equal(lowered(x), gm(x))  # the op's kernel path, op for op
    # the stored int4 weight is no longer read; the copy shares the kernel layout with the op's cache
    assert not any(n.op == "get_attr" and n.target == "p" for n in lowered.graph.nodes)


def test_a_weight_that_is_not_a_module_attribute_is_declined():
    class Mixed(Both):
        def forward(self, x, q, s):  # the int8 weight passed in: no kernel layout to inline
            a = torch.ops.graphopt.int8_weight_only_linear(x, q, s, None)
            return a + torch.ops.graphopt.int4_weight_only_linear(x, self.p, self.sz, self.group, None)

    model = Mixed()
    gm = fx.symbolic_trace(model)
    lowered = inline_kernel_calls(gm)
    targets = _targets(lowered)
    assert OPS[0] in targets and OPS[1] not in targets and int4_kernel_call in targets
    x = torch.randn(3, 64)
    assert torch.equal(lowered(x, model.q, model.s), gm(x, model.q, model.s))
    m = torch.nn.Linear(2, 2)
    assert inline_kernel_calls(m) is m  # not a graph: as it is
    plain = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    assert inline_kernel_calls(plain) is plain  # no weight-only op: itself


def test_generation_runs_kernel_calls_and_saves_the_ops():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    graphs = graphopt.prepare_generation(model, max_length=64, precision="int8wo",
                                         error_budget=ErrorBudget(rel_l2=1e9))
    assert set(_targets(graphs.decode.module)) & set(OPS)  # the saved graph keeps the ops
    assert not set(_targets(graphs.runnable("decode"))) & set(OPS)
    assert graphs.runnable("decode") is graphs.runnable("decode")  # made once
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    tokens = graphs.generate(ids, max_new_tokens=6, eos_token_id=None)
    # the same graph with its ops (the pre-kernel-call path) gives the same tokens
    plain = run_generation(graphs.prefill.module, graphs.decode.module, graphs.layout, ids, None,
                           max_new_tokens=6, sampling=Sampling(False, 1.0, None, None))
    assert torch.equal(tokens, plain)
