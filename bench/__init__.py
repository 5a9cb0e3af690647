"""Benchmark scripts (run them as ``python bench/<name>.py``; see docs/benchmarks.md)."""
