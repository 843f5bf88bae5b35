"""Benchmark scripts (run as python -m bench.<name>); figures in docs/benchmarks.md."""
