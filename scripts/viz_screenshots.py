"""Take the screenshots in docs/viz.md with headless Chromium.

    python scripts/viz_screenshots.py [--out docs/img] [--layers 12]

GPT-2 (GPT2Config defaults, random weights, seq 128) optimized with the
default pipeline, before and after; the CIFAR CNN (graphopt.examples_models.cnn)
with its batch norms folded. The HTML files go next to the PNGs' directory in
out/viz/.
"""

from __future__ import annotations

import argparse
import os
import sys


def _select(page, name: str) -> None:
    page.fill("#search", name)
    page.keyboard.press("Enter")
    page.locator("#details-title", has_text=name).wait_for()


def _expand(page, key: str) -> None:
    page.locator(f'#viewport .item.group[data-group="{key}"] .toggle').click()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--html", default="out/viz")
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.examples_models import cnn
    from graphopt.specs import load_spec
    from graphopt.viz import PassHistory, visualize
    from graphopt.viz.browser import chromium_browser, new_page, open_viewer

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.html, exist_ok=True)
    spec = load_spec(f"hf:gpt2?n_layer={args.layers}&seq=128")
    result = graphopt.optimize(spec.model, spec.args, spec.kwargs, instruments=[PassHistory()])
    gpt2 = visualize(result, os.path.join(args.html, "gpt2.html"), title=f"GPT-2 ({args.layers} layers, seq 128)")
    model, inputs = cnn()
    cnn_html = visualize(graphopt.optimize(model, inputs, instruments=[PassHistory()]),
                         os.path.join(args.html, "cnn.html"), title="CIFAR CNN")

    with chromium_browser() as browser:
        page, errors = new_page(browser, 1500, 950)
        open_viewer(page, gpt2)
        page.screenshot(path=os.path.join(args.out, "viz_gpt2_open.png"))
        _expand(page, "transformer.h.0")
        _expand(page, "transformer.h.0.attn")
        _select(page, "softmax")
        page.screenshot(path=os.path.join(args.out, "viz_gpt2_after.png"))
        page.select_option("#view-select", "before")
        _select(page, "dropout_1")
        page.screenshot(path=os.path.join(args.out, "viz_gpt2_before.png"))

        page2, errors2 = new_page(browser, 1500, 950)
        open_viewer(page2, cnn_html)
        page2.click("#expand-all")
        page2.select_option("#view-select", "before")
        page2.locator('#viewport .item.node[data-name="batch_norm"]').click()
        page2.screenshot(path=os.path.join(args.out, "viz_cnn_before.png"))
        page2.select_option("#view-select", "after")
        page2.locator('#viewport .item.node[data-name="conv2d_1"]').click()
        page2.screenshot(path=os.path.join(args.out, "viz_cnn_after.png"))
        if errors or errors2:
            print(f"console errors: {errors + errors2}")
            return 1
    print(f"wrote screenshots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
