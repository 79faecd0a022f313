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
import json
import os
from typing import Any

import numpy as np

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
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {directory} is not a finished shard directory (create it with "
        "`python -m tools.data create`, or re-run that command if it was interrupted)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {manifest.get('format_version')}, this code "
                     f"reads {FORMAT_VERSION}")
  return manifest


def open_shards(directory: str, split: str = "train", verify: bool = True) -> list[np.ndarray]:
  """Memory-maps the shards of a split, checking each against the manifest."""
  manifest = read_manifest(directory)
  if split not in manifest["splits"]:
    raise KeyError(f"{directory}/{MANIFEST} has no split {split!r}; it has "
                   f"{sorted(manifest['splits'])}")
  dtype = np.dtype([tuple(f) if len(f) == 2 else (f[0], f[1], tuple(f[2]))
                    for f in manifest["record_dtype"]])
  arrays = []
  for entry in manifest["splits"][split]["shards"]:
    path = os.path.join(directory, entry["file"])
    if not os.path.exists(path):
      raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
    if os.path.getsize(path) != entry["bytes"]:
      raise ValueError(f"shard {path} has {os.path.getsize(path)} bytes, the manifest says "
                       f"{entry['bytes']}: it is truncated or was overwritten")
    if verify and sha256_file(path) != entry["sha256"]:
      raise ValueError(f"shard {path} fails its SHA-256 check: the file is corrupted")
    try:
      records = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"shard {path} is not a readable .npy file: {e}") from e
    if records.dtype != dtype or len(records) != entry["num_instances"]:
      raise ValueError(f"shard {path} holds {len(records)} records of {records.dtype}, the "
                       f"manifest says {entry['num_instances']} of {dtype}")
    arrays.append(records)
  return arrays


def dtype_to_json(dtype: np.dtype) -> list:
  out = []
  for name in dtype.names:
    field = dtype.fields[name][0]
    if field.subdtype:
      out.append([name, field.subdtype[0].str, list(field.subdtype[1])])
    else:
      out.append([name, field.str])
  return out
