"""Error norms of a candidate tensor against a reference, accurate and fast enough for every check.

:func:`finite_errors` gives ``(max |r - c|, ||r - c||, ||r||)`` over the
reference's finite elements (the verifier's relative L2 and max-abs);
:func:`norm_fp32_rows` the float32 norm it takes them with, accurate to about
1e-8 relative without a float64 copy of the tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = ["finite_errors", "norm_fp32_rows"]

_NORM_ROW = 4096


def norm_fp32_rows(t: torch.Tensor) -> float:
    """L2 norm of a float32 tensor, accurate to ~1e-8 relative: float32 norms of rows of 4096
    elements, combined in float64.

    One float32 norm over millions of elements is off by ~1e-4 relative
    (float32 accumulation); ``torch.linalg.vector_norm(t, dtype=torch.float64)``
    is exact but 15x slower here (it widens every element). Rows of 4096
    measured 1e-8 relative error on LM logits. Returns inf when a row's float32
    sum of squares overflows (values above ~1e19): the caller then takes an
    exact float64 path.
    """
    flat = t.reshape(-1)
    n = flat.numel()
    m = n // _NORM_ROW
    total = 0.0
    if m:
        rows = torch.linalg.vector_norm(flat[: m * _NORM_ROW].view(m, _NORM_ROW), dim=1).double()
        total += float(rows.square().sum())
    if n > m * _NORM_ROW:
        total += float(flat[m * _NORM_ROW:].double().square().sum())
    return math.sqrt(total)


def finite_errors(r: torch.Tensor, c: torch.Tensor) -> tuple[float, float, float] | None:
    """``(max |r - c|, ||r - c||, ||r||)`` over the elements where ``r`` is finite; None where ``c`` is
    not finite but ``r`` is.

    Common case first: real, at most 32-bit, both finite (which the norms
    show). The difference is taken in float32 (exact for close values,
    relative error 2^-24 otherwise) and the norms by :func:`norm_fp32_rows`
    without a float64 copy: about 5x faster than the general path on LM
    logits (4 x 128 x 50257 elements, 2 threads), which matters because the
    precision search compares dozens of candidates.
    """
    c = c.detach().to(r.device)
    r = r.detach()
    if not r.dtype.is_complex and not c.dtype.is_complex and r.element_size() <= 4 and c.element_size() <= 4:
        rf, cf = r.float(), c.float()
        if rf.numel() == 0:
            return 0.0, 0.0, 0.0
        diff = rf - cf
        diff_norm, ref_norm = norm_fp32_rows(diff), norm_fp32_rows(rf)
        # finite norms mean finite tensors; a non-finite one (or a float32 row norm that overflowed
        # on huge finite values) takes the exact float64 path below
        if math.isfinite(diff_norm) and math.isfinite(ref_norm):
            return float(torch.maximum(diff.amax(), diff.amin().neg())), diff_norm, ref_norm
    rf, cf = r.double(), c.double()
    finite_ref = torch.isfinite(rf)
    if bool((finite_ref & ~torch.isfinite(cf)).any()):
        return None
    diff = torch.where(finite_ref, rf - cf, torch.zeros_like(rf))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return max_abs, float(diff.norm()), float(torch.where(finite_ref, rf, torch.zeros_like(rf)).norm())
