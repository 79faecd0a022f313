"""From host-local numpy batches to global `jax.Array`s sharded over the mesh's batch axes.

Each process hands over only its own rows (`jax.make_array_from_process_local_data`), so no host ever
holds the global batch. A background thread keeps a few batches ready, and remembers the source's
position after each one so a checkpoint records exactly what the train step has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
import queue
import threading
from typing import Any, Protocol

import jax
from jax.sharding import Mesh
import numpy as np

from pretrain import sharding

BATCH_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
              "masked_lm_weights", "next_sentence_labels")


class Source(Protocol):
  """What the loop needs of a data source: host-local batches and a resumable position."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


def batch_shardings(mesh: Mesh) -> dict[str, jax.sharding.NamedSharding]:
  ndims = {k: 1 if k == "next_sentence_labels" else 2 for k in BATCH_KEYS}
  return {k: sharding.batch_sharding(mesh, n) for k, n in ndims.items()}


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  shardings = batch_shardings(mesh)
  missing = sorted(set(BATCH_KEYS) - set(local_batch))
  if missing:
    raise KeyError(f"batch lacks {missing}; a pretraining batch needs {list(BATCH_KEYS)}")
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local_batch[k]))
          for k in BATCH_KEYS}


class Prefetcher(Iterator):
  """Reads `source` `size` batches ahead on a thread and puts them on the devices.

  `state()` is the source's position just after the last batch handed out, which is what a
  checkpoint must record: batches read ahead but not trained on are read again after a restart.
  """

  def __init__(self, source: Source, mesh: Mesh, size: int = 2):
    self._source, self._mesh = source, mesh
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._state = source.get_state()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name="prefetch")
    self._thread.start()

  def _fill(self):
    try:
      while not self._stop.is_set():
        local = next(self._source)
        item = (to_global(local, self._mesh), self._source.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # surfaced to the consumer on its next call
      self._queue.put(e)

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def state(self) -> dict[str, Any]:
    return dict(self._state)

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
