"""Tokenized shards on disk: fixed-length records in `.npy` files, plus `manifest.json`.

Every instance has the same length, so a shard is one NumPy structured array: record i sits at a
fixed byte offset, and a memory-mapped shard is as seekable as ArrayRecord while a batch is one
vectorised gather rather than a deserialisation per record. Fields (S = max_seq_length,
P = max_predictions_per_seq):

  input_ids (S,)            token ids; in static mode with the masks already applied
  segment_ids (S,) uint8    0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding
  word_start (S,) uint8     first sub-token of each word (whole-word masking in the loader)
  length () int16           real tokens, specials included
  next_sentence_label () uint8   1 = B is a random segment
  masked_lm_positions (P,) uint16, masked_lm_ids (P,), masked_lm_weights (P,) uint8   [static only]

A shard is written to a temporary name and renamed when complete, then described by a small JSON
sidecar (count and SHA-256); the manifest lists every shard with its checksum, the counts, the
creation config and the tokenizer (its file is copied next to the shards, with its hash).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import threading
from typing import Any

from absl import logging
import fsspec
import numpy as np

from pretrain import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def record_dtype(max_seq_length: int, max_predictions: int, vocab_size: int, static: bool
                 ) -> np.dtype:
  token = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  fields = [("input_ids", token, (max_seq_length,)),
            ("segment_ids", np.uint8, (max_seq_length,)),
            ("word_start", np.uint8, (max_seq_length,)),
            ("length", np.int16),
            ("next_sentence_label", np.uint8)]
  if static:
    fields += [("masked_lm_positions", np.uint16, (max_predictions,)),
               ("masked_lm_ids", token, (max_predictions,)),
               ("masked_lm_weights", np.uint8, (max_predictions,))]
  return np.dtype(fields)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def write_shard(path: str, records: np.ndarray, extra: dict[str, Any] | None = None
                ) -> dict[str, Any]:
  """Writes `records` atomically, then its sidecar `<path>.json`; returns the sidecar entry."""
  tmp = path + ".tmp"
  np.save(tmp, records, allow_pickle=False)
  os.replace(tmp + ".npy", path)
  entry = {"file": os.path.basename(path), "num_instances": int(len(records)),
           "bytes": os.path.getsize(path), "sha256": sha256_file(path), **(extra or {})}
  with open(path + ".json.tmp", "w", encoding="utf-8") as f:
    json.dump(entry, f)
  os.replace(path + ".json.tmp", path + ".json")
  return entry


def finished_shard(path: str, key: str) -> dict[str, Any] | None:
  """The sidecar of a shard an earlier run completed with the same inputs and settings (`key`)."""
  try:
    with open(path + ".json", encoding="utf-8") as f:
      entry = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  if entry.get("key") != key:
    return None
  if not os.path.exists(path) or os.path.getsize(path) != entry.get("bytes"):
    return None
  return entry


def write_manifest(directory: str, manifest: dict[str, Any]):
  manifest = {"format_version": FORMAT_VERSION, **manifest}
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of a shard directory: a local path or an fsspec URL (gs://BUCKET/DIR)."""
  path = posixpath.join(directory, MANIFEST) if storage.is_remote(directory) else os.path.join(
      directory, MANIFEST)
  try:
    with storage.explained(directory, "shard directory"):
      with fsspec.open(path, "r", encoding="utf-8") as f:
        text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(
        f"{path} not found: {directory} is not a finished shard directory (create it with "
        "`python -m tools.data create`, or re-run that command if it was interrupted)") from None
  try:
    manifest = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {manifest.get('format_version')}, this code "
                     f"reads {FORMAT_VERSION}")
  return manifest


def split_entries(directory: str, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
  if split not in manifest["splits"]:
    raise KeyError(f"{directory}/{MANIFEST} has no split {split!r}; it has "
                   f"{sorted(manifest['splits'])}")
  return manifest["splits"][split]["shards"]


def manifest_dtype(manifest: dict[str, Any]) -> np.dtype:
  return np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2]))
                   for f in manifest["record_dtype"]])


def open_shards(directory: str, split: str = "train", verify: bool = True) -> list[np.ndarray]:
  """Memory-maps the shards of a split (local files), checking each against the manifest."""
  manifest = read_manifest(directory)
  dtype = manifest_dtype(manifest)
  arrays = []
  for entry in split_entries(directory, manifest, split):
    path = os.path.join(directory, entry["file"])
    if not os.path.exists(path):
      raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
    _check_size(path, os.path.getsize(path), entry)
    if verify and sha256_file(path) != entry["sha256"]:
      raise ValueError(f"shard {path} fails its SHA-256 check: the file is corrupted")
    try:
      records = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"shard {path} is not a readable .npy file: {e}") from e
    _check_records(path, len(records), records.dtype, entry, dtype)
    arrays.append(records)
  return arrays


def _check_size(path: str, size: int, entry: dict[str, Any]):
  if size != entry["bytes"]:
    raise ValueError(f"shard {path} has {size} bytes, the manifest says {entry['bytes']}: it is "
                     "truncated or was overwritten")


def _check_records(path: str, count: int, dtype: np.dtype, entry: dict[str, Any],
                   expected: np.dtype):
  if dtype != expected or count != entry["num_instances"]:
    raise ValueError(f"shard {path} holds {count} records of {dtype}, the manifest says "
                     f"{entry['num_instances']} of {expected}")


# --------------------------------------------------------------------------------------------------
# Records by index: memory-mapped local shards, or byte ranges of remote ones


class Records:
  """A split's records by global index (shard after shard, in manifest order)."""

  def __init__(self, counts: list[int], dtype: np.dtype):
    self.dtype = dtype
    self._ends = np.cumsum(counts, dtype=np.int64)
    self._starts = self._ends - np.asarray(counts, np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def read(self, index: np.ndarray) -> np.ndarray:
    """The records at `index` (any order, repeats allowed), in that order."""
    index = np.asarray(index, np.int64)
    shard = np.searchsorted(self._ends, index, side="right")
    row = index - self._starts[shard]
    order = np.lexsort((row, shard))             # each shard front to back
    out = np.empty(len(index), self.dtype)
    out[order] = self._read_sorted(shard[order], row[order])
    return out

  def _read_sorted(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    raise NotImplementedError


class MappedRecords(Records):
  """Local shards, memory-mapped: a batch is one fancy-indexed copy per shard."""

  def __init__(self, arrays: list[np.ndarray]):
    super().__init__([len(a) for a in arrays], arrays[0].dtype if arrays else np.dtype([]))
    self._arrays = arrays

  def _read_sorted(self, shard, row):
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return np.concatenate([self._arrays[s[0]][r] for s, r in zip(np.split(shard, cuts),
                                                                  np.split(row, cuts))])


class RangedRecords(Records):
  """Shards at an fsspec URL, read with HTTP range requests: only the records asked for, one
  request per run of records that lie at most `max_gap_records` apart, all of a call's requests
  in flight together (fsspec's `cat_ranges`; gcsfs runs them on its event loop). Thread-safe;
  `requests` and `records_read` count the range requests made and the records they returned."""

  def __init__(self, fs, paths: list[str], counts: list[int], data_offsets: list[int],
               dtype: np.dtype, max_gap_records: int = 8):
    super().__init__(counts, dtype)
    self._fs, self._paths, self._offsets = fs, paths, np.asarray(data_offsets, np.int64)
    self.max_gap_records = max_gap_records
    self.requests = self.records_read = 0
    self._count_lock = threading.Lock()

  def _read_sorted(self, shard, row):
    size = self.dtype.itemsize
    new_run = np.ones(len(row), bool)
    new_run[1:] = (shard[1:] != shard[:-1]) | (row[1:] - row[:-1] > self.max_gap_records + 1)
    starts = np.flatnonzero(new_run)
    stops = np.append(starts[1:], len(row))
    first, last, where = row[starts], row[stops - 1], shard[starts]
    begin = self._offsets[where] + first * size
    end = self._offsets[where] + (last + 1) * size
    with self._count_lock:
      self.requests += len(where)
      self.records_read += len(row)
    blobs = self._fs.cat_ranges([self._paths[s] for s in where], begin.tolist(), end.tolist(),
                                on_error="raise")
    parts = []
    for blob, a, b, f, s in zip(blobs, starts, stops, first, where):
      block = np.frombuffer(blob, self.dtype, count=len(blob) // size)
      if len(block) != row[b - 1] - f + 1:
        raise ValueError(f"shard {self._paths[s]} ended early (records {f}..{row[b - 1]} asked "
                         f"for, {len(block)} returned): it was truncated or overwritten")
      parts.append(block[row[a:b] - f])
    return np.concatenate(parts)


def open_records(directory: str, split: str = "train", verify: bool = True,
                 rows: tuple[int, int] | None = None,
                 manifest: dict[str, Any] | None = None) -> Records:
  """The records of a split: memory-mapped when `directory` is local, read by byte ranges when it
  is an fsspec URL (gs://...). `rows`: the [start, stop) range of global indices the caller will
  read (remote shards outside it are not opened); `manifest`: the directory's, if read already."""
  if not storage.is_remote(directory):
    return MappedRecords(open_shards(directory, split, verify=verify))
  if verify:
    logging.info("shards in %s: sizes and .npy headers checked against the manifest, not SHA-256 "
                 "(that would download every shard on every host)", directory)
  return _open_ranged(directory, manifest or read_manifest(directory), split, rows)


def _open_ranged(directory: str, manifest: dict[str, Any], split: str,
                 rows: tuple[int, int] | None) -> RangedRecords:
  """Checks remote shards against the manifest by size (one listing of the directory) and by the
  .npy header of each shard holding some of `rows`. Their SHA-256 is not checked: that would
  download every shard on every host (the store keeps its own checksum of each object)."""
  dtype = manifest_dtype(manifest)
  entries = split_entries(directory, manifest, split)
  fs, root = fsspec.core.url_to_fs(directory)
  root = root.rstrip("/")
  with storage.explained(directory, "shard directory"):
    sizes = {posixpath.basename(info["name"].rstrip("/")): info["size"]
             for info in fs.ls(root, detail=True)}
  for entry in entries:
    path = posixpath.join(directory, entry["file"])
    if entry["file"] not in sizes:
      raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
    _check_size(path, sizes[entry["file"]], entry)
  paths = [posixpath.join(root, e["file"]) for e in entries]
  counts = [e["num_instances"] for e in entries]
  offsets = [e["bytes"] - e["num_instances"] * dtype.itemsize for e in entries]  # header size
  lo, hi = rows or (0, sum(counts))
  firsts = np.cumsum([0] + counts[:-1])
  needed = [k for k, (first, n) in enumerate(zip(firsts, counts)) if first < hi and first + n > lo]
  if needed:
    headers = fs.cat_ranges([paths[k] for k in needed], 0, [offsets[k] for k in needed],
                            on_error="raise")
    for k, header in zip(needed, headers):
      _check_header(posixpath.join(directory, entries[k]["file"]), header, entries[k], dtype)
  return RangedRecords(fs, paths, counts, offsets, dtype)


def _check_header(path: str, header: bytes, entry: dict[str, Any], expected: np.dtype):
  """`header`, the bytes before the records as the manifest places them, must be a .npy header of
  exactly that length describing the manifest's records."""
  f = io.BytesIO(header)
  try:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
  except ValueError as e:
    raise ValueError(f"shard {path} is not a readable .npy file: {e}") from e
  if fortran or len(shape) != 1 or f.tell() != len(header):
    raise ValueError(f"shard {path} is not a .npy file of records as the manifest describes "
                     f"(shape {shape}, a header of {f.tell()} bytes where {len(header)} fit)")
  _check_records(path, shape[0], dtype, entry, expected)


def dtype_to_json(dtype: np.dtype) -> list:
  out = []
  for name in dtype.names:
    field = dtype.fields[name][0]
    if field.subdtype:
      out.append([name, field.subdtype[0].str, list(field.subdtype[1])])
    else:
      out.append([name, field.str])
  return out
