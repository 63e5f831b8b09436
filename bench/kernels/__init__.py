"""The kernel suite: pytest-benchmark, one module per op, every provider in one run (see bench/README.md)."""
