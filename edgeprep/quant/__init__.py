"""Quantization-aware training (issue 4). So far: the fake-quantization primitives in ``fake``."""
