"""Timing and result files shared by the kernel benchmarks (bench_attention, bench_residual_norm).

No flags here, so both tools can import it without defining a flag twice.
"""

from __future__ import annotations

import json
import statistics
import time

import jax


def median_seconds(fn, *args, windows: int, calls: int) -> float:
  """Median seconds per call, windows of back-to-back calls, after compilation and warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def append_jsonl(path: str | None, rows: list[dict]):
  """Append `rows` to the JSON-lines file `path` (nothing if None), each with the device's name."""
  if not path:
    return
  device = jax.devices()[0].device_kind
  with open(path, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(dict(device=device, **row)) + "\n")
