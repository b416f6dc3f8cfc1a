"""Benchmarks: each writes what it measured, with its configuration, side by side."""
