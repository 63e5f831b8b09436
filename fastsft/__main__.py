"""``python -m fastsft``: the same as the ``fastsft`` console script."""

import sys

from fastsft.cli import main

sys.exit(main())
