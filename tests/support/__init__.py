"""Helpers shared by the tests: model builders, strategies, ONNX runners, checks."""
