"""Open a viewer page in headless Chromium: first-render time and screenshots.

Used by the browser tests, ``benchmarks/viz.py`` and the docs screenshots.
Needs Playwright's Python package (``pip install playwright``) and a Chromium
binary: Debian's ``chromium`` package (``/usr/bin/chromium``) or any browser
named by ``GRAPHOPT_CHROMIUM``; no browser download is needed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$GRAPHOPT_CHROMIUM``, else the first on PATH, else None."""
    env = os.environ.get("GRAPHOPT_CHROMIUM")
    if env and os.path.exists(env):
        return env
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLoad:
    """What opening a viewer page showed: timings (ms from navigation start) and console errors."""

    first_render_ms: float
    script_done_ms: float
    items: int
    errors: list[str] = field(default_factory=list)
    browser: str = ""  # the browser's version
    expand_all_ms: float | None = None  # "expand all": layout and draw of every node


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError("the browser tools need Playwright: pip install playwright") from exc
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found; install it (apt-get install chromium) or set GRAPHOPT_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, width: int = 1400, height: int = 900) -> tuple[Any, list[str]]:
    """A fresh page and the list its console errors and uncaught exceptions go to."""
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    return page, errors


@contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[tuple[Any, list[str]]]:
    """A fresh headless Chromium page and the list its console errors go to."""
    with chromium_browser() as browser:
        yield new_page(browser, width, height)


def open_viewer(page: Any, path: str, timeout_ms: float = 60_000) -> PageLoad:
    """Load the viewer file ``path`` in ``page`` and wait until it has drawn."""
    page.goto("file://" + os.path.abspath(path))
    page.wait_for_selector("body[data-ready='1']", timeout=timeout_ms)
    info = page.evaluate("({f: window.graphoptViewer.firstRenderMs, s: window.graphoptViewer.scriptDoneMs,"
                         " i: window.graphoptViewer.items})")
    return PageLoad(float(info["f"]), float(info["s"]), int(info["i"]))


def time_expand_all(page: Any) -> float:
    """Milliseconds the page takes to lay out and draw with every group open (then collapse again)."""
    ms = page.evaluate("""() => new Promise(done => {
        const t0 = performance.now();
        document.getElementById('expand-all').click();
        requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));
    })""")
    page.click("#collapse-all")
    return float(ms)


def measure_first_render(path: str, repeats: int = 3) -> list[PageLoad]:
    """Open ``path`` ``repeats`` times, each in a fresh page; one :class:`PageLoad` per load."""
    loads = []
    with chromium_browser() as browser:
        for _ in range(repeats):
            page, errors = new_page(browser)
            load = open_viewer(page, path)
            load.expand_all_ms = time_expand_all(page)
            load.errors, load.browser = errors, f"Chromium {browser.version}"
            loads.append(load)
            page.close()
    return loads


def screenshot(path: str, png: str, *, actions: Any = None, width: int = 1400, height: int = 900) -> None:
    """Save a PNG of the viewer page ``path``; ``actions(page)`` may click around first."""
    with browser_page(width, height) as (page, errors):
        open_viewer(page, path)
        if actions is not None:
            actions(page)
        page.screenshot(path=png)
        if errors:
            raise RuntimeError(f"the page logged errors: {errors}")
