"""Whether a checkpoint is intact and was written for this model, and quiet failures of Orbax.

Orbax compresses array chunks with zstd without a checksum, so a flipped byte inside the data can
restore silently as a wrong value (an Adam moment came back as 3e34). After each save has finished,
`write_checksums` records the size and SHA-256 of every file of the step in `checksums.json`
inside the step's folder; `verify` compares them before Orbax reads anything. A step without that
file (written before this existed, or killed between Orbax's commit and the checksums) cannot be
verified: its restore relies on Orbax's own errors and on the restored values being finite.

`shape_mismatch` tells a checkpoint written for another model (another size, another optimizer)
from a damaged one, so such a resume is refused with the parameter named instead of falling back.

`quiet_orbax_repeats` and `drop_orbax_leftovers` keep a failed save or restore to the one
exception its caller reports: Orbax logs every failure of its background threads with a traceback
before re-raising it, and a failed restore leaves TensorStore reads in flight whose callbacks hit
Orbax's closed asyncio loop ("Event loop is closed", one traceback per array).
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import posixpath
import re
import sys
import warnings
from typing import Any

from etils import epath
import fsspec
import jax
import orbax.checkpoint as ocp

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 16 << 20


def _url_to_fs(path: str):
  return fsspec.core.url_to_fs(path)


def file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  """{relative path: {"size", "sha256"}} of every file under `step_dir` but the checksums file."""
  fs, root = _url_to_fs(step_dir)
  root = root.rstrip("/")
  out = {}
  for path in sorted(fs.find(root)):
    rel = posixpath.relpath(path, root)
    if rel == CHECKSUMS_FILE:
      continue
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    out[rel] = {"size": size, "sha256": digest.hexdigest()}
  return out


def write_checksums(step_dir: str):
  """Writes `checksums.json` into a finished step's folder, atomically (a rename locally; one
  object PUT on a bucket), so a crash leaves either no checksums or complete ones."""
  text = json.dumps({"algorithm": "sha256", "files": file_digests(step_dir)}, indent=1)
  target = posixpath.join(step_dir, CHECKSUMS_FILE)
  if "://" in step_dir:
    fs, path = _url_to_fs(target)
    fs.pipe_file(path, text.encode())
    return
  partial = target + ".partial"
  with open(partial, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, target)


def has_checksums(step_dir: str) -> bool:
  fs, path = _url_to_fs(posixpath.join(step_dir, CHECKSUMS_FILE))
  return fs.exists(path)


def verify(step_dir: str) -> str | None:
  """Why the step's files differ from its checksums (the first difference), or None when they
  match or when the step has no checksums to check."""
  fs, root = _url_to_fs(step_dir)
  root = root.rstrip("/")
  listing = posixpath.join(root, CHECKSUMS_FILE)
  if not fs.exists(listing):
    return None
  try:
    files = json.loads(fs.cat_file(listing))["files"]
  except (ValueError, KeyError, TypeError) as e:
    return f"its {CHECKSUMS_FILE} is unreadable ({e})"
  for rel, want in sorted(files.items()):
    path = posixpath.join(root, rel)
    if not fs.exists(path):
      return f"{rel} is missing"
    size = fs.size(path)
    if size != want["size"]:
      return f"{rel} has {size} bytes, {want['size']} when it was saved"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
    if digest.hexdigest() != want["sha256"]:
      return f"{rel} does not match the SHA-256 recorded when it was saved"
  return None


# --------------------------------------------------------------------------------------------------
# Written for this model?


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def read_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the arrays of a saved state, from its metadata alone."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  return _flat_shapes(dict(metadata))


def shape_mismatch(saved: dict[str, tuple[int, ...]], abstract_state: Any) -> str | None:
  """The first difference between the saved shapes and the configured state's, as words, and a
  count of the rest; None when they agree. A parameter's shape is named before a missing key."""
  wanted = _flat_shapes(abstract_state)
  shapes = [f"{k} has shape {saved[k]}, the config gives {wanted[k]}"
            for k in sorted(wanted) if k in saved and saved[k] != wanted[k]]
  missing = [f"the config has {k}, which the checkpoint lacks" for k in sorted(wanted)
             if k not in saved]
  extra = [f"the checkpoint has {k}, which the config lacks" for k in sorted(saved)
           if k not in wanted]
  problems = shapes + missing + extra
  if not problems:
    return None
  problems.sort(key=lambda line: "params/" not in line)     # stable: shapes, missing, extra
  rest = len(problems) - 1
  more = f" (and {rest} more difference{'s' if rest > 1 else ''})" if rest else ""
  return problems[0] + more


# --------------------------------------------------------------------------------------------------
# One exception, not a page of Orbax's logs


_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved")
_ORBAX_REPEATS = re.compile(r"raised an exception|Handler Commit operations or the Commit|"
                            r"Save Finalize thread \(.*\) failed")


class _OrbaxRepeats(std_logging.Filter):
  """Drops Orbax's ERROR records that report an exception it re-raises to our caller, and
  asyncio's "Task/Future/_GatheringFuture exception was never retrieved" for the sibling tasks
  of Orbax's failed write (the same error again, from each array's task)."""

  def filter(self, record):
    if record.levelno < std_logging.ERROR:
      return True
    if record.name == "asyncio":
      return not (_NEVER_RETRIEVED.match(record.getMessage()) and _mentions_orbax(record))
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and _ORBAX_REPEATS.search(str(record.msg)))


def _mentions_orbax(record) -> bool:
  """Whether the record's text names Orbax's code or a save's temporary folder (TensorStore's
  write errors do), or its exception's traceback goes through Orbax."""
  marker = f"{os.sep}orbax{os.sep}"
  text = record.getMessage()
  if marker in text or ".orbax-checkpoint-tmp" in text:
    return True
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if marker in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


_FILTER = _OrbaxRepeats()


def quiet_orbax_repeats():
  """Installs the filter on absl's logger (Orbax logs through it) and asyncio's; idempotent."""
  for name in ("absl", "asyncio"):
    logger = std_logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


def _is_orbax_leftover(unraisable) -> bool:
  """An "Event loop is closed" from a late TensorStore callback, or an error raised while Python
  finalises one of Orbax's orphaned read coroutines (GeneratorExit turned into Orbax's "error
  while reading array index")."""
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"):
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _DropOrbaxLeftovers:
  """An unraisable hook that drops a failed Orbax operation's leftovers, passes the rest on."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not _is_orbax_leftover(unraisable):
      self.previous(unraisable)


def drop_orbax_leftovers():
  """Orbax runs a save's or restore's reads and writes on an asyncio loop of its own and closes
  that loop when the first of them fails, while TensorStore still has the others in flight. As
  each completes (at once or seconds later, on TensorStore's threads) its callback finds the loop
  closed and Python reports "Event loop is closed" through sys.unraisablehook, one traceback per
  array; the orphaned coroutines report again when they are garbage-collected. None of it says
  more than the operation's own error, which reaches the caller; this drops exactly those reports,
  for the rest of the process, and leaves every other unraisable error to the previous hook.
  Idempotent (each Checkpointer calls it)."""
  if not isinstance(sys.unraisablehook, _DropOrbaxLeftovers):
    sys.unraisablehook = _DropOrbaxLeftovers(sys.unraisablehook)


def drop_unawaited_warnings():
  """After a failed save: the write coroutines Orbax had not started yet are collected unawaited,
  and Python warns for each ("coroutine ... was never awaited"), at exit if not before. The save's
  error has been reported; this silences those warnings for the rest of the process."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
