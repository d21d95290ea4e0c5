"""What a target runs fast, as far as precision is concerned.

:class:`PrecisionTarget` says which int8 activation scheme has a fast kernel
(``per_token_u7``: fbgemm on x86 CPUs; ``per_token_s8``: ``torch._int_mm`` on
CUDA), whether fp8 e4m3 matmuls exist (CUDA compute capability >= 8.9), and
which precisions ``precision="auto"`` measures. Whether a precision is
*faster* is never assumed here: ``auto`` measures it (:mod:`.speed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt.ops import fp8_linear, int8_linear


@dataclass(frozen=True)
class PrecisionTarget:
    """Capabilities of the device a model is optimized for.

    ``int8_scheme``: activation scheme of ``graphopt::int8_linear`` with a fast
    kernel here (None: only the reference implementation). ``fp8``: fp8 e4m3
    matmuls through ``torch._scaled_mm``.
    """

    device: torch.device
    int8_scheme: str | None
    fp8: bool

    @classmethod
    def detect(cls, device: torch.device | str) -> "PrecisionTarget":
        device = torch.device(device)
        if device.type == "cuda":
            return cls(device, "per_token_s8", fp8_linear.fp8_supported(device))
        if device.type == "cpu" and int8_linear.fbgemm_available():
            return cls(device, "per_token_u7", False)
        return cls(device, None, False)

    def auto_candidates(self) -> list[str]:
        """Precisions ``auto`` benchmarks on this target (it keeps only the faster ones)."""
        out = ["fp8"] if self.fp8 else []
        if self.int8_scheme is not None:
            out.append("int8")
        return out + ["bf16"]

    def fp8_unsupported_reason(self) -> str:
        return (f"fp8 needs CUDA with compute capability >= 8.9 (torch._scaled_mm); this target is "
                f"{self.device.type}: use precision='int8', 'bf16' or 'auto'")

    def describe(self) -> str:
        return f"{self.device.type} (int8 kernel: {self.int8_scheme or 'reference only'}, fp8: {self.fp8})"
