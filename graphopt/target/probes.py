"""Kernel probes: what this machine's int8 kernels compute exactly, and which float formats its CPU has.

The int8 kernels of ``graphopt::int8_linear`` multiply uint8 activations by
int8 weights. Without VNNI (AVX2), fbgemm and oneDNN add the products of
adjacent input channels in int16 *with saturation*; with VNNI they accumulate
in int32. Which one a machine does is probed, not assumed: each probe runs a
kernel once on adversarial values and compares with the exact product.

* :func:`fbgemm_u8_exact`, :func:`onednn_u8_exact` -- pair-safe weights with
  8-bit activations at 255 give exact products;
* :func:`fbgemm_plain_exact`, :func:`onednn_plain_exact` -- *any* int8
  weights do (VNNI or AMX);
* :func:`cpu_flags` -- the CPU's feature flags (``/proc/cpuinfo``).

The functions run their probe on every call; :class:`KernelProbes` runs each
at most once and keeps the answer. The optimizer keeps one on its context
(:class:`graphopt.target.TargetInfo`); code without a context creates one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from graphopt.target.int8_kernels import (
    SYM_ZERO_POINT, _exact_u8_product, _onednn_gemm, _onednn_pack, _pack, fbgemm_available, is_pair_safe,
    onednn_available,
)

log = logging.getLogger(__name__)

__all__ = ["KernelProbes", "cpu_flags", "fbgemm_u8_exact", "fbgemm_plain_exact", "onednn_u8_exact",
           "onednn_plain_exact"]

#: probe weight rows (repeated over 64 input channels, and negated): pair-safe, with the large values
#: placed so that a pairing other than ``(2i, 2i+1)`` (``(2i+1, 2i+2)``, ``(i, i+2)``) would saturate
_PAIR_SAFE_PATTERNS = [(64, 64), (127, 1, 1, 127), (127, 1, 127, 1), (-64, -64), (-127, -1, -1, -127),
                       (100, 28, -128, 0)]
#: plain weights whose adjacent channels are both at +-127: ``vpmaddubsw``'s int16 pair sum
#: (``255 * 254``) saturates on them
_PLAIN_PATTERNS = [(127, 127), (-127, -127), (127, 127, -127, -127), (127, -127, 127, 127)]
_PROBE_K = 64


def _probe_weights(patterns: list[tuple[int, ...]]) -> torch.Tensor:
    rows = [torch.tensor(p * (_PROBE_K // len(p)), dtype=torch.int8) for p in patterns]
    return torch.stack(rows + [-r for r in rows])


def _fbgemm_exact(w: torch.Tensor, what: str) -> bool:
    """fbgemm's dynamic linear with 8-bit activations at 255 against ``w``, vs the exact product."""
    if not fbgemm_available():
        return False
    x = torch.ones(4, _PROBE_K)
    x[:, 0] = 0.0  # min 0, max 1: every other activation quantizes to 255
    s = torch.full((w.shape[0],), 0.01)
    try:
        got = torch.ops.quantized.linear_dynamic(x, _pack(w, s), False).double()
    except Exception as exc:  # pragma: no cover - kernel missing at run time
        log.info("fbgemm %s probe failed to run: %s", what, exc)
        return False
    return bool(torch.allclose(got, _exact_u8_product(x, w, s), rtol=1e-6, atol=1e-6))


def _onednn_exact(w: torch.Tensor, what: str) -> bool:
    """oneDNN's u8 x s8 GEMM on activations at 255 (and 0, 1, 128) against ``w``, vs the exact product."""
    if not onednn_available():
        return False
    q = torch.full((4, _PROBE_K), 255, dtype=torch.uint8)
    q[1, ::2] = 0
    q[2, 1::2] = 1
    q[3, ::4] = SYM_ZERO_POINT
    s = torch.full((w.shape[0],), 0.01)
    try:
        got = _onednn_gemm(q, _onednn_pack(w), s, torch.zeros(w.shape[0], dtype=torch.long)).double()
    except Exception as exc:  # pragma: no cover - kernel missing at run time
        log.info("oneDNN %s probe failed to run: %s", what, exc)
        return False
    exact = ((q.double() - SYM_ZERO_POINT) @ w.double().t()) * s.double()
    return bool(torch.allclose(got, exact, rtol=1e-6, atol=1e-6))


def _pair_safe_probe_weights() -> torch.Tensor:
    w = _probe_weights(_PAIR_SAFE_PATTERNS)
    if not is_pair_safe(w):  # pragma: no cover - the patterns are built pair-safe
        raise AssertionError("probe weights must be pair-safe")
    return w


def fbgemm_u8_exact() -> bool:
    """Probe: do pair-safe weights give exact int32 products with 8-bit activations on fbgemm here?

    Activations at 255 (the top of the uint8 range) against weights whose
    adjacent-channel sums sit at the limit, with both signs and with the large
    values placed so that a different pairing would saturate
    (``_PAIR_SAFE_PATTERNS``). True on VNNI CPUs (no int16 step) and on
    AVX2 fbgemm (pairs ``(2i, 2i+1)``); False sends ``per_token_u8`` to the
    reference implementation and makes the precision pass choose ``per_token_u7``.
    """
    ok = _fbgemm_exact(_pair_safe_probe_weights(), "u8")
    if not ok and fbgemm_available():
        log.info("fbgemm saturates pair-safe weights with 8-bit activations here: using per_token_u7")
    return ok


def onednn_u8_exact() -> bool:
    """Probe: does oneDNN give exact int32 products for full-range uint8 activations and pair-safe weights?

    The adversarial pair-safe weights of :func:`fbgemm_u8_exact`. False (or
    oneDNN missing) makes the precision pass use fbgemm's schemes instead.
    """
    ok = _onednn_exact(_pair_safe_probe_weights(), "u8")
    if not ok and onednn_available():
        log.info("oneDNN saturates pair-safe weights with 8-bit activations here: not using per_token_sym_u8")
    return ok


def onednn_plain_exact() -> bool:
    """Probe: does oneDNN's u8 x s8 GEMM give exact int32 products for *any* int8 weights here?

    True on CPUs where oneDNN multiplies with VNNI (``vpdpbusd`` accumulates
    u8 x s8 products straight into int32) or AMX; False on AVX2 without VNNI,
    where the int16 pair step saturates (``_PLAIN_PATTERNS``). Where True,
    weights need not be pair-safe: a finer weight step for free.
    """
    return _onednn_exact(_probe_weights(_PLAIN_PATTERNS), "plain-weight")


def fbgemm_plain_exact() -> bool:
    """Probe: does fbgemm's dynamic linear (8-bit activations) give exact products for any int8 weights?

    True on VNNI CPUs, False on AVX2 (int16 pair saturation); see :func:`onednn_plain_exact`.
    """
    return _fbgemm_exact(_probe_weights(_PLAIN_PATTERNS), "plain-weight")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """Feature flags of this CPU (``flags`` on x86, ``Features`` on Arm); empty where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


class KernelProbes:
    """This machine's probe results, each probe run at most once (on first use) per instance."""

    def __init__(self) -> None:
        self._results: dict[str, Any] = {}

    def _once(self, name: str, probe: Callable[[], Any]) -> Any:
        if name not in self._results:
            self._results[name] = probe()
        return self._results[name]

    @property
    def fbgemm_u8_exact(self) -> bool:
        """:func:`fbgemm_u8_exact`, probed once."""
        return self._once("fbgemm_u8_exact", fbgemm_u8_exact)

    @property
    def onednn_u8_exact(self) -> bool:
        """:func:`onednn_u8_exact`, probed once."""
        return self._once("onednn_u8_exact", onednn_u8_exact)

    @property
    def fbgemm_plain_exact(self) -> bool:
        """:func:`fbgemm_plain_exact`, probed once."""
        return self._once("fbgemm_plain_exact", fbgemm_plain_exact)

    @property
    def onednn_plain_exact(self) -> bool:
        """:func:`onednn_plain_exact`, probed once."""
        return self._once("onednn_plain_exact", onednn_plain_exact)

    @property
    def cpu_flags(self) -> frozenset[str]:
        """:func:`cpu_flags` of this machine, read once."""
        return self._once("cpu_flags", cpu_flags)

    def weights_need_pair_safety(self, scheme: str) -> bool:
        """True when ``scheme``'s kernel on this machine saturates plain int8 weights (quantize them pair-safe).

        Only the full-range uint8 schemes can saturate, and only on kernels
        without VNNI (:func:`onednn_plain_exact`, :func:`fbgemm_plain_exact`).
        """
        if scheme == "per_token_sym_u8":
            return not self.onednn_plain_exact
        if scheme == "per_token_u8":
            return not self.fbgemm_plain_exact
        return False
