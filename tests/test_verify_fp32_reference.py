"""bf16/fp16 models: a rewrite as accurate as the model (against fp32) is not rolled back for missing 1e-2;
fp32 models are judged against fp64 the same way."""

from __future__ import annotations

import torch

from graphopt.verify import FP32_MATCH_MARGIN, Verifier


class Accumulating(torch.nn.Module):
    """Eight rounds of softmax-weighted updates: in bf16 the model drifts ~8e-2 from its fp32 run."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(8):
            x = torch.softmax(x @ self.w, -1) * 64 + x
            x = x - x.mean(-1, keepdim=True)
        return x


def _bf16_model_and_fp32_twin():
    torch.manual_seed(0)
    fp32 = Accumulating().eval()
    bf16 = Accumulating().eval()
    bf16.load_state_dict(fp32.state_dict())
    return bf16.bfloat16(), fp32


def test_a_rewrite_closer_to_fp32_than_the_model_passes_and_says_so():
    bf16, fp32 = _bf16_model_and_fp32_twin()
    x = torch.randn(4, 256, 64).bfloat16()
    verifier = Verifier(bf16, (x,), None)
    # computes in fp32 and rounds once at the end: far from the bf16 model, close to exact
    numerics = verifier.check(lambda x: fp32(x.float()).bfloat16())
    assert numerics.ok, numerics.reason
    assert numerics.rel_l2 > 1e-2  # it would have failed against the bf16 model alone
    judged = [o for o in numerics.outputs if o.fp32_rel_l2 is not None]
    assert judged and all(o.fp32_rel_l2 < o.model_fp32_rel_l2 for o in judged)
    assert "against fp32" in numerics.summary()
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # the user's model is not cast


def test_a_rewrite_less_accurate_than_the_model_still_fails():
    bf16, _ = _bf16_model_and_fp32_twin()
    x = torch.randn(4, 256, 64).bfloat16()
    verifier = Verifier(bf16, (x,), None)
    noise = torch.Generator().manual_seed(1)

    def worse(x):
        out = bf16(x)
        return out + 0.3 * out.float().std() * torch.randn(out.shape, generator=noise).to(out.dtype)

    numerics = verifier.check(worse)
    assert not numerics.ok
    assert "against fp32" in numerics.reason and f"{FP32_MATCH_MARGIN:g} x the model's own" in numerics.reason


def test_fp32_models_are_judged_against_fp64_and_a_wrong_rewrite_still_fails():
    _, fp32 = _bf16_model_and_fp32_twin()
    x = torch.randn(2, 16, 64)
    verifier = Verifier(fp32, (x,), None)
    numerics = verifier.check(lambda x: fp32(x) * (1 + 1e-3))
    assert not numerics.ok and "relative L2" in numerics.reason and "against fp64" in numerics.reason
    assert verifier.fp32_reference().available and verifier.fp32_reference().wide == torch.float64
    assert all(p.dtype == torch.float32 for p in fp32.parameters())  # the user's model is not cast
