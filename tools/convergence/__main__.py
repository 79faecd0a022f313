"""python -m tools.convergence: see tools/convergence/__init__.py."""

import sys

from tools.convergence.cli import main

if __name__ == "__main__":
  sys.exit(main())
