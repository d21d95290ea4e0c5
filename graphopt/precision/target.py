"""What a target runs fast, as far as precision is concerned.

:class:`PrecisionTarget` says which int8 activation scheme has a fast kernel
(``per_token_sym_u8``: oneDNN on x86 CPUs where its probe passes;
``per_token_u8``: fbgemm where its saturation probe passes, else ``per_token_u7``; ``per_token_s8``: ``torch._int_mm`` on CUDA), whether
fp8 e4m3 matmuls exist (CUDA compute capability >= 8.9), whether int8 weights
must be pair-safe for that kernel (no VNNI), and which float
formats have native arithmetic (:func:`native_float_formats`). ``auto`` only
measures bf16 where the target has native bf16 units: without them (the AVX2
CPUs this project is developed on, where bf16 emulation measured 4x slower
than fp32) bf16 is never a candidate, however a noisy microbenchmark turns
out. Whether a candidate is *faster* is never assumed here: ``auto`` measures
it (:mod:`.speed`).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from graphopt.ops import fp8_linear, weight_only_linear
from graphopt.target.int8_kernels import fbgemm_available
from graphopt.target.probes import KernelProbes, cpu_flags

log = logging.getLogger(__name__)

__all__ = ["CPU_FLAGS", "PrecisionTarget", "cpu_flags", "native_float_formats"]

#: CPU feature flags (``/proc/cpuinfo``) that give a float format native arithmetic
CPU_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),  # x86 AVX512-BF16 / AMX; Arm FEAT_BF16 ("bf16" in Features)
    "fp16": ("avx512_fp16", "amx_fp16", "asimdhp"),  # x86 AVX512-FP16 / AMX-FP16; Arm half-precision SIMD
}


def native_float_formats(device: torch.device | str, flags: Iterable[str] | None = None) -> frozenset[str]:
    """Which of ``bf16`` / ``fp16`` this target computes natively.

    CPU: from the feature flags (``flags``, default: this machine's
    ``/proc/cpuinfo``); a CPU whose flags are unknown (not Linux) gets none,
    so ``auto`` stays with fp32 and int8 there. CUDA: fp16 always, bf16 from
    compute capability 8.0 (Ampere).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return frozenset()
        major, _ = torch.cuda.get_device_capability(device)
        return frozenset({"fp16"} | ({"bf16"} if major >= 8 else set()))
    if device.type != "cpu":
        return frozenset()
    have = frozenset(flags) if flags is not None else cpu_flags()
    return frozenset(fmt for fmt, names in CPU_FLAGS.items() if have & set(names))


@dataclass(frozen=True)
class PrecisionTarget:
    """Capabilities of the device a model is optimized for.

    ``int8_scheme``: activation scheme of ``graphopt::int8_linear`` with a fast
    kernel here (None: only the reference implementation). ``fp8``: fp8 e4m3
    matmuls through ``torch._scaled_mm``. ``native_floats``: float formats
    with native arithmetic (``{"bf16", "fp16"}`` or a subset); ``auto``
    considers bf16 only when it is listed. ``int8_pair_safe``: int8 weights
    must be pair-safe for the scheme's kernel (x86 without VNNI; probed by
    :meth:`graphopt.target.probes.KernelProbes.weights_need_pair_safety`); False gives
    plain per-channel weights, a finer step. Tests build targets by hand to
    inject capabilities.
    """

    device: torch.device
    int8_scheme: str | None
    fp8: bool
    native_floats: frozenset[str] = field(default_factory=frozenset)
    #: quantize int8 weights pair-safe (the scheme's kernel saturates plain weights here: no VNNI)
    int8_pair_safe: bool = True
    #: weight-only modes with a kernel here (``"int8wo"``: ``torch._weight_int8pack_mm``, ``"int4"``: torch's
    #: int4 kernels; :mod:`graphopt.ops.weight_only_linear`); empty in hand-built targets unless given
    weight_only: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def detect(cls, device: torch.device | str, cpu_flags: Iterable[str] | None = None,
               probes: KernelProbes | None = None) -> "PrecisionTarget":
        """The capabilities of ``device``, from the kernel probes (``probes``: the optimizer's
        ``ctx.target.probes``, or probed afresh) and the CPU flags (``cpu_flags`` injects them)."""
        device = torch.device(device)
        probes = probes or KernelProbes()
        floats = native_float_formats(device, probes.cpu_flags if cpu_flags is None else cpu_flags)
        wo = frozenset(m for m, has in (("int8wo", weight_only_linear.int8_kernel(device)),
                                        ("int4", weight_only_linear.int4_kernel(device))) if has)
        if device.type == "cuda":
            return cls(device, "per_token_s8", fp8_linear.fp8_supported(device), floats, weight_only=wo)
        if device.type == "cpu" and probes.onednn_u8_exact:
            return cls(device, "per_token_sym_u8", False, floats, probes.weights_need_pair_safety("per_token_sym_u8"),
                       wo)
        if device.type == "cpu" and fbgemm_available():
            scheme = "per_token_u8" if probes.fbgemm_u8_exact else "per_token_u7"
            return cls(device, scheme, False, floats, probes.weights_need_pair_safety(scheme), wo)
        return cls(device, None, False, floats, False, wo)

    def auto_candidates(self, int4: bool = False) -> list[str]:
        """Precisions ``auto`` benchmarks on this target (it keeps only the faster ones).

        ``int4``: the user's error budget admits int4 (see ``passes/precision/run.py``, ``INT4_BUDGET``);
        without it int4 is never a candidate, however fast it measures. The weight-only ops compute in
        bf16, so, like bf16, they are candidates only where the target has native bf16 (measured fast on
        AVX512-BF16; never measured on a CPU without it).
        """
        out = ["fp8"] if self.fp8 else []
        bf16 = "bf16" in self.native_floats
        if int4 and bf16 and "int4" in self.weight_only:
            out.append("int4")
        if self.int8_scheme is not None:
            out.append("int8")
        if bf16 and "int8wo" in self.weight_only:
            out.append("int8wo")
        if "bf16" in self.native_floats:
            out.append("bf16")
        return out

    def fp8_unsupported_reason(self) -> str:
        return (f"fp8 needs CUDA with compute capability >= 8.9 (torch._scaled_mm); this target is "
                f"{self.device.type}: use precision='int8', 'bf16' or 'auto'")

    def weight_only_unsupported_reason(self, mode: str) -> str:
        kernel = ("torch._weight_int8pack_mm (CPU)" if mode == "int8wo" else
                  "torch._weight_int4pack_mm_for_cpu (CPU) or torch._weight_int4pack_mm (CUDA)")
        return (f"{mode} needs {kernel}; this target ({self.device.type}, torch {torch.__version__}) has none, "
                f"and the dequantizing reference is no faster than fp32: use precision='int8', 'bf16' or 'auto'")

    def no_native_float_reason(self, fmt: str) -> str:
        where = f"{platform.machine() or 'this'} CPU" if self.device.type == "cpu" else self.device.type
        flags = ", ".join(CPU_FLAGS.get(fmt, ())) if self.device.type == "cpu" else "compute capability >= 8.0"
        return f"no native {fmt} on this target ({where}; needs {flags})"

    def describe(self) -> str:
        floats = ", ".join(sorted(self.native_floats)) or "none"
        weights = "pair-safe" if self.int8_pair_safe else "plain"
        wo = ", ".join(sorted(self.weight_only)) or "none"
        return (f"{self.device.type} (int8 kernel: {self.int8_scheme or 'reference only'}, {weights} int8 weights, "
                f"fp8: {self.fp8}, native bf16/fp16: {floats}, weight-only kernels: {wo})")
