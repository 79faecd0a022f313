"""Running one cell: finetune/train.py's `run` on the cell's config, in this process or in a worker.

Workers are spawned processes, each importing JAX itself after its environment is set: on a GPU
machine several small fine-tunes share a GPU (no preallocation, a share of its memory each), and
with several GPUs each worker keeps to one. Nothing here imports JAX at module level, so a worker's
environment is in place before JAX reads it.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import time
from typing import Any


def _gpu_ids() -> list[str]:
  """The GPUs this process may use: CUDA_VISIBLE_DEVICES, else the /dev/nvidiaN devices."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [g for g in visible.split(",") if g.strip()]
  return sorted((p[len("/dev/nvidia"):] for p in glob.glob("/dev/nvidia[0-9]*")), key=int)


def worker_environments(workers: int) -> list[dict[str, str]]:
  """Per worker: its GPU (round robin, where there are several) and its share of GPU memory, unless
  the user set XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_PREALLOCATE already."""
  gpus = _gpu_ids()
  per_gpu = math.ceil(workers / max(len(gpus), 1))
  shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / per_gpu:.2f}"}
  shared = {k: v for k, v in shared.items() if k not in os.environ}
  if len(gpus) > 1:
    return [{**shared, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(workers)]
  return [dict(shared) for _ in range(workers)]


def start_worker(slots, environments: list[dict[str, str]]):
  """ProcessPoolExecutor initializer: takes a free worker number and that worker's environment."""
  os.environ.update(environments[slots.get()])


def run_cell(config, workdir: str) -> dict[str, Any]:
  """Fine-tunes one cell into `workdir`; its progress bar and step lines go to workdir/log.txt.
  Returns the metrics of its one evaluation, its steps and its wall seconds (compiling included)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from finetune import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  logging.set_verbosity(logging.WARNING)   # the curve prints one line per cell instead
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8") as log, \
      contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    results = train.run(config, workdir)
  run = results["runs"][0]
  return {"metrics": run["metrics"], "steps": run["best_step"],
          "seconds": round(time.perf_counter() - start, 1)}
