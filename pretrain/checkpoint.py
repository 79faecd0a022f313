"""Orbax checkpoints: a state pytree (the whole train state, or fine-tuning's best parameters) and,
for pretraining, the data position.

Saves are asynchronous and happen every `save_interval_steps`; the last `max_to_keep` are kept, or
with `best_metric` the best ones by that metric (fine-tuning's best evaluation). Restores take an
abstract target whose leaves carry the *current* mesh's shardings, so a checkpoint written on one
mesh shape restores onto another.

A run never loses its last good state (docs/reliability.md): once a save has finished, the SHA-256
of its files is recorded (pretrain/checkpoint_integrity.py); `restore_latest` resumes from the
newest step that is intact (checksums, Orbax's own reading, finite values) and moves damaged newer
steps aside with one warning each; a checkpoint written for another model is refused with the
first differing shape; a failed save (a full disk) ends in one `CheckpointError` that names the
last complete step, which stays as it was.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from absl import logging
import fsspec
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from pretrain import checkpoint_integrity as integrity


class CheckpointError(ValueError):
  """A checkpoint cannot be saved or restored; the message is one line saying what to do."""


class DamagedCheckpoint(CheckpointError):
  """One step's files are damaged (`reason`); `Checkpointer.restore_latest` falls back past it."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f"checkpoint step {step} in {directory} is damaged ({reason})")
    self.step, self.reason = step, reason


class Checkpointer:

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int,
               async_save: bool = True, best_metric: str | None = None, checksums: bool = True):
    self.save_interval_steps = save_interval_steps
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    self.checksums, self._async = checksums, async_save
    self._unfinished: list[int] = []     # saves started whose checksums are not written yet
    best = {} if best_metric is None else dict(best_fn=lambda m: m[best_metric], best_mode="max")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save, create=True, **best)
    integrity.quiet_orbax_repeats()
    integrity.drop_orbax_leftovers()
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """With `best_metric`: the kept step whose metrics were best."""
    return self._manager.best_step()

  def step_dir(self, step: int) -> str:
    return posixpath.join(self.directory, str(step))

  def will_save(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, force=force)` would write a checkpoint."""
    return step != self.latest_step and (force or step % self.save_interval_steps == 0)

  # ------------------------------------------------------------------------------------ saving

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None = None, *,
           force: bool = False, metrics: dict[str, float] | None = None) -> bool:
    """Starts a save if `step` is on the interval (or `force`); returns whether it did.

    The previous save is finished first (Orbax waits for it anyway) and its checksums written.
    A save that fails (here, or in the background and noticed at the next save, `wait` or
    `close`) raises CheckpointError; the steps saved before it are untouched.
    """
    if not self.will_save(step, force):
      return False
    self._finish()
    logging.info("saving checkpoint at step %d to %s", step, self.directory)
    items = dict(state=ocp.args.StandardSave(state))
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self._unfinished.append(step)
    started = False
    try:
      # Orbax would also save the very first step it sees; the interval is decided here instead.
      started = self._manager.save(
          step, args=ocp.args.Composite(**items), force=True,
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()})
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(step, e)
    if not started:
      self._unfinished.remove(step)
    elif not self._async:
      self._finish()          # written already: its checksums now, not at the next save
    return started

  def _finish(self):
    """Waits for the save in flight and writes the checksums of every save that finished."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(self._unfinished[-1] if self._unfinished else None, e)
    done, self._unfinished = self._unfinished, []
    if self.checksums and jax.process_index() == 0:
      kept = set(self.all_steps())
      for step in done:
        if step in kept:
          integrity.write_checksums(self.step_dir(step))

  def _save_failed(self, step: int | None, error: BaseException):
    self._unfinished = []
    integrity.drop_unawaited_warnings()
    self._manager.reload()
    if jax.process_index() == 0 and step is not None:
      _remove_partial(self.directory, step)
    last = self.latest_step
    kept = (f"the last complete checkpoint is step {last}, intact" if last is not None
            else "no earlier checkpoint exists")
    reason = _short_reason(error)
    hint = "free some space" if "no space left" in reason.lower() else "fix the cause"
    raise CheckpointError(
        f"saving the checkpoint of step {step} to {self.directory} failed ({reason}); {kept}: "
        f"{hint} and run again to resume") from error

  def wait(self):
    self._finish()

  def close(self):
    try:
      self._finish()
    finally:
      self._manager.close()

  # ---------------------------------------------------------------------------------- restoring

  def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True
              ) -> tuple[Any, dict[str, Any] | None]:
    """Restores (state, data_state or None); `abstract_state` leaves are ShapeDtypeStructs with
    shardings. Raises DamagedCheckpoint when the step's files fail their checksums, cannot be
    read or hold non-finite values, and CheckpointError when it was written for another model."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    reason = self._verify(step)
    if reason is None:
      reason = self._check_model(step, abstract_state)
    if not _everywhere(reason is None):
      reason = reason or "another process cannot read its metadata"
    restored = None
    if reason is None:
      try:
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if with_data:
          items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        reason = f"Orbax cannot read it: {_short_reason(e)}"
    if not _everywhere(reason is None):
      reason = reason or "another process cannot read it"
    if reason is None and not all_finite(restored.state):
      reason = "it holds non-finite values"
    if reason is not None:
      raise DamagedCheckpoint(self.directory, step, reason)
    return restored.state, restored.data if with_data else None

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[Any, dict[str, Any] | None, int] | None:
    """(state, data_state, step) of the newest intact checkpoint; None when there is none at all.

    Each damaged newer step is moved aside to `DIRECTORY.damaged/STEP` (so the run can save that
    step again) with one warning naming it and why; when no step is intact, CheckpointError.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(abstract_state, step)
      except DamagedCheckpoint as e:
        damaged.append(e)
        continue
      for bad in damaged:
        moved = self._move_aside(bad.step)
        logging.warning("%s: resuming from step %d; step %d moved to %s", bad, step, bad.step,
                        moved)
      if damaged:
        self._manager.reload()
      return state, data_state, step
    if not damaged:
      return None
    reasons = "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
    raise CheckpointError(f"no intact checkpoint in {self.directory} ({reasons}): start over with "
                          "a new --workdir, or put back a copy of a checkpoint")

  def _verify(self, step: int) -> str | None:
    """The checksum verdict, taken on process 0 (it reads every file once) and shared."""
    reason = None
    if jax.process_index() == 0:
      reason = integrity.verify(self.step_dir(step))
    if jax.process_count() > 1:
      ok = multihost_utils.broadcast_one_to_all(np.int32(reason is None))
      if not ok:
        reason = reason or "its files do not match their checksums (see process 0)"
    return reason

  def _check_model(self, step: int, abstract_state: Any) -> str | None:
    """None if the step holds this model's shapes; a damage reason if its metadata is unreadable;
    CheckpointError if it was written for another model."""
    state_dir = posixpath.join(self.step_dir(step), "state")
    try:
      saved = integrity.read_shapes(state_dir)
    except Exception as e:  # pylint: disable=broad-except
      return f"its metadata cannot be read: {_short_reason(e)}"
    difference = integrity.shape_mismatch(saved, abstract_state)
    if difference is not None:
      raise CheckpointError(
          f"the checkpoint in {self.directory} at step {step} was written for another model or "
          f"optimizer: {difference}; resume with the config it was written with or use a new "
          "workdir")
    return None

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of Orbax's sight (process 0) and returns where it went."""
    if jax.process_count() > 1:          # every process sees the same folders below
      multihost_utils.sync_global_devices(f"checkpoint step {step}: moving aside")
    target = posixpath.join(self.directory + ".damaged", str(step))
    fs, source = fsspec.core.url_to_fs(self.step_dir(step))
    _, destination = fsspec.core.url_to_fs(target)
    suffix = 0
    while fs.exists(destination + (f".{suffix}" if suffix else "")):
      suffix += 1
    destination += f".{suffix}" if suffix else ""
    target += f".{suffix}" if suffix else ""
    if jax.process_index() == 0:
      if "://" in self.directory:
        fs.mv(source, destination, recursive=True)
      else:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.rename(source, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
    return target


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings`: the target of a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def all_finite(tree: Any) -> bool:
  """Whether every floating-point value of `tree` (sharded arrays welcome) is finite."""
  return bool(_all_finite(tree))


def _everywhere(ok: bool) -> bool:
  """`ok` on every process (each reads its own shards, so one may fail where others do not)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _short_reason(error: BaseException) -> str:
  """One short clause for an Orbax/TensorStore error, whose message can run to pages."""
  text = str(error)
  for marker in ("No space left on device", "Disk quota exceeded", "Permission denied",
                 "Read-only file system"):
    if marker in text:
      return marker.lower()
  line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else type(error).__name__
  line = line.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
  return line if len(line) <= 240 else line[:237] + "..."


def _remove_partial(directory: str, step: int):
  """Deletes what a failed save of `step` left (Orbax's temporary folder): the space comes back."""
  fs, root = fsspec.core.url_to_fs(directory)
  for path in fs.glob(posixpath.join(root, f"{step}.orbax-checkpoint-tmp*")):
    try:
      fs.rm(path, recursive=True)
    except OSError as e:
      logging.warning("could not remove %s after the failed save: %s", path, e)
