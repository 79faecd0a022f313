"""Metrics to TensorBoard event files and `metrics.jsonl` in the workdir (process 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax


class MetricsWriter:
  """One JSON object per line: {"step": N, "train/loss": ..., ...}; the same scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, Any], prefix: str):
    if not self.enabled:
      return
    values = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def quiet_library_logs():
  """Keep absl INFO for this project; Orbax and JAX log every save and compile at INFO."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _Filter(std_logging.Filter):

    def filter(self, record):
      noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "jax", "etils"))
      return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(_Filter())
