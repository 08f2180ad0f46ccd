"""Benchmarks: each figure is measured beside its bare baseline in the same run."""
