"""Render the viewer's data as one self-contained HTML file.

The page's script and style are inlined from ``graphopt/viz/assets/``; the
data is embedded as JSON in ``<script type="application/json">`` with ``<``,
``>`` and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026``, so no string
from the model can close the script element; the page's script puts every
model string on screen with ``textContent``. A Content-Security-Policy allows
no network access at all: the file works offline and loads nothing.

Why our own small viewer rather than a graph library: the file must be
self-contained and small (a 12-layer GPT-2 with its before/after graphs is
well under a megabyte), needs compound (module) groups that open and close,
and renders fx graphs whose layout is computed per open group; the layered
layout it uses is ~100 lines.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{(TITLE|CSS|JS|DATA)\}\}")


def _asset(name: str) -> str:
    return resources.files("graphopt.viz").joinpath("assets", name).read_text(encoding="utf-8")


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element."""
    text = json.dumps(_finite(data), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_html(data: dict[str, Any]) -> str:
    """The complete HTML page for the viewer data of :func:`graphopt.viz.data.build_view_data`."""
    js, css = _asset("viewer.js"), _asset("viewer.css")
    if any(tag in js.lower() for tag in ("</script", "<script", "<!--")) or "</style" in css.lower():
        raise RuntimeError("viewer assets must not contain script/style tags or comment openers")
    parts = {
        "TITLE": html.escape(f"graphopt: {data.get('title', '')}"),
        "CSS": css,
        "JS": js,
        "DATA": embed_json(data),
    }
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset("template.html"))
