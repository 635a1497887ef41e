"""python -m benchmarks.paper --preset quick|full [--out docs/results] (from the repository root)."""

import sys

from .run import main

sys.exit(main())
