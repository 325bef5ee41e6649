"""Benchmarks: one shared harness (``harness.py``), one module per suite."""
