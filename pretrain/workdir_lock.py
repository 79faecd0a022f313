"""One run per workdir: `WORKDIR/run.lock` names the run that holds it (host, pid, start time).

Two runs on one workdir would interleave their metrics and checkpoints (and Orbax's start-up
clean-up of temporary folders would delete the other run's save in flight), so the lock is taken
before anything else touches the workdir, by process 0 only (the other processes of a multi-host
job learn the verdict from it), and released on every way out but a hard kill: normal exit,
exceptions, SIGTERM/Ctrl-C (the loop turns those into a clean stop).

- Local or mounted file systems: the file is held with `fcntl.flock`, which the kernel drops when
  the holder dies however it dies. A lock whose holder ran on this host and is gone (flock free and
  its pid dead or reused) is taken over with a warning. A lock written on another host is never
  taken over: this host cannot tell whether that run is alive (flock may not reach across hosts on
  a network file system), so the message says which file to delete.
- Object stores (gs://, any fsspec URL): the lock object is created only if absent, atomically on
  gcsfs >= 2024.12 (`ifGenerationMatch=0`: a second creator gets HTTP 412); fsspec back-ends
  without an atomic create fall back to check-then-write, which two runs starting within the same
  second could both pass. Stale-lock takeover works as above for a holder on this host only. Taking
  the lock is the run's first request to the bucket, so a bucket that does not exist or refused
  credentials stop the run here, in one line (`pretrain.storage.explained`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator

from absl import logging
import fsspec

from pretrain import storage

LOCK_FILE = "run.lock"


class WorkdirBusy(ValueError):
  """The workdir is held by another run; the message is one line naming host and pid."""


def _me() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _proc_start(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _alive(holder: dict[str, Any]) -> bool:
  """Whether the holder (a process on this host) still runs."""
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:        # another user's process
    pass
  start = holder.get("proc_start")
  now = _proc_start(pid)
  return start is None or now is None or now == start


def _describe(holder: dict[str, Any]) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")


def _parse(text: str) -> dict[str, Any] | None:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _busy(workdir: str, path: str, holder: dict[str, Any] | None, me: dict[str, Any]
          ) -> WorkdirBusy:
  if holder is None:
    return WorkdirBusy(f"{workdir} is in use by another run (its {path} is being written); wait "
                       "for it to finish or use another --workdir")
  if holder.get("host") != me["host"]:
    return WorkdirBusy(
        f"{workdir} is locked by a run on another host ({_describe(holder)}), which this host "
        f"cannot check: if that run has ended, delete {path}; otherwise use another --workdir")
  return WorkdirBusy(f"{workdir} is in use by another run ({_describe(holder)}): wait for it to "
                     "finish or use another --workdir")


def _stale_warning(workdir: str, holder: dict[str, Any]):
  logging.warning("taking over the lock of %s from a run that is gone (%s)", workdir,
                  _describe(holder))


class _LocalLock:
  """A lock file held open with flock; released by unlinking it, then closing."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self):
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None


def _acquire_local(workdir: str, path: str, me: dict[str, Any]) -> _LocalLock:
  os.makedirs(workdir, exist_ok=True)
  for _ in range(10):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise                # flock unsupported here: fail loudly rather than lock nothing
        raise _busy(workdir, path, _parse(_read_all(fd)), me) from None
      try:                     # released (unlinked) between our open and flock: take the new file
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
          continue
      except FileNotFoundError:
        continue
      holder = _parse(_read_all(fd))
      if holder is not None:
        if holder.get("host") != me["host"] or _alive(holder):
          raise _busy(workdir, path, holder, me)
        _stale_warning(workdir, holder)
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
      lock, fd = _LocalLock(path, fd), None
      return lock
    finally:
      if fd is not None:
        os.close(fd)
  raise WorkdirBusy(f"{workdir}: could not take {path} (it keeps changing)")


def _read_all(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 65536):
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", "replace")


class _RemoteLock:
  def __init__(self, fs, path: str):
    self._fs, self.path = fs, path

  def release(self):
    if self._fs is not None:
      try:
        self._fs.rm(self.path)
      except FileNotFoundError:
        pass
      self._fs = None


def _create_exclusive(fs, path: str, data: bytes):
  """Creates `path` only if absent (FileExistsError otherwise)."""
  try:
    fs.pipe_file(path, data, mode="create")
  except TypeError:            # an fsspec back-end without `mode`: check, then write
    if fs.exists(path):
      raise FileExistsError(path) from None
    fs.pipe_file(path, data)


def _acquire_remote(workdir: str, url: str, me: dict[str, Any]) -> _RemoteLock:
  fs, path = fsspec.core.url_to_fs(url)
  for _ in range(2):
    try:
      _create_exclusive(fs, path, json.dumps(me).encode())
      return _RemoteLock(fs, path)
    except FileExistsError:
      try:
        holder = _parse(fs.cat_file(path).decode("utf-8", "replace"))
      except FileNotFoundError:      # released meanwhile
        continue
      if holder is None or holder.get("host") != me["host"] or _alive(holder):
        raise _busy(workdir, url, holder, me) from None
      _stale_warning(workdir, holder)
      fs.rm(path)
  raise WorkdirBusy(f"{workdir}: could not take {url} (another run took it meanwhile)")


def acquire(workdir: str):
  """Takes the workdir's lock for this process; an object with `.release()` and `.path`."""
  url = os.path.join(workdir, LOCK_FILE)
  if storage.is_remote(workdir):
    with storage.explained(workdir, "workdir"):   # the run's first request to the workdir's bucket
      return _acquire_remote(workdir, url, _me())
  return _acquire_local(workdir, os.path.abspath(url), _me())


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """The workdir's lock for the duration of a run: process 0 takes it, every process learns
  whether it did (a refused run stops on all of them), process 0 releases it on the way out."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirBusy as e:
      error = e
  if jax.process_count() > 1:
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not taken and error is None:
      error = WorkdirBusy(f"{workdir} is in use by another run (process 0 names it)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
