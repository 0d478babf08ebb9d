"""Benchmarks: standalone scripts that print measurements; not tests."""
