"""The site layer: one typed site per graph concept, found by one walk, read by every pass.

Site kinds:

- attention (:mod:`.attention`: :class:`AttentionSite`, anchored at a softmax; read by
  fuse_attention, the blocked planner, analyze and the viewer);
- linear (:mod:`.linear`: ``LinearSite``, an activation times a 2-D weight; read by
  merge_matmuls, tensor_parallel, precision and the blocked planner);
- FFN chain (:mod:`.ffn`: ``FFNChain``, read by the ``ffn_chains`` analysis, analyze, the viewer
  and the blocked planner);
- LM head (:mod:`.lm_head`: ``LMHeadSite``).

Each finder declines through :mod:`graphopt.pattern` (a site's ``declined`` reason or a raised
``Decline``), so every reason in the report comes from one place.
"""

from graphopt.passes.analysis.sites.attention import AttentionSite, MaskTerm, find_attention_sites

__all__ = ["AttentionSite", "MaskTerm", "find_attention_sites"]
