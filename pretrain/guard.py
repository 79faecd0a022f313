"""The pretraining loop's guard against divergence: a run whose loss or gradient norm goes NaN or
infinite stops with one line, and never writes a checkpoint from a non-finite state.

The loop fetches its metrics only at log steps (its one host sync); the guard checks every step's
loss and gradient norm there, and once more before every save, together with the state itself
(every parameter and optimizer moment), so the checkpoints kept, and therefore the ones Orbax's
`max_to_keep` rotation leaves, are all finite. With `train.skip_nonfinite_steps` the train step
itself drops such an update (pretrain/step.py) and the guard counts it instead of stopping.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from pretrain.checkpoint import Checkpointer, all_finite

SKIPPED = "skipped_steps"             # per step 0/1 from the train step; per log entry a count
_WATCHED = (("loss", "loss"), ("grad_norm", "gradient norm"))


class NonFiniteError(ValueError):
  """The run diverged; the message is one line naming the step and the last finite checkpoint."""


def first_nonfinite(history: list[dict[str, Any]], first_step: int
                    ) -> tuple[int, str, float, float] | None:
  """(step, what, value, learning rate) of the first step whose loss or gradient norm is not
  finite; `history` holds host metrics of steps first_step, first_step + 1, ...; steps the train
  step skipped (train.skip_nonfinite_steps) do not count."""
  for offset, metrics in enumerate(history):
    if float(metrics.get(SKIPPED, 0.0)):
      continue
    for key, name in _WATCHED:
      value = float(metrics[key])
      if not math.isfinite(value):
        return first_step + offset, name, value, float(metrics.get("learning_rate", math.nan))
  return None


def aggregate(history: list[dict[str, Any]]) -> dict[str, float]:
  """One log entry: the mean of each metric over the steps that were applied, and the number of
  skipped steps (when the step reports them)."""
  skipped = [float(h.get(SKIPPED, 0.0)) for h in history]
  applied = [h for h, s in zip(history, skipped) if not s] or history
  out = {k: sum(float(h[k]) for h in applied) / len(applied) for k in history[0] if k != SKIPPED}
  if SKIPPED in history[0]:
    out[SKIPPED] = float(sum(skipped))
  return out


class Guard:
  """Checks host metrics and the state; raises NonFiniteError naming the last finite checkpoint
  of `ckpt` (the save in flight is finished first: it was checked before it started)."""

  def __init__(self, ckpt: Checkpointer, learning_rate_key: str):
    self.ckpt = ckpt
    self.learning_rate_key = learning_rate_key

  def check_metrics(self, history: list[dict[str, Any]], first_step: int):
    found = first_nonfinite(history, first_step)
    if found is not None:
      step, what, value, learning_rate = found
      self._fail(f"{what} is {value} at step {step} (learning rate {learning_rate:.3g})")

  def check_state(self, state: Any, step: int):
    """Before a save: every floating-point value of the state must be finite."""
    if not all_finite(state):
      self._fail(f"the parameters or optimizer state are not finite after step {step} (the loss "
                 "and gradient norm were)")

  def _fail(self, what: str):
    self.ckpt.wait()
    last = self.ckpt.latest_step
    if last is None:
      kept, then = "no checkpoint was saved before it", "run again"
    else:
      kept, then = (f"the last finite checkpoint is step {last} in {self.ckpt.directory}",
                    "resume")
    raise NonFiniteError(f"{what}; {kept}: lower {self.learning_rate_key} and {then}")


def learning_rate_key(config) -> str:
  """The config key of the peak learning rate, for the hint."""
  optim = config.optim
  return "optim.peak_learning_rate" if "peak_learning_rate" in optim else "optim.learning_rate"


def to_host(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The metrics fetched (a no-op for ones already on the host)."""
  return jax.device_get(history)
