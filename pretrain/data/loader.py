"""From host-local numpy batches to global `jax.Array`s sharded over the mesh's batch axes.

Each process hands over only its own rows (`jax.make_array_from_process_local_data`), so no host ever
holds the global batch. A background thread keeps a few batches ready, and remembers the source's
position after each one so a checkpoint records exactly what the train step has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
import concurrent.futures
import os
import queue
import threading
from typing import Any, Protocol

import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from pretrain import sharding
from pretrain import storage
from pretrain.data import masking
from pretrain.data import shards
from pretrain.data.synthetic import SyntheticSource
from pretrain.data.tokenizer import check_tokenizer, load_tokenizer

# The one schema of a pretraining batch: key -> (dtype, dimensions after the batch dimension).
BATCH_SCHEMA = {
    "input_ids": (np.int32, ("seq",)),
    "input_mask": (np.int32, ("seq",)),
    "segment_ids": (np.int32, ("seq",)),
    "masked_lm_positions": (np.int32, ("predictions",)),
    "masked_lm_ids": (np.int32, ("predictions",)),
    "masked_lm_weights": (np.float32, ("predictions",)),
    "next_sentence_labels": (np.int32, ()),
}
BATCH_KEYS = tuple(BATCH_SCHEMA)


def batch_shapes(batch_size: int, seq_len: int, predictions: int
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every key of a batch of `batch_size` sequences."""
  sizes = {"seq": seq_len, "predictions": predictions}
  return {k: ((batch_size, *(sizes[d] for d in dims)), np.dtype(dtype))
          for k, (dtype, dims) in BATCH_SCHEMA.items()}


def abstract_batch(batch_size: int, seq_len: int, predictions: int, mesh: Mesh
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch as shapes, dtypes and shardings: what compiling a step ahead of its data needs."""
  shardings = batch_shardings(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
          for k, (shape, dtype) in batch_shapes(batch_size, seq_len, predictions).items()}


class Source(Protocol):
  """What the loop needs of a data source: host-local batches and a resumable position."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


def batch_shardings(mesh: Mesh) -> dict[str, jax.sharding.NamedSharding]:
  return {k: sharding.batch_sharding(mesh, 1 + len(dims)) for k, (_, dims) in BATCH_SCHEMA.items()}


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's batch -> global arrays sharded over the batch axes, in BATCH_SCHEMA's dtypes."""
  shardings = batch_shardings(mesh)
  missing = sorted(set(BATCH_KEYS) - set(local_batch))
  if missing:
    raise KeyError(f"batch lacks {missing}; a pretraining batch needs {list(BATCH_KEYS)}")
  return {k: jax.make_array_from_process_local_data(
              shardings[k], np.asarray(local_batch[k], BATCH_SCHEMA[k][0])) for k in BATCH_KEYS}


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
      try:
        self._queue.put(e, timeout=1)
      except queue.Full:        # nobody is reading any more (close() was called)
        pass

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, self._state = item
    return batch

  def state(self) -> dict[str, Any]:
    return dict(self._state)

  def close(self):
    """Stops the thread, and the source's own read-ahead if it has one."""
    self._stop.set()
    self._thread.join(timeout=5)
    if hasattr(self._source, "close") and not self._thread.is_alive():
      self._source.close()      # only once the thread has stopped: never under a read in flight


def block_permutation(n: int, block: int, rng: np.random.Generator) -> np.ndarray:
  """A permutation of range(n) made of whole blocks [k*block, (k+1)*block) (the last one may be
  short) in random order; `block` = 1 gives `rng.permutation(n)` itself."""
  starts = rng.permutation(-(-n // block)) * block
  lengths = np.minimum(block, n - starts)
  out_starts = np.cumsum(lengths) - lengths                # where each block lands in the output
  return np.repeat(starts - out_starts, lengths) + np.arange(n)


def shuffle_windows(order: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
  """`order` with the entries of each `window` consecutive positions (the last may be short)
  shuffled among themselves."""
  full = len(order) - len(order) % window
  return np.concatenate([rng.permuted(order[:full].reshape(-1, window), axis=1).ravel(),
                         rng.permutation(order[full:])])


class ShardSource:
  """Host-local batches from tokenized shards (see `pretrain.data.shards`), local or at a gs:// URL.

  The data set's N instances are cut into `process_count` contiguous, disjoint parts that cover it
  (sizes differ by at most one); this host reads only its part, reshuffles it every epoch with a
  seed of (seed, epoch, host) (`epoch_order`), and serves (N // process_count) // local_batch
  batches per epoch, so every host takes the same number of steps. In dynamic mode each batch gets
  fresh masks. The position (epoch, batch) is the state a checkpoint records.

  The order (`epoch_order`): with `read_block_records` K = 1 (the default) a random permutation of
  the part. With K > 1 the part's blocks of K neighbouring records (the last may be short) in a
  random order, then the records of each window of `window_batches` whole batches
  (`shuffle_window_records` rounded down to whole batches, at least one) shuffled among
  themselves: a window holds about shuffle_window_records / K blocks from all over the part. The
  shards' instances are shuffled when written (older shards keep a document's instances next to
  each other), so K trades range requests (a window costs about one per block) against how often
  records written side by side share a batch.

  Records are read a window at a time (with K = 1 a window is one batch): memory-mapped for local
  shards, by byte ranges for remote ones (`records`, a `shards.Records`), only this host's records.
  Since the order is known in advance, the windows that hold the next `read_ahead` batches
  (default: REMOTE_READ_AHEAD for remote shards, none for local ones; whole windows, so with K > 1
  and the default window the next one) are read on `read_threads` threads while earlier batches
  train. Neither the storage nor the read-ahead changes what a batch holds: batch k is the same
  records and masks either way, and `set_state` drops what was read ahead.
  """

  REMOTE_READ_AHEAD = 16
  SHUFFLE_WINDOW_RECORDS = 65_536

  def __init__(self, directory: str, *, split: str, global_batch_size: int, seed: int,
               max_seq_length: int, max_predictions_per_seq: int,
               dynamic_masking: masking.MaskingSpec | None = None,
               process_index: int = 0, process_count: int = 1, verify: bool = True,
               read_block_records: int = 1,
               shuffle_window_records: int = SHUFFLE_WINDOW_RECORDS,
               read_ahead: int | None = None, read_threads: int = 4):
    for key, value in (("read_block_records", read_block_records),
                       ("shuffle_window_records", shuffle_window_records)):
      if value < 1:
        raise ValueError(f"data.{key}={value} must be at least 1")
    manifest = shards.read_manifest(directory)
    creation = manifest["creation"]
    if creation["max_seq_length"] != max_seq_length:
      raise ValueError(f"data.max_seq_length={max_seq_length} but the shards in {directory} hold "
                       f"sequences of {creation['max_seq_length']}")
    self.static = creation["mode"] == "static"
    if self.static and creation["max_predictions_per_seq"] != max_predictions_per_seq:
      raise ValueError(f"data.max_predictions_per_seq={max_predictions_per_seq} but the static "
                       f"masks in {directory} have {creation['max_predictions_per_seq']} slots")
    if not self.static and dynamic_masking is None:
      raise ValueError(f"the shards in {directory} are unmasked (mode=dynamic): the loader needs "
                       "a masking spec")
    self.manifest = manifest
    total = sum(e["num_instances"] for e in shards.split_entries(directory, manifest, split))
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    self.local_batch = global_batch_size // process_count
    # Parts differ by at most one instance; every host serves as many batches as the smallest.
    self.part = (process_index * total // process_count,
                 (process_index + 1) * total // process_count)
    self.batches_per_epoch = (total // process_count) // self.local_batch
    if self.batches_per_epoch == 0:
      raise ValueError(f"split {split!r} of {directory} has {total} instances: fewer than one "
                       f"batch of {global_batch_size} (per host {self.local_batch})")
    self.records = shards.open_records(directory, split, verify=verify, rows=self.part,
                                        manifest=manifest)
    self.seed, self.process_index = seed, process_index
    self.max_predictions = max_predictions_per_seq
    self.masking = dynamic_masking
    self.read_block_records = read_block_records
    # Windows are whole batches, so a batch is read with its window; records one by one need no
    # mixing, and are read batch by batch.
    self.window_batches = (1 if read_block_records == 1
                           else max(1, shuffle_window_records // self.local_batch))
    self._epoch, self._batch = 0, 0
    self._order = None
    if read_ahead is None:
      read_ahead = self.REMOTE_READ_AHEAD if storage.is_remote(directory) else 0
    self.read_ahead = read_ahead
    self._pool = (concurrent.futures.ThreadPoolExecutor(read_threads, "shard-read")
                  if read_ahead else None)
    # (epoch, window) -> its records, read or being read: the current window and those ahead.
    self._windows: dict[tuple[int, int], concurrent.futures.Future] = {}

  def get_state(self) -> dict[str, Any]:
    state = {"epoch": self._epoch, "batch": self._batch}
    if self.read_block_records > 1:   # the order a position counts in (K = 1: none, as before)
      state.update(self._read_order())
    return state

  def set_state(self, state: dict[str, Any]):
    saved = {"read_block_records": int(state.get("read_block_records", 1))}
    if saved["read_block_records"] > 1:
      saved["shuffle_window_records"] = int(state["shuffle_window_records"])
    if saved != self._read_order():
      raise ValueError(
          "the checkpoint's data position counts batches in another read order: it was saved with "
          + ", ".join(f"data.{k}={v}" for k, v in saved.items()) + " but this run has "
          + ", ".join(f"data.{k}={v}" for k, v in self._read_order().items())
          + "; resume with the saved values, or start a new workdir")
    self._epoch, self._batch, self._order = int(state["epoch"]), int(state["batch"]), None
    self._drop_windows()

  def _read_order(self) -> dict[str, int]:
    """What, besides the seed and the batch size, fixes the order batches are counted in."""
    if self.read_block_records == 1:
      return {"read_block_records": 1}
    return {"read_block_records": self.read_block_records,
            "shuffle_window_records": self.window_batches * self.local_batch}

  def __iter__(self):
    return self

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Global instance indices of this host's part in the order of `epoch` (a permutation of the
    part; the first batches_per_epoch * local_batch of them are served)."""
    if self._order is None or self._order[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch, self.process_index])
      order = block_permutation(self.part[1] - self.part[0], self.read_block_records, rng)
      if self.read_block_records > 1:           # (blocks of one: the order of earlier runs)
        order = shuffle_windows(order, self.window_batches * self.local_batch, rng)
      self._order = (epoch, self.part[0] + order)
    return self._order[1]

  def indices(self, epoch: int, batch: int) -> np.ndarray:
    """Global instance indices of this host's batch `batch` of `epoch`."""
    return self.epoch_order(epoch)[batch * self.local_batch:(batch + 1) * self.local_batch]

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, batch = self._epoch, self._batch
    row = batch % self.window_batches * self.local_batch
    records = self._current_window()[row:row + self.local_batch]
    self._batch += 1
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    return self._to_batch(records, epoch, batch)

  def _current_window(self) -> np.ndarray:
    """The records of the window holding the current batch. Starts reading the windows that hold
    the next `read_ahead` batches (whole windows: with read-ahead, at least the next one), and
    forgets those behind."""
    ahead = -(-self.read_ahead // self.window_batches)
    wanted = list(self._upcoming_windows(1 + ahead))
    for key in set(self._windows) - set(wanted):
      self._windows.pop(key).cancel()
    for key in wanted:
      if key not in self._windows:
        self._windows[key] = self._submit(self.records.read, self._window_indices(*key))
    return self._windows[wanted[0]].result()

  def _upcoming_windows(self, count: int):
    """The next `count` windows (epoch, window), starting at the current one."""
    epoch, window = self._epoch, self._batch // self.window_batches
    for _ in range(count):
      yield epoch, window
      window += 1
      if window * self.window_batches >= self.batches_per_epoch:
        epoch, window = epoch + 1, 0

  def _window_indices(self, epoch: int, window: int) -> np.ndarray:
    """Global instance indices of the batches of `window` of `epoch`, in order."""
    first = window * self.window_batches
    last = min(first + self.window_batches, self.batches_per_epoch)
    return self.epoch_order(epoch)[first * self.local_batch:last * self.local_batch]

  def _submit(self, fn, *args) -> concurrent.futures.Future:
    """`fn(*args)` on the read-ahead threads, or done here and now without them."""
    if self._pool is not None:
      return self._pool.submit(fn, *args)
    future = concurrent.futures.Future()
    future.set_result(fn(*args))
    return future

  def _drop_windows(self):
    for future in self._windows.values():
      future.cancel()
    self._windows.clear()

  def close(self):
    """Stops the read-ahead: reads not started are dropped, those in flight waited for."""
    self._drop_windows()
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def _to_batch(self, records: np.ndarray, epoch: int, batch_index: int) -> dict[str, np.ndarray]:
    ids = records["input_ids"].astype(np.int32)
    lengths = records["length"].astype(np.int32)
    batch = {"input_mask": (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32),
             "segment_ids": records["segment_ids"].astype(np.int32),
             "next_sentence_labels": records["next_sentence_label"].astype(np.int32)}
    if self.static:
      batch.update(input_ids=ids,
                   masked_lm_positions=records["masked_lm_positions"].astype(np.int32),
                   masked_lm_ids=records["masked_lm_ids"].astype(np.int32),
                   masked_lm_weights=records["masked_lm_weights"].astype(np.float32))
    else:
      rng = np.random.default_rng([self.seed, epoch, batch_index, self.process_index, 1])
      batch.update(masking.mask_batch(ids, lengths, records["word_start"], self.masking, rng))
    return batch


def make_source(config: ml_collections.ConfigDict, *, split: str) -> Source | None:
  """The host-local batch stream of `split` ("train" or "eval"); None if the data has no such split."""
  data = config.data
  seed = config.seed if split == "train" else data.eval_seed
  common = dict(global_batch_size=config.train.global_batch_size, seed=seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if data.source == "synthetic":
    return SyntheticSource(
        vocab_size=config.model.vocab_size, max_seq_length=data.max_seq_length,
        max_predictions_per_seq=data.max_predictions_per_seq,
        masked_lm_prob=data.masked_lm_prob, **common)
  if data.source != "shards":
    raise ValueError(f"data.source={data.source!r}; choose 'shards' or 'synthetic'")
  if not data.path:
    raise ValueError("data.source='shards' needs data.path, a directory made by "
                     "`python -m tools.data create`")
  manifest = shards.read_manifest(data.path)
  if split not in manifest["splits"]:
    return None
  creation = manifest["creation"]
  if creation["mode"] == "static":        # masked when written: the masking keys cannot apply
    for key in ("whole_word_mask", "masked_lm_prob"):
      if key in creation and data[key] != creation[key]:
        raise ValueError(
            f"data.{key}={data[key]} but the shards in {data.path} were masked when they were "
            f"written (mode=static) with {key}={creation[key]}: make them with `tools.data create "
            f"--mode=dynamic` to mask as the config says, or set --config.data.{key}="
            f"{creation[key]}")
  tokenizer = tokenizer_of_shards(data.path, manifest)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} but the tokenizer of the shards "
                     f"in {data.path} has {tokenizer.vocab_size} entries; set "
                     f"--config.model.vocab_size={tokenizer.vocab_size}")
  spec = masking.MaskingSpec.for_tokenizer(tokenizer, data.max_predictions_per_seq,
                                           data.masked_lm_prob, data.whole_word_mask)
  return ShardSource(
      data.path, split=split, max_seq_length=data.max_seq_length,
      max_predictions_per_seq=data.max_predictions_per_seq, dynamic_masking=spec,
      verify=data.verify_checksums,
      # The held-out set is the same whatever order training reads in: its batches, one by one.
      read_block_records=data.read_block_records if split == "train" else 1,
      shuffle_window_records=data.shuffle_window_records, **common)


def tokenizer_of_shards(directory: str, manifest: dict[str, Any]):
  """The tokenizer recorded with the shards, checked against its hash in the manifest."""
  info = manifest["tokenizer"]
  path = os.path.join(directory, info["file"])
  check_tokenizer(path, info["sha256"])
  return load_tokenizer(path, lowercase=info.get("lowercase"))
