"""Benchmarks: each prints a table, writes JSON and a PNG, and measures ratios within one run."""
