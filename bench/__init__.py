"""Benchmarks: ratios measured inside one run; figures and commands in docs/benchmarks.md."""
