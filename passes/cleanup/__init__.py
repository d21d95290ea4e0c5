"""Cleanup passes every optimizer has: dead code, CSE, constant folding, no-ops, conv+bn folding."""
