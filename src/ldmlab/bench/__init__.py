"""Benchmarks that write their numbers into docs/BENCHMARKS.md (run by hand, not as timed tests)."""
