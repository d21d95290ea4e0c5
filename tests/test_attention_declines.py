"""Every reason fuse_attention declines a softmax, each from a minimal model, and the docs' one table of them.

Each case (``tests/support/attention_declines.py``) has one softmax; the
reason ``sdpa_decline`` gives names the construct (mask, bias, soft-cap,
projection, softmax dim, dropout in training, ...) and is what the report
lists. docs/attention.md's *Near misses* table lists exactly these reasons,
plus the ones tested where their set-up lives (named in ``ELSEWHERE``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.support import attention_cases as C
from tests.support.attention_declines import CASES
import graphopt
from graphopt.passes.analysis.sites import find_attention_sites
from graphopt.passes.attention import FuseAttention, sdpa_decline
from graphopt.passes.blocked import BlockedOperators

DOCS = Path(__file__).resolve().parent.parent / "docs" / "attention.md"

#: documented reasons whose test needs more than a minimal model, and where it is
ELSEWHERE = {
    "batch*heads are flattened and the shapes are dynamic": "test_attention_forms.py (dynamic shapes)",
    "rolled back: the fused site fails the numeric check": "test_attention_forms.py (a broken rewrite)",
    "is_causal:": "test_attention_forms.py and test_sdpa_gqa.py (masks not provably causal)",
}


def _documented_reasons() -> list[str]:
    """The first column of the *Near misses* table: each reason as written, with ``<...>`` placeholders."""
    text = DOCS.read_text()
    section = text[text.index("## Near misses"):]
    section = section[:section.index("\n## ", 3)]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def _matches(documented: str, reason: str) -> bool:
    """Every fixed part of the documented reason (between `<...>` and `...` placeholders) appears, in order."""
    pattern = ".*".join(re.escape(part) for part in re.split(r"<[^>]+>|\.\.\.", documented))
    return re.search(pattern, reason) is not None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_decline_names_its_construct(case):
    torch.manual_seed(0)
    model = case.model().eval()
    gm = graphopt.capture(model, case.args()).module
    (site,) = find_attention_sites(gm)
    blocked = bool(case.options)
    reason = sdpa_decline(site, leave_learned=blocked)
    assert reason is not None and case.reason in reason, reason
    passes = [FuseAttention(), BlockedOperators()] if blocked else [FuseAttention()]
    result = graphopt.optimize(model, case.args(), passes=passes, verify=False, **case.options)
    record = result.report.record("fuse_attention")
    assert record.status == "unchanged"
    assert [d.reason for d in record.declined] == [reason]
    assert C.sdpa_nodes(result.module) == []
    assert any(_matches(doc, reason) for doc in _documented_reasons()), f"not in docs/attention.md: {reason}"


def test_docs_table_lists_only_tested_reasons():
    documented = _documented_reasons()
    assert len(documented) >= len(CASES)
    reasons = []
    for case in CASES:
        torch.manual_seed(0)
        (site,) = find_attention_sites(graphopt.capture(case.model().eval(), case.args()).module)
        reasons.append(sdpa_decline(site, leave_learned=bool(case.options)))
    untested = [d for d in documented if not any(_matches(d, r) for r in reasons)
                and not any(d.startswith(k) for k in ELSEWHERE)]
    assert untested == []


def test_gemma2_soft_cap_named_in_the_report_and_the_viewer(tmp_path):
    """Gemma 2 (eager, soft-capped scores): both sites declined as a soft-cap, in the report and the viewer."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                    use_cache=False, attn_logit_softcapping=50.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    result = graphopt.optimize(model, (ids,))
    declined = result.report.record("fuse_attention").declined
    assert [d.reason for d in declined] == ["tanh soft-cap (cap 50.0): SDPA cannot apply it"] * 2
    assert "tanh soft-cap (cap 50.0): SDPA cannot apply it" in str(result.report)
    path = graphopt.visualize(result, tmp_path / "gemma2.html")
    assert "tanh soft-cap (cap 50.0): SDPA cannot apply it" in Path(path).read_text()


def test_gemma2_soft_capped_attention_runs_blocked_under_a_memory_budget():
    """The blocked operator takes the soft-cap SDPA cannot: with a budget Gemma 2's attention is blocked
    (softcap 50.0 on the op) and matches eager on fresh inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                       use_cache=False, attn_logit_softcapping=50.0, final_logit_softcapping=None,
                                       attn_implementation="eager")
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 256))
    result = graphopt.optimize(model, (ids,), memory_budget="1MiB")
    blocked = [n for n in result.module.graph.nodes if n.target is torch.ops.graphopt.blocked_attention.default]
    assert len(blocked) == 2 and all(n.args[9] == 50.0 for n in blocked), blocked
    fresh = torch.randint(0, 128, (2, 256))
    with torch.no_grad():
        want, got = model(fresh).logits, result.module(fresh).logits
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert result.report.extra["blocked"]["measured_peak_after"] <= 2**20


def test_a_bias_between_the_tanh_and_its_cap_is_declined_not_blocked_wrong():
    """(tanh(s / c) + b) * c scales the bias by c: the blocked operator (bias after the cap) cannot take it."""
    class BiasInsideTheCap(torch.nn.Module):
        def forward(self, q, k, v, b):
            s = q @ k.transpose(-2, -1) * 0.25
            return torch.softmax((torch.tanh(s / 5.0) + b) * 5.0, -1) @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) * 4 for _ in range(3))
    b = torch.randn(1, 2, 64, 64, generator=g)
    result = graphopt.optimize(BiasInsideTheCap(), (q, k, v, b), block_q=8)
    record = result.report.record("blocked")
    assert record.status == "unchanged", record
    assert [d.reason for d in record.declined] == ["add: a bias or mask between the tanh and its cap"]
