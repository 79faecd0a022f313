"""Host-side batching for fine-tuning: in-memory feature arrays -> global arrays on the mesh.

Task data is small enough to hold on every host. Each process hands over only its contiguous part of
every global batch (`jax.make_array_from_process_local_data`); prediction pads the last batch to full
size and drops the padded rows' outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

from pretrain import sharding

INPUT_KEYS = ("input_ids", "input_mask", "segment_ids")


def batch_shardings(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  placements = batch_shardings(mesh, local)
  return {k: jax.make_array_from_process_local_data(placements[k], v) for k, v in local.items()}


def _local_rows(global_rows: np.ndarray) -> np.ndarray:
  """This process's contiguous part of a global batch's row indices."""
  n = len(global_rows) // jax.process_count()
  return global_rows[jax.process_index() * n:(jax.process_index() + 1) * n]


def train_batches(features: dict[str, np.ndarray], keys: tuple[str, ...], batch_size: int,
                  seed: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless host-local batches, a fresh permutation every epoch; the last partial batch dropped."""
  n = len(features["input_ids"])
  epoch = 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      rows = _local_rows(order[start:start + batch_size])
      batch = {k: features[k][rows] for k in keys}
      batch["weight"] = np.ones(len(rows), np.float32)
      yield batch
    epoch += 1


def predict(predict_step, params, features: dict[str, np.ndarray], batch_size: int, mesh: Mesh
            ) -> np.ndarray:
  """`predict_step`'s outputs for every row of `features`; the last batch is padded to full size
  with copies of row 0, whose outputs are dropped."""
  n = len(features["input_ids"])
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    rows = _local_rows(np.where(valid, rows, 0))
    batch = {k: features[k][rows] for k in INPUT_KEYS}
    out = predict_step(params, to_global(batch, mesh))
    outputs.append(np.asarray(jax.device_get(out))[:int(valid.sum())])
  return np.concatenate(outputs)
