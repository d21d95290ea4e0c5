"""The site layer: one typed site per graph concept, found by one walk, read by every pass.

Site kinds: attention (:class:`AttentionSite`, anchored at a softmax).
"""

from graphopt.passes.analysis.sites.attention import AttentionSite, MaskTerm, find_attention_sites

__all__ = ["AttentionSite", "MaskTerm", "find_attention_sites"]
