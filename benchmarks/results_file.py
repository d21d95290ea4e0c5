"""Replace one marked section of benchmarks/RESULTS.md (what the benchmarks' ``--write`` does).

Each benchmark owns the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; a section not in the file yet is appended.
"""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def markers(name: str) -> tuple[str, str]:
    """``(begin, end)`` comment lines around section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, section: str, path: str = RESULTS) -> str:
    """Put ``section`` (markers included) in place of section ``name`` of ``path``; returns the path."""
    begin, end = markers(name)
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    return path


def cpu_description() -> str:
    """The CPU a section was measured on, as RESULTS.md names machines: model, family, the flags that
    change graphopt's kernels (VNNI: int8; avx512_bf16 / AMX: bf16)."""
    import platform

    model, family, flags = platform.processor() or platform.machine(), "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and value:
                    model = value
                elif key == "cpu family":
                    family = value
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        return model
    wanted = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    extras = ", ".join(wanted) if wanted else ("AVX2, no VNNI, no native bf16" if "avx2" in flags else "no AVX2")
    return f"{model}{f' (CPU family {family})' if family else ''}, {extras}"
