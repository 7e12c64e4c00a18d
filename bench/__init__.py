"""Benchmarks for runsvc: ``make bench``."""
