"""Readable PyTorch references, one module per op: the definition every backend is tested against.

They compute in float32 (or wider: float64 inputs stay float64) and favour clarity over speed.
"""
