"""The viewer in a real headless Chromium (Debian's chromium, driven by Playwright).

Skipped, loudly, only when no Chromium binary can be found: CI installs it
(``apt-get install chromium``). Playwright's Python package is a dev
dependency; no Playwright browser download is used.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import graphopt
from graphopt.examples_models import nanogpt
from graphopt.viz import PassHistory, visualize
from graphopt.viz.browser import find_chromium

CHROMIUM = find_chromium()
if CHROMIUM is None:
    reason = ("NO CHROMIUM FOUND: the viewer's browser tests did not run. Install Debian's chromium "
              "(apt-get install -y chromium) or set GRAPHOPT_CHROMIUM to a Chromium binary.")
    warnings.warn(reason, stacklevel=1)
    pytest.skip(reason, allow_module_level=True)

from graphopt.viz.browser import chromium_browser, new_page, open_viewer  # noqa: E402
from tests.support.viz_cases import EVIL, Evil, unfused_pipeline  # noqa: E402

EVIL_CLASS = "<img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("viz")
    model, args = nanogpt(n_layer=2, n_embd=64, seq=16)
    result = graphopt.optimize(model, args, instruments=[PassHistory()], passes=unfused_pipeline())
    nano = visualize(result, out / "nano.html")
    cap = graphopt.capture(Evil(), (torch.randn(2, 4),))
    for node in cap.module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:  # a hostile class name and source line as well as the module name
            node.meta["nn_module_stack"] = {k: (p, EVIL_CLASS if p else c) for k, (p, c) in stack.items()}
        if node.op == "call_function":
            node.meta["stack_trace"] = f'  File "evil.py", line 7, in forward\n    y = "</script><script>window.__pwned=2</script>"\n'
    evil = visualize(cap, out / "evil.html", title=EVIL)
    return {"nano": str(nano), "evil": str(evil)}


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as b:
        yield b


@pytest.fixture
def page(browser):
    page, errors = new_page(browser)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.errors, page.requests, page.dialogs = errors, requests, dialogs
    yield page
    page.close()


def _items(page) -> int:
    return page.locator("#viewport .items > .item").count()


def test_page_loads_without_console_errors_or_network(page, pages):
    load = open_viewer(page, pages["nano"])
    print(f"first render of the 2-layer nanoGPT page: {load.first_render_ms:.0f} ms, {load.items} items")
    assert page.errors == []
    assert all(url.startswith("file://") for url in page.requests), page.requests
    assert load.items > 3
    assert page.locator("#details-title").text_content() == "NanoGPT"
    assert "share of predicted time" in page.locator("#legend").text_content()
    assert page.locator("#pass-list li").count() >= 3


def test_search_finds_a_node_and_reveals_it(page, pages):
    open_viewer(page, pages["nano"])
    page.fill("#search", "softmax")
    results = page.locator("#search-results li[data-node]")
    results.first.wait_for()
    names = [results.nth(i).get_attribute("data-node") for i in range(results.count())]
    assert "softmax" in names and "softmax_1" in names
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text="softmax").wait_for()
    node = page.locator('#viewport .item.node[data-name="softmax"]')
    assert node.count() == 1 and "selected" in node.get_attribute("class")
    # search by module path as well
    page.fill("#search", "h.1.mlp")
    page.locator("#search-results li[data-node]").first.wait_for()
    assert page.locator("#search-results li[data-node]").count() >= 3
    assert page.errors == []


def test_click_opens_details(page, pages):
    open_viewer(page, pages["nano"])
    page.locator('#viewport .item.node[data-name="idx"]').click()
    assert page.locator("#details-title").text_content() == "idx"
    fields = page.locator("#node-fields").text_content()
    assert "placeholder" in fields and "[1\u00d716]" in fields and "int64" in fields
    # a compute node inside a module: op, module path, source line, costs
    page.fill("#search", "linear_2")
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text="linear_2").wait_for()
    fields = page.locator("#node-fields").text_content()
    for text in ("aten.linear", "h.0.mlp.c_fc", "linear.py", "FLOPs", "bytes read", "predicted time", "float32"):
        assert text in fields, text
    assert "c_fc.weight" in page.locator("#details").text_content()  # its weights are listed
    page.fill("#search", "masked_fill_1")
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text="masked_fill_1").wait_for()
    assert "examples_models.py" in page.locator("#node-fields").text_content()  # the model's own source line
    assert page.errors == []


def test_collapse_and_expand(page, pages):
    open_viewer(page, pages["nano"])
    group = page.locator('#viewport .item.group[data-group="h.0.attn"]')
    if group.count() == 0:  # opened expanded: collapse it first
        page.locator('#viewport .group-frame[data-group="h.0.attn"] .toggle').click()
    assert page.locator('#viewport .item.group[data-group="h.0.attn"]').count() == 1
    collapsed_items = _items(page)
    page.locator('#viewport .item.group[data-group="h.0.attn"] .toggle').click()
    assert page.locator('#viewport .group-frame[data-group="h.0.attn"]').count() == 1
    assert page.locator('#viewport .item.node[data-name="softmax"]').count() == 1
    assert _items(page) > collapsed_items
    page.locator('#viewport .group-frame[data-group="h.0.attn"] .toggle').click()
    assert page.locator('#viewport .item.group[data-group="h.0.attn"]').count() == 1
    assert page.locator('#viewport .item.node[data-name="softmax"]').count() == 0
    assert _items(page) == collapsed_items
    page.click("#collapse-all")
    assert _items(page) < collapsed_items
    page.click("#expand-all")
    assert page.locator('#viewport .item.node[data-name="softmax_1"]').count() == 1
    assert page.errors == []


def test_injected_script_does_not_run_and_shows_as_text(page, pages):
    open_viewer(page, pages["evil"])
    assert page.evaluate("window.__pwned === undefined")
    assert page.dialogs == [] and page.errors == []
    assert page.locator("#title").text_content() == EVIL
    group = page.locator("#viewport [data-group]").filter(has_text=EVIL)
    assert group.count() >= 1
    assert EVIL in group.first.text_content()
    group.first.click(position={"x": 60, "y": 20})
    fields = page.locator("#group-fields").text_content()
    assert EVIL in fields and EVIL_CLASS in fields
    assert page.locator("#viewport script").count() == 0 and page.locator("#viewport img").count() == 0
    page.fill("#search", "linear")
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text="linear").wait_for()
    fields = page.locator("#node-fields").text_content()
    assert EVIL in fields and "</script><script>window.__pwned=2</script>" in fields
    assert page.locator("#details script, #details img").count() == 0
    assert page.evaluate("window.__pwned === undefined") and page.dialogs == []


def test_before_after_view_marks_removed_and_added(page, pages):
    open_viewer(page, pages["nano"])
    page.click("#expand-all")
    page.select_option("#view-select", "before")
    removed = page.locator("#viewport .item.node.removed")
    assert removed.count() >= 4  # the eval-mode dropouts remove_noops dropped
    page.locator('#details a[data-node="dropout_1"]').click()  # the summary lists the removed nodes
    page.locator("#details-title", has_text="dropout_1").wait_for()
    page.locator('#viewport .item.node.removed[data-name="dropout_1"]').click()  # centred: click it
    fields = page.locator("#node-fields").text_content()
    assert "removed by the optimization" in fields
    details = page.locator("#details").text_content()
    assert "rewrite: remove_noops" in details and "numericsok " in details and "max_abs" in details and "input sets" in details
    page.fill("#search", "arange")
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text="arange").wait_for()
    assert "rewrite: constant_folding" in page.locator("#details").text_content()
    page.select_option("#view-select", "after")
    page.check("#show-weights")
    assert page.locator("#viewport .item.node.added").count() >= 1  # constants folded in
    assert page.errors == []


def test_colour_metric_switch_and_zoom(page, pages):
    open_viewer(page, pages["nano"])
    for metric, text in (("bytes", "bytes moved"), ("intensity", "FLOP/byte"), ("precision", "float32")):
        page.select_option("#metric-select", metric)
        assert text in page.locator("#legend").text_content()
    before = page.locator("#viewport").get_attribute("transform")
    page.mouse.move(300, 300)
    page.mouse.wheel(0, -400)
    assert page.locator("#viewport").get_attribute("transform") != before
    assert page.errors == []
