"""Fine-tuning optimizers: triangular schedules, layer-wise LR decay, gradual unfreezing (Optax).

- `triangular`: BERT's schedule, linear warmup over `warmup_fraction` of the steps, then linear decay
  to zero at the last step.
- `slanted_triangular`: ULMFiT's (Howard & Ruder, 2018): a short linear rise to the peak over
  `cut_fraction` of the steps, a long linear fall, starting and ending at peak / `ratio`.
- Layer-wise learning-rate decay (discriminative fine-tuning): every parameter has a depth (embeddings 0,
  encoder layer i at i + 1, pooler and task head at L + 1); its rate is the peak times
  `layer_decay ** (L + 1 - depth)`, so each layer learns at `layer_decay` times the rate of the one above.
- Gradual unfreezing: only the head group trains at first; every `unfreeze_every_steps` steps the next
  layer down joins (top layer first, embeddings last). Frozen parameters get zero gradients (their Adam
  moments stay zero) and zero updates (weight decay does not shrink them either).
- BERT's weight-decay mask (no decay on biases and LayerNorm), shared with pretraining; the scalar-mix
  weights are not decayed either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pretrain.optim import clipped_optimizer, path_names, peak_learning_rate
from pretrain.optim import decay_mask as bert_decay_mask


def triangular_schedule(peak: float, num_steps: int, warmup_fraction: float) -> optax.Schedule:
  """0 -> `peak` over round(warmup_fraction * num_steps) steps, then linearly to 0 at `num_steps`."""
  if not 0.0 <= warmup_fraction <= 1.0:
    raise ValueError(f"optim.warmup_fraction={warmup_fraction} must lie in [0, 1]")
  warmup = int(round(warmup_fraction * num_steps))
  decay = optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def slanted_triangular_schedule(peak: float, num_steps: int, cut_fraction: float, ratio: float
                                ) -> optax.Schedule:
  """ULMFiT's STLR: cut = floor(T * cut_fraction); p rises 0 -> 1 until the cut, then falls to 0 at T;
  lr = peak * (1 + p * (ratio - 1)) / ratio."""
  if not 0.0 < cut_fraction < 1.0:
    raise ValueError(f"optim.cut_fraction={cut_fraction} must lie in (0, 1)")
  if ratio < 1.0:
    raise ValueError(f"optim.ratio={ratio} must be at least 1")
  cut = max(int(num_steps * cut_fraction), 1)
  tail = max(num_steps - cut, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / tail)
    return peak * (1.0 + jnp.clip(p, 0.0, 1.0) * (ratio - 1.0)) / ratio

  return schedule


def make_schedule(optim: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  name, peak = optim["schedule"], peak_learning_rate(optim)
  if name == "triangular":
    return triangular_schedule(peak, num_steps, optim["warmup_fraction"])
  if name == "slanted_triangular":
    return slanted_triangular_schedule(peak, num_steps, optim["cut_fraction"], optim["ratio"])
  if name == "constant":
    return optax.constant_schedule(peak)
  raise ValueError(f"optim.schedule={name!r}; choose 'triangular', 'slanted_triangular' or "
                   "'constant'")


def depths(params: Any, num_layers: int) -> Any:
  """Each parameter's depth: 0 for embeddings, i + 1 for encoder layer i, L + 1 for everything above
  (pooler, scalar mix, task head)."""

  def depth(path, _):
    names = path_names(path)
    if names[:2] == ["bert", "embeddings"]:
      return 0
    if names[:2] == ["bert", "layers"]:
      return int(names[2]) + 1
    return num_layers + 1

  return jax.tree_util.tree_map_with_path(depth, params)


def lr_multipliers(params: Any, num_layers: int, layer_decay: float) -> Any:
  """The factor on the peak rate of every parameter: layer_decay ** (L + 1 - depth)."""
  return jax.tree.map(lambda d: float(layer_decay) ** (num_layers + 1 - d),
                      depths(params, num_layers))


def decay_mask(params: Any) -> Any:
  """BERT's weight-decay mask; the scalar mix's weights are not decayed either."""
  mask = bert_decay_mask(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, m: m and "scalar_mix" not in path_names(path), mask)


class LayerwiseState(NamedTuple):
  count: jax.Array     # int32 steps taken, for the unfreezing schedule
  inner: Any


def layerwise(inner: optax.GradientTransformation, num_layers: int, layer_decay: float = 1.0,
              unfreeze_every_steps: int = 0, frozen: Any = None) -> optax.GradientTransformation:
  """Wraps `inner` (the optimizer, learning rate included) with per-depth rate factors and freezing.

  At step t the groups of depth >= L + 1 - t // unfreeze_every_steps train (all groups when
  `unfreeze_every_steps` is 0); parameters True in `frozen` (a tree like the params) never train.
  """
  top = num_layers + 1

  def trainable(depth, count, is_frozen=False):
    if is_frozen:
      return jnp.zeros((), jnp.bool_)
    if unfreeze_every_steps <= 0:
      return jnp.ones((), jnp.bool_)
    return depth >= top - count // unfreeze_every_steps

  def init(params):
    return LayerwiseState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(grads, state, params=None):
    depth_tree = depths(grads, num_layers)
    frozen_tree = jax.tree.map(lambda _: False, grads) if frozen is None else frozen
    train = jax.tree.map(lambda d, f: trainable(d, state.count, f), depth_tree, frozen_tree)
    grads = jax.tree.map(lambda g, t: jnp.where(t, g, 0.0), grads, train)
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u, d, t: jnp.where(t, u * layer_decay ** (top - d), 0.0
                                                     ).astype(u.dtype), updates, depth_tree, train)
    return updates, LayerwiseState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim: Mapping[str, Any], num_steps: int, num_layers: int,
                   trainable: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The fine-tuning optimizer from the config's `optim` group.

  `trainable` (a tree of bools like the params, or None = all) freezes parameters outright, e.g. the
  encoder in feature-extraction mode.
  """
  schedule = make_schedule(optim, num_steps)
  tx = clipped_optimizer(optim, schedule, decay_mask)
  if not 0.0 < optim["layer_decay"] <= 1.0:
    raise ValueError(f"optim.layer_decay={optim['layer_decay']} must lie in (0, 1]")
  every = int(optim["unfreeze_every_steps"])
  if every < 0:
    raise ValueError(f"optim.unfreeze_every_steps={every} must be >= 0 (0 = no gradual unfreezing)")
  frozen = None if trainable is None else jax.tree.map(lambda t: not t, trainable)
  if optim["layer_decay"] != 1.0 or every > 0 or frozen is not None:
    # Frozen parameters stay outside the clipping norm. (optax.multi_transform would spare their
    # Adam moments, but its masked state does not map onto parameter shardings.)
    tx = layerwise(tx, num_layers, optim["layer_decay"], every, frozen)
  return tx, schedule
