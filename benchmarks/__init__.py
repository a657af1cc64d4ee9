"""Microbenchmarks (pytest-benchmark), the results format and the static kernel report."""
