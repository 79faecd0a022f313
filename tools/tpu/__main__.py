"""`python -m tools.tpu ...`: the Cloud TPU VM launcher's command line (tools/tpu/cli.py)."""

from __future__ import annotations

import sys

from tools.tpu.cli import main

if __name__ == "__main__":
  sys.exit(main())
