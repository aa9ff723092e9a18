"""Benchmark grid, results records and reports."""
