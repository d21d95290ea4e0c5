"""Decode compiled ahead of time by AOTInductor (``compile_decode="aot"``): the model's tokens, the graph's own
weights (not a copy), int4's kernel constants, and a note where it cannot compile."""

from __future__ import annotations

from operator import attrgetter

import pytest
import torch

import graphopt
from graphopt.errors import BadInput
from graphopt.generate.aot import AotStep, aot_compile, aot_compiler
from graphopt.generate.build import _decode_states
from graphopt.generate.compiled import CompiledDecode
from graphopt.generate.step import CausalLMStep
from graphopt.verify import ErrorBudget
from tests.support.generation_models import padded_prompts
from tests.support.generation_models import tiny_llama as llama

pytest.importorskip("transformers")


def test_aot_decode_generates_transformers_tokens_and_points_at_the_graphs_weights():
    model = llama()
    graphs = graphopt.prepare_generation(model, compile_decode="aot")
    assert graphs.compile_decode == "aot" and graphs.notes == [] and graphs.compiled_note is None
    step = graphs.decode_step(torch.device("cpu"))
    assert isinstance(step, CompiledDecode) and step.name == "AOTInductor" and isinstance(step.compiled, AotStep)
    assert graphs.check.ok(None)  # the build's check ran through the compiled step
    ids, mask = padded_prompts()
    for rows in (slice(0, 1), slice(0, 3)):  # batch 1 and a left-padded batch: one compile serves both
        expected = model.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        got = graphs.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, eos_token_id=None,
                              pad_token_id=0)
        assert torch.equal(got, expected)
    assert graphs.compiled_note is None
    # the library reads the graph's own tensors, the same memory: every one the graph holds (its parameters, and
    # tensors such as weight_layout's (in, out) copies, which export copies)
    decode = graphs.runnable("decode")
    held = {n.target for n in decode.graph.nodes if n.op == "get_attr"}
    tensors = {name: attrgetter(name)(decode) for name in held}
    tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.numel() > 1}
    assert any("in_out" in name for name in tensors), sorted(tensors)  # a copy export would have made
    weights = step.compiled.weights
    matrices = {name for name, t in tensors.items() if t.dim() == 2}  # (inductor may fold a small one away)
    assert matrices <= set(weights), matrices - set(weights)
    assert {name: weights[name].data_ptr() for name in tensors if name in weights} == \
        {name: t.data_ptr() for name, t in tensors.items() if name in weights}


def test_aot_step_of_an_int4_graph_equals_the_graph_and_follows_its_weights():
    """int4's kernel takes its group size as a constant inductor makes itself (not one of the graph's): it stays
    the library's. A weight changed in place after the compile is what the compiled step reads."""
    model = llama(layers=1)  # one layer: the compile is the test's cost
    graphs = graphopt.prepare_generation(model, precision="int4", error_budget=ErrorBudget(rel_l2=10.0))
    decode = graphs.runnable("decode")
    targets = {str(n.target) for n in decode.graph.nodes if n.op == "call_function"}
    assert any("int4" in t for t in targets), targets  # the case this test is for
    step = aot_compile(decode, graphs.decode.example_args, graphs.dynamic_shapes["decode"])
    (args, _), = _decode_states(CausalLMStep(model), graphs.layout, model, 1, seed=3, batch=1, prompt=12)

    def run(fn):
        cache = [c.clone() for c in args[4]]
        with torch.no_grad():
            return fn(*args[:4], cache), cache

    (want, want_cache), (got, got_cache) = run(decode), run(step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_cache, want_cache):
        torch.testing.assert_close(g, w)  # the cache written in place as the graph writes it
    float_weights = [t for t in step.weights.values() if t.is_floating_point() and t.dim() == 2]
    assert float_weights
    with torch.no_grad():
        for t in float_weights:
            t.mul_(0.5)
    (want, _), (got, _) = run(decode), run(step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_failed_aot_compile_leaves_decode_uncompiled_with_the_reason(monkeypatch):
    """The reason names AOTInductor; the build turns it into its note (``decode not compiled: <reason>``, as
    tests/test_generate_compiled.py checks for torch.compile) and decode runs the graph."""
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nlong log")

    class Step(torch.nn.Module):  # a decode step's signature, one linear inside
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, token, mask, positions, cache_position, cache):
            return self.linear(token) + cache[0]

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    decode = Step()
    args = (torch.randn(2, 4), torch.ones(2, 5), torch.zeros(2, 1), torch.tensor(4), [torch.randn(2, 3)])
    batch = torch.export.Dim("batch", min=1, max=8)
    shapes = ({0: batch}, {0: batch}, {0: batch}, None, [{0: batch}])
    step = CompiledDecode(decode, compiler=aot_compiler(args, shapes), name="AOTInductor")
    assert step.compiled is None  # exported, then the compile raised
    assert step.fallback_reason == ("AOTInductor failed (RuntimeError: InvalidCxxCompiler: "
                                    "No working C++ compiler found)")
    assert torch.equal(step(*args), decode(*args))  # the graph runs

@pytest.mark.parametrize("value", ["yes", 2, ["aot"]])
def test_an_unknown_compile_decode_is_a_one_line_error_before_any_build(value):
    with pytest.raises(BadInput, match="compile_decode=.*use False, True"):
        graphopt.prepare_generation(llama(), compile_decode=value)


def test_an_unknown_compile_decode_set_on_the_graphs_is_a_one_line_error():
    from types import SimpleNamespace

    from graphopt.generate.build import GenerationGraphs

    graphs = GenerationGraphs(SimpleNamespace(), SimpleNamespace(), None, 16, compile_decode="fast")
    graphs._runnable["decode"] = (None, lambda *args: None)  # the graph is not reached: the value is refused first
    graphs.decode = SimpleNamespace(module=None)
    with pytest.raises(BadInput, match="compile_decode='fast': use False, True"):
        graphs.decode_step(torch.device("cpu"))
