"""Metrics to TensorBoard event files and `metrics.jsonl` in the workdir (process 0 only); the
workdir may be a local path or an fsspec URL (gs://...)."""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

import fsspec
import jax


def is_remote(path: str) -> bool:
  return "://" in path


def write_text(path: str, text: str):
  """Writes a whole file, locally or to any fsspec URL (gs://...)."""
  if not is_remote(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fsspec.open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_config(workdir: str, config: Any, speed_path: Any = None):
  """`config.json` in the workdir: the whole config and the speed path that ran (pretrain.speed)."""
  record = json.loads(config.to_json_best_effort())
  if speed_path is not None:
    record["speed_path"] = speed_path.to_dict()
  write_text(os.path.join(workdir, "config.json"), json.dumps(record, indent=2))


class MetricsWriter:
  """One JSON object per line: {"step": N, "train/loss": ..., ...}; the same scalars to TensorBoard.

  A local `metrics.jsonl` is appended to; in a remote workdir (gs://), where objects cannot be
  appended to, the whole file is rewritten at each write, starting from what an earlier run left.
  TensorBoard event files go through tensorboardX, in a remote workdir written by fsspec
  (`_FsspecEventFile`).
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      if is_remote(workdir):
        fs, _ = fsspec.core.url_to_fs(self.path)
        self._lines = fs.cat(self.path).decode().splitlines(True) if fs.exists(self.path) else []
        self._file = None
        _route_event_files_through_fsspec(workdir.split("://", 1)[0])
      else:
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, Any], prefix: str):
    if not self.enabled:
      return
    values = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._file is None:
      self._lines.append(line)
      write_text(self.path, "".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      if self._file is not None:
        self._file.close()
      self._tb.close()


class _FsspecEventFile:
  """A TensorBoard event file in an object store: the events are kept in memory and the whole
  object is written again at each flush (objects cannot be appended to), as tensorboardX's own gs://
  writer does. That writer is not used: it uploads again when garbage-collected (a hang at exit
  once the server is gone) and needs google-cloud-storage's credentials, where this one shares
  gcsfs's with the rest of the workdir."""

  def __init__(self, path: str):
    self._fs, self._path = fsspec.core.url_to_fs(path)
    self._buffer = io.BytesIO()
    self._lock = threading.Lock()     # tensorboardX flushes from its own thread as well

  def write(self, data: bytes):
    with self._lock:
      self._buffer.write(data)

  def flush(self):
    with self._lock:
      self._fs.pipe_file(self._path, self._buffer.getvalue())

  def close(self):
    self.flush()


class _FsspecEventFiles:
  """tensorboardX's writer factory interface."""

  def open(self, path: str) -> _FsspecEventFile:
    return _FsspecEventFile(path)

  def directory_check(self, path: str):
    pass                               # object stores have no directories to make


def _route_event_files_through_fsspec(protocol: str):
  """tensorboardX writes event files whose path starts with `protocol:` through fsspec."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(protocol, _FsspecEventFiles())


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with fsspec.open(os.path.join(workdir, "metrics.jsonl"), "r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# Library warnings that say nothing a user can act on: Orbax reading the parameters of a checkpoint
# step without the step's own metadata file (fine-tuning's partial restore does exactly that).
_HARMLESS_WARNINGS = ("Metadata file does not exist",)


def quiet_library_logs():
  """Keep absl INFO for this project; Orbax and JAX log every save and compile at INFO."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class _Filter(std_logging.Filter):

    def filter(self, record):
      noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "jax", "etils"))
      if noisy and record.getMessage().startswith(_HARMLESS_WARNINGS):
        return False
      return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(_Filter())
