"""Benchmark suite of dps_kernels: ``python -m bench`` (see docs/benchmarks.md)."""
