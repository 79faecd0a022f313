"""Optimizers for pretraining: AdamW or LAMB with BERT's weight-decay mask, clipping, warmup + decay.

Gradient accumulation lives in the train step (see `train.py`), where it can normalise by the whole
batch's masked-token count and so match one large batch exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

# google-research/bert: exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"].
_NO_DECAY_LEAVES = ("bias",)
_NO_DECAY_MODULES = ("layer_norm",)


def path_names(path) -> list[str]:
  """The keys of a pytree path (jax.tree_util) as strings: ["bert", "layers", "0", ...]."""
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every parameter except biases and LayerNorm scales/biases."""

  def decays(path, _):
    names = path_names(path)
    leaf_name, module_names = names[-1], names[:-1]
    if any(leaf_name.endswith(n) for n in _NO_DECAY_LEAVES):
      return False
    return not any(m in name for name in module_names for m in _NO_DECAY_MODULES)

  return jax.tree_util.tree_map_with_path(decays, params)


def peak_learning_rate(optim: Mapping[str, Any]) -> float:
  """`optim.peak_learning_rate`, the top of the schedule (pretraining's and fine-tuning's name); a
  config that still says `learning_rate` (fine-tuning's old name) is refused, not ignored."""
  if "learning_rate" in optim:
    raise ValueError("optim.learning_rate was renamed optim.peak_learning_rate")
  if optim["peak_learning_rate"] < 0:
    raise ValueError(f"optim.peak_learning_rate={optim['peak_learning_rate']} must be at least 0")
  return optim["peak_learning_rate"]


def learning_rate_schedule(optim: Mapping[str, Any], num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps`, then linear or polynomial decay that
  reaches `end_learning_rate` at `num_train_steps`."""
  peak, end = peak_learning_rate(optim), optim["end_learning_rate"]
  warmup = int(optim["warmup_steps"])
  if not 0 <= warmup <= num_train_steps:
    raise ValueError(f"optim.warmup_steps={warmup} must lie in [0, train.num_train_steps="
                     f"{num_train_steps}]")
  if optim["decay"] == "linear":
    power = 1.0
  elif optim["decay"] == "polynomial":
    power = float(optim["decay_power"])
  else:
    raise ValueError(f"optim.decay={optim['decay']!r}; choose 'linear' or 'polynomial'")
  decay = optax.polynomial_schedule(peak, end, power, max(num_train_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def clipped_optimizer(optim: Mapping[str, Any], schedule: optax.Schedule, mask=decay_mask
                      ) -> optax.GradientTransformation:
  """Global-norm clipping (`max_grad_norm` > 0), then AdamW or LAMB with the weight-decay `mask`."""
  common = dict(learning_rate=schedule, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                weight_decay=optim["weight_decay"], mask=mask)
  if optim["name"] == "adamw":
    tx = optax.adamw(**common)
  elif optim["name"] == "lamb":
    tx = optax.lamb(**common)
  else:
    raise ValueError(f"optim.name={optim['name']!r}; choose 'adamw' or 'lamb'")
  if optim["max_grad_norm"] > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim["max_grad_norm"]), tx)
  return tx


def make_optimizer(optim: Mapping[str, Any], num_train_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim, num_train_steps)
  return clipped_optimizer(optim, schedule), schedule
