"""Quantization building blocks that need no graph walk: the int8 input shift and the pair-safe check.

The linear sites the ``precision`` pass quantizes, their quantized weights
and the rewrite live in ``graphopt.passes.precision.quantized_linears`` (they
are built on the site layer, ``graphopt.passes.analysis.sites.linear``).

int8 with an input shift ``mu`` (the calibrated mean of each input channel,
used where it narrows the per-token range, :func:`input_shift`):

    linear(x, W, b)               -> graphopt.int8_linear(x, Wq, s, b + W @ mu, scheme, mu)

``W @ mu`` is computed in fp32 from the unquantized weight, so the component
every token shares (position/segment embeddings in the residual stream, the
near-uniform attention average of a random-weight model, the positive mean of
GELU outputs) is neither quantized in the activation nor multiplied by the
weight's rounding error. This is the channel-wise shift of Outlier
Suppression+ (Wei et al., 2023) with the mean as the shift.
"""

from __future__ import annotations

import operator

import torch

from graphopt.ops import int8_linear

#: centre an input only when that narrows its mean per-token range to this fraction or less
SHIFT_MIN_GAIN = 0.9


def input_shift(x: torch.Tensor, min_gain: float = SHIFT_MIN_GAIN) -> tuple[torch.Tensor | None, float]:
    """``(mu, gain)``: the per-channel mean of ``x`` (calibration activations) and how much it narrows the range.

    ``gain`` is ``mean_row(max|x - mu|) / mean_row(max|x|)``; ``mu`` is None
    when the gain is above ``min_gain`` (centring would cost a pass for nothing).
    """
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    if x2.shape[0] < 2:
        return None, 1.0
    mu = x2.mean(dim=0)
    plain = float(x2.abs().amax(dim=-1).mean())
    centred = float((x2 - mu).abs().amax(dim=-1).mean())
    gain = centred / plain if plain > 0 else 1.0
    return (mu if gain <= min_gain else None), gain


def weights_not_pair_safe(module: torch.nn.Module) -> list[str]:
    """Nodes of ``module`` (a GraphModule) whose int8 weights x86 kernels without VNNI would saturate.

    These are the full-range uint8 schemes' linears quantized with plain
    weights (``precision_int8_pair_safe=False``, the default on VNNI CPUs):
    exact here, but onnxruntime's ``MatMulInteger`` on an AVX2 CPU saturates
    them (graphopt's own op there falls back to its exact, slow reference).
    Used to warn when such a graph is exported.
    """
    graph = getattr(module, "graph", None)
    out = []
    for node in graph.nodes if graph is not None else ():
        if node.target is not torch.ops.graphopt.int8_linear.default or len(node.args) < 5:
            continue
        weight = node.args[1]
        if node.args[4] not in int8_linear.PAIR_SAFE_SCHEMES or getattr(weight, "op", None) != "get_attr":
            continue
        value = operator.attrgetter(weight.target)(module)
        if isinstance(value, torch.Tensor) and not int8_linear.is_pair_safe(value):
            out.append(node.name)
    return out
