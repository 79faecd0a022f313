"""Taking turns on one GPU between our benchmark and its PyTorch peer (separate processes).

No jax or torch here: tools/bench/torch_peer.py imports this and must never load jax.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time


@contextlib.contextmanager
def gpu_lock(path: str | None):
  """An exclusive file lock around a timed section, shared with a peer process (no-op if None)."""
  if not path:
    yield
    return
  with open(path, "a+", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
  time.sleep(0.3)   # let a waiting process take its turn


def wait_for(path: str | None, timeout_s: float) -> bool:
  """Waits until `path` exists (the other side finished compiling); False on timeout."""
  if not path:
    return True
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if os.path.exists(path):
      return True
    time.sleep(0.5)
  return False
