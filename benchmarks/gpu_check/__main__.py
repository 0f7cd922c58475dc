"""``python -m benchmarks.gpu_check`` (= ``make gpu-check``)."""

import sys

from benchmarks.gpu_check.cli import main

sys.exit(main())
