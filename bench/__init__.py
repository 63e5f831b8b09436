"""fastsft benchmarks: one module per op (``bench_<op>.py``) plus the shared harness."""
