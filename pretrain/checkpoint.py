"""Orbax checkpoints of the whole run: train state (params, optimizer, step, RNG) + data position.

Saves are asynchronous and happen every `save_interval_steps`; the last `max_to_keep` are kept.
Restores take an abstract target whose leaves carry the *current* mesh's shardings, so a checkpoint
written on one mesh shape restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int,
               async_save: bool = True):
    self.save_interval_steps = save_interval_steps
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], *, force: bool = False
           ) -> bool:
    """Starts a save if `step` is on the interval (or `force`); returns whether it did."""
    if step == self.latest_step or not (force or step % self.save_interval_steps == 0):
      return False
    logging.info("saving checkpoint at step %d to %s", step, self.directory)
    # Orbax would also save the very first step it sees; the interval is decided here instead.
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)),
        force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, data_state); `abstract_state` leaves are ShapeDtypeStructs with shardings."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the configured model or optimizer "
          f"(was it written with another config?): {e}") from e
    return restored.state, restored.data

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings`: the target of a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
