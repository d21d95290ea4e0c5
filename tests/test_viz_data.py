"""The viewer's data, escaping, DOT and Model Explorer output (no browser needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

import graphopt
from graphopt.examples_models import cnn, nanogpt
from graphopt.viz import PassHistory, render, visualize
from graphopt.viz.costs import estimate_cost, node_costs
from graphopt.viz.data import build_view_data
from graphopt.viz.diff import match_nodes
from graphopt.viz.dot import dot_string
from graphopt.viz.html import embed_json, render_html
from tests.support.viz_cases import EVIL, Evil, unfused_pipeline

@pytest.fixture(scope="module")
def nano_result():
    model, args = nanogpt(n_layer=2, n_embd=64, seq=16)
    return graphopt.optimize(model, args, instruments=[PassHistory()], passes=unfused_pipeline())


@pytest.fixture(scope="module")
def cnn_result():
    model, args = cnn(batch=2)
    return graphopt.optimize(model, args, instruments=[PassHistory()])


def _nodes(view, **where):
    return [n for n in view["nodes"] if all(n.get(k) == v for k, v in where.items())]


def test_groups_follow_module_stack(nano_result):
    data = build_view_data(nano_result)
    view = data["views"]["after"]
    groups = {g["key"]: g for g in view["groups"]}
    assert groups[""]["kind"] == "root" and groups[""]["cls"] == "NanoGPT"
    assert groups["h.0"]["cls"] == "Block" and groups["h.0"]["label"] == "h.0"
    assert groups["h.0.attn"]["parent"] == groups["h.0"]["id"]
    softmax = _nodes(view, name="softmax")[0]
    chain, gid = [], softmax["g"]
    while gid is not None:
        chain.append(view["groups"][gid]["path"])
        gid = view["groups"][gid]["parent"]
    assert "h.0.attn" in chain and "h.0" in chain
    assert "examples_models.py" in softmax["src"]
    # a parameter belongs to the module its name names
    weight = next(n for n in view["nodes"] if n["kind"] == "get_attr" and n["target"] == "h.1.mlp.c_fc.weight")
    assert view["groups"][weight["g"]]["path"] == "h.1.mlp.c_fc"


def test_repeated_module_calls_get_one_group_each(cnn_result):
    view = build_view_data(cnn_result, diff=False)["views"]["after"]
    pools = [g for g in view["groups"] if g["path"] == "pool"]
    assert [g["key"] for g in pools] == ["pool", "pool@1"]
    first, second = (_nodes(view, name=n)[0] for n in ("max_pool2d", "max_pool2d_1"))
    assert view["groups"][first["g"]]["key"] == "pool" and view["groups"][second["g"]]["key"] == "pool@1"


def test_source_line_groups_gather_helper_calls():
    from graphopt.specs import load_spec

    spec = load_spec("hf:gpt2?n_layer=1&n_embd=64&n_head=4&seq=16")
    view = build_view_data(graphopt.capture(spec.model, spec.args, spec.kwargs))["views"]["after"]
    lines = [g for g in view["groups"] if g["kind"] == "line"]
    mask = [g for g in lines if "create_causal_mask" in g["src"]]
    assert mask, [g["src"] for g in lines]
    members = [n for n in view["nodes"] if n["g"] == mask[0]["id"]]
    assert len(members) >= 4 and view["groups"][mask[0]["parent"]]["path"] == "transformer"


def test_shapes_dtypes_precision_and_inputs(nano_result):
    view = build_view_data(nano_result)["views"]["after"]
    idx = _nodes(view, kind="placeholder")[0]
    assert idx["shape"] == [1, 16] and idx["dtype"] == "int64"
    linear = _nodes(view, op="aten.linear")[0]
    assert linear["prec"] == "float32"
    assert {view["nodes"][i]["kind"] for i in linear["in"]} >= {"get_attr", "call_function"}


def test_costs_read_from_meta_duck_typed():
    model, args = cnn(batch=2)
    gm = graphopt.capture(model, args).module

    class FakeCost:  # the attribute names graphopt.cost's NodeCost has
        def __init__(self, flops: float) -> None:
            self.flops, self.bytes_read, self.bytes_written = flops, 10.0, 20.0
            self.intensity, self.bound, self.predicted_s, self.measured_s = flops / 30, "compute", 1e-3, None

    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_function":
            node.meta["cost"] = FakeCost(float(i)) if i % 2 else {"flops": 5.0, "predicted_s": 2e-3}
    costs, source = node_costs(gm)
    assert source == "graphopt.cost"
    odd = next(n for i, n in enumerate(gm.graph.nodes) if n.op == "call_function" and i % 2)
    assert costs[odd.name]["bound"] == "compute" and "measured_s" not in costs[odd.name]
    data = build_view_data(gm)
    assert data["cost_source"] == "graphopt.cost"


def test_fallback_estimate_counts_matmul_flops():
    model, args = cnn(batch=2)
    gm = graphopt.capture(model, args).module
    linear = next(n for n in gm.graph.nodes if n.name == "linear")  # fc1: 2048 -> 64, batch 2
    cost = estimate_cost(linear)
    assert cost["flops"] == 2 * 2 * 64 * 2048
    assert cost["bytes_read"] == 4 * (2 * 2048 + 64 * 2048 + 64)
    assert cost["bound"] in ("memory", "compute") and cost["predicted_s"] > 0
    costs, source = node_costs(gm)
    assert source == "estimate" and "linear" in costs


def test_sites_from_an_analysis_object(nano_result):
    gm = nano_result.module

    class Analysis:  # what graphopt.analysis.analyze returns, read by attribute name
        attention_sites = [{"softmax": "softmax", "nodes": ["matmul", "softmax", "matmul_1"]}]
        ffn_chains = [SimpleNamespace(nodes=[n for n in gm.graph.nodes if n.name in ("linear_2", "gelu")])]
        hot_matmuls = [SimpleNamespace(name="linear_8", share=0.3), SimpleNamespace(name="linear_7", share=0.001)]

    view = build_view_data(nano_result, analysis=Analysis())["views"]["after"]
    kinds = {s["kind"]: s for s in view["sites"]}
    names = lambda s: {view["nodes"][i]["name"] for i in s["nodes"]}  # noqa: E731
    assert names(kinds["attention"]) == {"matmul", "softmax", "matmul_1"}
    assert kinds["attention"]["label"] == "attention: softmax"
    assert names(kinds["ffn"]) == {"linear_2", "gelu"}
    assert names(kinds["hot"]) == {"linear_8"} and kinds["hot"]["detail"]["share"] == 0.3


def test_real_analysis_costs_and_sites(nano_result):
    analysis = graphopt.analyze(nano_result)
    data = build_view_data(nano_result, analysis=analysis)
    assert data["cost_source"] == "graphopt.cost" and data["cost_target"] == analysis.target.name
    view = data["views"]["after"]
    by_name = {n["name"]: n for n in view["nodes"]}
    cost = analysis.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[0].meta["cost"]
    linear = by_name[analysis.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[0].name]
    assert linear["cost"]["flops"] == cost.flops and linear["cost"]["bytes_read"] == cost.bytes_read
    assert linear["cost"]["intensity"] == pytest.approx(cost.intensity)
    kinds = [s["kind"] for s in view["sites"]]
    assert kinds.count("ffn") == len(analysis.ffn_chains) == 2
    hot = [s for s in view["sites"] if s["kind"] == "hot"]
    assert hot and hot[0]["label"].startswith("hot: ") and "of the time" in hot[0]["label"]
    # the before view gets its own analysis
    assert data["views"]["before"]["nodes"][-1]["kind"] == "output"
    assert any("cost" in n for n in data["views"]["before"]["nodes"])


def test_before_after_match_and_pass_attribution(nano_result):
    before, after = nano_result.captured.module, nano_result.module
    match = match_nodes(before, after)
    before_names = {n.name for n in before.graph.nodes}
    after_names = {n.name for n in after.graph.nodes}
    assert set(match.removed) == before_names - set(match.pairs)
    assert set(match.added) == after_names - set(match.pairs.values())
    assert any(n.startswith("dropout") for n in match.removed)  # remove_noops drops eval dropouts

    data = build_view_data(nano_result)
    assert set(data["views"]) == {"before", "after"}
    removed = {n["name"] for n in data["views"]["before"]["nodes"] if n.get("diff") == "removed"}
    assert removed == set(match.removed)
    rewrites: dict = {}
    for r in data["rewrites"]:  # the first run of each pass (the pipeline runs cleanup twice)
        rewrites.setdefault(r["pass"], r)
    noops = rewrites["remove_noops"]
    assert noops["status"] == "applied" and noops["numerics"]["ok"]
    site_before = {n for s in noops["sites"] for n in s["before"]}
    assert {n for n in removed if n.startswith("dropout")} <= site_before
    dropout = next(n for n in data["views"]["before"]["nodes"] if n["name"] == "dropout")
    assert [data["rewrites"][i]["pass"] for i in dropout["rw"]] == ["remove_noops"]
    assert data["summary"]["removed"] == len(match.removed)


def test_diff_needs_an_optimization(nano_result):
    with pytest.raises(ValueError, match="OptimizeResult"):
        build_view_data(nano_result.module, diff=True)
    with pytest.raises(TypeError, match="cannot visualize"):
        build_view_data(object())
    with pytest.raises(ValueError, match="unknown format"):
        render(nano_result, format="png")


def test_embedded_json_cannot_close_the_script():
    text = embed_json({"name": EVIL, "amp": "a&b", "nan": float("nan"), "line": "x\u2028y"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"name": EVIL, "amp": "a&b", "nan": None, "line": "x\u2028y"}


def test_html_is_self_contained_and_escapes_model_strings():
    model = Evil()
    cap = graphopt.capture(model, (torch.randn(2, 4),))
    for node in cap.module.graph.nodes:
        if node.op == "call_function":
            node.meta["stack_trace"] = f'  File "evil.py", line 1, in forward\n    x = "</script><b>{EVIL}</b>"\n'
    page = render_html(build_view_data(cap, title=EVIL))
    assert EVIL not in page and "</script><b>" not in page
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page
    assert len(re.findall(r"<script\b", page)) == 2  # the data and the viewer, nothing else
    assert "<title>graphopt: &lt;script&gt;alert(1)&lt;/script&gt;</title>" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loaded from the network
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_dot_string_escapes_quotes_backslashes_newlines():
    assert dot_string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_dot_output_has_module_clusters_and_colours(nano_result, tmp_path):
    path = visualize(nano_result, tmp_path / "g.dot", format="dot")
    text = open(path).read()
    assert text.startswith('digraph "NanoGPT"')
    assert 'label="h.0 (Block)"' in text and "subgraph cluster_" in text
    assert text.count("{") == text.count("}")
    assert "fillcolor=\"#" in text and "->" in text
    assert "_guards_fn" not in text and "get_attr" not in text
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg", path], capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg and "softmax" in svg


def test_dot_escapes_a_hostile_module_name(tmp_path):
    cap = graphopt.capture(Evil(), (torch.randn(2, 4),))
    text = render(cap, format="dot")
    assert f'label="{EVIL} (Linear)"' in text
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True, check=True)


def test_model_explorer_node_data(nano_result, tmp_path):
    path = visualize(nano_result, tmp_path / "costs.json", format="model-explorer", metric="bytes")
    data = json.load(open(path))
    graph = data["graph"]
    assert graph["gradient"][0]["stop"] == 0 and graph["gradient"][-1]["stop"] == 1
    after = {n.name for n in nano_result.module.graph.nodes}
    assert set(graph["results"]) <= after and "linear" in graph["results"]
    assert all(isinstance(r["value"], float) and r["value"] >= 0 for r in graph["results"].values())
    with pytest.raises(ValueError, match="unknown metric"):
        render(nano_result, format="model-explorer", metric="colour")


def test_visualize_writes_html_and_is_exported(nano_result, tmp_path):
    assert graphopt.visualize is visualize
    path = graphopt.visualize(nano_result, tmp_path / "sub" / "graph.html")
    page = open(path).read()
    assert page.startswith("<!DOCTYPE html>") and '"before"' in page and "NanoGPT" in page


def test_cli_viz(tmp_path):
    from graphopt.cli import main

    out = tmp_path / "mlp.html"
    assert main(["viz", "examples:mlp", "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["viz", "examples:mlp", "-o", str(out)]) == 2  # exists, no --force
    assert main(["viz", "examples:mlp", "-o", str(tmp_path / "mlp.dot"), "--format", "dot"]) == 0
    assert main(["viz", "examples:mlp", "-o", str(tmp_path / "d.html"), "--diff", "--passes", "remove_noops"]) == 0
    assert '"before"' in (tmp_path / "d.html").read_text()
    assert main(["viz", "examples:mlp", "-o", str(tmp_path / "x.html"), "--passes", "remove_noops"]) == 2
    assert main(["viz", "examples:mlp", "-o", str(tmp_path / "p.html"), "--profile"]) == 0
    page = (tmp_path / "p.html").read_text()
    assert '"profiled":true' in page and '"measured_s":' in page
