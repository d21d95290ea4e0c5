"""The site layer: one typed site per graph concept (attention, linear, FFN chain, LM head)."""
