"""Benchmarks and acceptance runs on real data (``python -m ops.benchmarks.<name> --help``)."""
