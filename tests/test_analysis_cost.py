"""Cost model: per-op FLOPs against FlopCounterMode, bytes, views, custom-op costs, the roofline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import graphopt
from graphopt import cost as cost_mod
from graphopt.cost import NodeCost, node_cost, register_cost
from graphopt.target import Roofline, get_roofline
from graphopt.target import roofline as roofline_mod


def _costs(fn, *args):
    class M(nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    gm = graphopt.capture(M(), args).module
    return gm, {n.name: node_cost(n) for n in gm.graph.nodes}


def _flop_counter(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        fn(*args)
    return c.get_total_flops()


CASES = {
    "mm": (torch.mm, (torch.randn(8, 16), torch.randn(16, 4))),
    "bmm": (torch.bmm, (torch.randn(3, 8, 16), torch.randn(3, 16, 4))),
    "matmul_broadcast": (torch.matmul, (torch.randn(2, 3, 8, 16), torch.randn(16, 4))),
    "addmm": (lambda b, x, w: torch.addmm(b, x, w), (torch.randn(4), torch.randn(8, 16), torch.randn(16, 4))),
    "baddbmm": (lambda b, x, w: torch.baddbmm(b, x, w),
                (torch.randn(3, 8, 4), torch.randn(3, 8, 16), torch.randn(3, 16, 4))),
    "linear": (F.linear, (torch.randn(2, 5, 16), torch.randn(32, 16), torch.randn(32))),
    "einsum": (lambda a, b: torch.einsum("bij,bjk->bik", a, b), (torch.randn(3, 8, 16), torch.randn(3, 16, 4))),
    "conv2d": (lambda x, w: F.conv2d(x, w, padding=1), (torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3))),
    "conv2d_grouped": (lambda x, w: F.conv2d(x, w, groups=2, stride=2),
                       (torch.randn(2, 4, 16, 16), torch.randn(8, 2, 3, 3))),
    "conv_transpose": (lambda x, w: F.conv_transpose2d(x, w), (torch.randn(1, 4, 8, 8), torch.randn(4, 6, 3, 3))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matmul_family_flops_match_flop_counter(case):
    fn, args = CASES[case]
    _, costs = _costs(fn, *args)
    ours = sum(c.flops for c in costs.values() if c.is_matmul_class)
    assert ours == _flop_counter(fn, *args)


def test_sdpa_flops_two_matmuls_with_gqa():
    q, k, v = torch.randn(2, 8, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    _, costs = _costs(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, v)
    sdpa = [c for c in costs.values() if c.category == "attention"]
    assert len(sdpa) == 1
    assert sdpa[0].flops == 2 * (2 * 2 * 8 * 32 * 32 * 16)  # QK^T and PV over the 8 query heads
    assert sdpa[0].bytes_read == (q.numel() + k.numel() + v.numel()) * 4


def test_views_cost_nothing_and_copies_move_bytes():
    x = torch.randn(4, 8, 16)
    gm, costs = _costs(lambda x: (x * 2).transpose(1, 2).contiguous().view(4, -1), x)
    by_op = {n.target: costs[n.name] for n in gm.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert by_op[aten.transpose.int].bytes == 0 and by_op[aten.transpose.int].category == "view"
    assert by_op[aten.view.default].bytes == 0
    copy = by_op[aten.contiguous.default]
    assert copy.category == "copy" and copy.bytes_read == copy.bytes_written == x.numel() * 4
    mul = by_op[aten.mul.Tensor]
    assert mul.category == "elementwise" and mul.flops == x.numel()


def test_ops_returning_their_input_are_free():
    # eval-mode dropout returns its input (as eager PyTorch does): no bytes, no storage
    gm = graphopt.capture(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)), (torch.randn(2, 8),)).module
    drop = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default)
    assert node_cost(drop).category == "view" and node_cost(drop).bytes == 0
    assert cost_mod.alias_root(drop) is drop.args[0]


def test_broadcast_input_read_once():
    a, b = torch.randn(256, 128), torch.randn(128)
    gm, costs = _costs(lambda a, b: a + b, a, b)
    add = next(costs[n.name] for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert add.bytes_read == (a.numel() + b.numel()) * 4
    assert add.bytes_written == a.numel() * 4


def test_embedding_reads_only_the_rows_it_gathers():
    emb = nn.Embedding(10000, 64)
    idx = torch.randint(0, 10000, (1, 16))
    gm = graphopt.capture(emb, (idx,)).module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    c = node_cost(node)
    assert c.category == "gather"
    assert c.bytes_written == 16 * 64 * 4
    assert c.bytes_read == 16 * 64 * 4 + idx.numel() * 8


def test_norm_softmax_reduction_categories():
    x = torch.randn(4, 32)
    ln = nn.LayerNorm(32)
    gm = graphopt.capture(nn.Sequential(ln, nn.Softmax(-1)), (x,)).module
    cats = sorted(node_cost(n).category for n in gm.graph.nodes if n.op == "call_function")
    assert cats == ["norm", "softmax"]
    _, costs = _costs(lambda x: x.sum(-1), x)
    assert [c.category for c in costs.values() if c.category != "none"] == ["reduction"]


def test_registered_cost_for_a_custom_op():
    @torch.library.custom_op("graphopt_test::double_it", mutates_args=())
    def double_it(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double_it.register_fake
    def _(x):
        return torch.empty_like(x)

    op = torch.ops.graphopt_test.double_it.default
    calls = []

    def my_cost(node):
        calls.append(node.name)
        return NodeCost(flops=123, bytes_read=4, bytes_written=4, category="elementwise")

    register_cost(torch.ops.graphopt_test.double_it, my_cost)  # the packet covers every overload
    try:
        gm, costs = _costs(lambda x: op(x), torch.randn(8))
        node = next(n for n in gm.graph.nodes if n.target is op)
        assert costs[node.name].flops == 123 and calls
    finally:
        cost_mod._REGISTRY.pop(torch.ops.graphopt_test.double_it, None)


def test_roofline_predicts_bound_and_time():
    t = Roofline("t", "cpu", {"float32": 1e12, "bfloat16": 4e12}, 1e11, op_overhead_s=1e-6)
    compute = NodeCost(flops=10**12, bytes_read=10**6, bytes_written=0, category="matmul")
    memory = NodeCost(flops=10**6, bytes_read=10**10, bytes_written=10**10, category="elementwise")
    s, bound = t.predict(compute, torch.float32)
    assert bound == "compute" and s == pytest.approx(1.0 + 1e-6)
    s, bound = t.predict(compute, torch.bfloat16)
    assert s == pytest.approx(0.25 + 1e-6)
    s, bound = t.predict(memory, torch.float32)
    assert bound == "memory" and s == pytest.approx(0.2 + 1e-6)
    assert t.predict(NodeCost(category="view"))[0] == 0.0
    assert t.ridge_point() == pytest.approx(10.0)
    assert t.peak_for(torch.float16) == 1e12  # unmeasured dtype falls back to float32


def test_roofline_dict_round_trip():
    t = Roofline("t", "cpu", {"float32": 1e12}, 1e11, 2e-6, {"host": "x"}, True)
    assert Roofline.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_get_roofline_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GRAPHOPT_TARGET", raising=False)
    calls = []

    def fake_measure(device="cpu", budget_s=2.0):
        calls.append(device)
        return Roofline("fake", device, {"float32": 1e9}, 1e9, 0.0, roofline_mod.machine_key(device), True)

    monkeypatch.setattr(roofline_mod, "measure_roofline", fake_measure)
    first = get_roofline("cpu")
    second = get_roofline("cpu")
    assert calls == ["cpu"] and first == second
    assert (tmp_path / "target-cpu.json").exists()
    get_roofline("cpu", refresh=True)
    assert calls == ["cpu", "cpu"]
    # a cache written on another machine is measured again
    data = json.loads((tmp_path / "target-cpu.json").read_text())
    data["key"]["host"] = "elsewhere"
    (tmp_path / "target-cpu.json").write_text(json.dumps(data))
    get_roofline("cpu")
    assert len(calls) == 3


def test_graphopt_target_env_overrides(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(Roofline("mine", "cpu", {"float32": 5e9}, 2e9).to_dict()))
    monkeypatch.setenv("GRAPHOPT_TARGET", str(path))
    assert get_roofline("cpu").name == "mine"


def test_measure_roofline_gives_positive_figures():
    t = roofline_mod.measure_roofline("cpu", budget_s=0.3)
    assert t.peak_flops["float32"] > 0 and t.mem_bandwidth > 0 and t.op_overhead_s > 0
    assert t.measured and t.key["device"] == "cpu"


def test_analyze_counts_the_flops_of_int8_linears():
    """An int8 graph's ``graphopt.int8_linear`` nodes count a linear's FLOPs (declared by the op), so
    ``analyze`` on an ``optimize(..., precision="int8")`` result gives the fp32 model's matmul FLOPs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    args = (torch.randn(32, 64),)
    result = graphopt.optimize(model, args, precision="int8", n_random_inputs=1)
    int8_nodes = [n for n in result.module.graph.nodes if n.target is torch.ops.graphopt.int8_linear.default]
    assert int8_nodes, result.report
    target = Roofline("t", "cpu", {"float32": 1e11}, 1e10, 1e-6)
    fp32, int8 = graphopt.analyze(model, args, target=target), graphopt.analyze(result, target=target)
    assert fp32.total_flops == 2 * 32 * (64 * 256 + 256 * 64)
    assert int8.total_flops == fp32.total_flops
    assert all(node_cost(n).category == "matmul" and node_cost(n).flops > 0 for n in int8_nodes)
