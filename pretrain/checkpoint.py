"""Orbax checkpoints: a state pytree (the whole train state, or fine-tuning's best parameters) and,
for pretraining, the data position.

Saves are asynchronous and happen every `save_interval_steps`; the last `max_to_keep` are kept, or
with `best_metric` the best ones by that metric (fine-tuning's best evaluation). Restores take an
abstract target whose leaves carry the *current* mesh's shardings, so a checkpoint written on one
mesh shape restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int,
               async_save: bool = True, best_metric: str | None = None):
    self.save_interval_steps = save_interval_steps
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    best = {} if best_metric is None else dict(best_fn=lambda m: m[best_metric], best_mode="max")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True, **best)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """With `best_metric`: the kept step whose metrics were best."""
    return self._manager.best_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None = None, *,
           force: bool = False, metrics: dict[str, float] | None = None) -> bool:
    """Starts a save if `step` is on the interval (or `force`); returns whether it did."""
    if step == self.latest_step or not (force or step % self.save_interval_steps == 0):
      return False
    logging.info("saving checkpoint at step %d to %s", step, self.directory)
    items = dict(state=ocp.args.StandardSave(state))
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    # Orbax would also save the very first step it sees; the interval is decided here instead.
    return self._manager.save(
        step, args=ocp.args.Composite(**items), force=True,
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()})

  def restore(self, abstract_state: Any, step: int | None = None, *, with_data: bool = True
              ) -> tuple[Any, dict[str, Any] | None]:
    """Restores (state, data_state or None); `abstract_state` leaves are ShapeDtypeStructs with
    shardings."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if with_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match the configured model or optimizer "
          f"(was it written with another config?): {e}") from e
    return restored.state, restored.data if with_data else None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` placed with `shardings`: the target of a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
