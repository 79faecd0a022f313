"""Ahead-of-time fit check (`python -m tools.aot_compile`; usage in __main__.py): compiles the real
train step for a TPU topology with compile-only devices, no TPU attached.

  topology.py  slice names (v5e-16, v4-32, GEN:AxB[xC]) -> Topology; HBM; compile-only devices
  report.py    lower + compile the train step, the per-chip memory report and its text
  search.py    the largest per-chip batch that fits (doubling, then bisection)
  __main__.py  the command line (absl flags)

Importing the package sets JAX_PLATFORMS (default "cpu") and ALLOW_MULTIPLE_LIBTPU_LOAD before
anything imports jax.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes /tmp/libtpu_lockfile so that one process owns the chips; compile-only devices own
# nothing, so several compiles (parallel tests, a training run on a TPU VM) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
