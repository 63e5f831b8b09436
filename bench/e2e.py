"""The end-to-end SFT benchmark under its short name: ``python -m bench.e2e`` runs ``python -m bench.bench_sft``
with the same flags (``--help`` lists them; the module docstring of ``bench.bench_sft`` says what it measures)."""

import sys

from bench.bench_sft import main

if __name__ == "__main__":
    sys.exit(main())
