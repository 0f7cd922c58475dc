"""Benchmarks and acceptance runs on real data (``python -m benchmarks.<name> --help``)."""
