"""python -m tools.convergence: see tools/convergence/__init__.py."""

import sys

from pretrain import console

if __name__ == "__main__":
  console.default_jax_platforms()        # before JAX is imported: no TPU probing without a TPU
  from tools.convergence.cli import main  # pylint: disable=g-import-not-at-top
  sys.exit(main())
