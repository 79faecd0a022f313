"""Full-batch L-BFGS for a linear head on frozen features (feature-extraction mode).

The frozen encoder runs once over the training set; each example keeps one pooled vector per layer
(embeddings output + every layer: (layers + 1, hidden)). Pooling and the scalar mix are both linear, so
mixing pooled layers equals pooling the mixed layer, and the head sees exactly what it sees in
gradient training. Then `optax.lbfgs` (with its zoom line search) fits the scalar mix and the linear
head on the whole set at once, the classic recipe for linear probes on small labelled sets.
Memory: examples x (layers + 1) x hidden float32 (3,400 x 5 x 512 = 35 MB for `small` on SST-2 size).
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from finetune import batches
from finetune import heads
from pretrain import sharding

_HEAD_KEYS = ("scalar_mix", "head")


def pooled_layer_features(setup, params, features: dict[str, np.ndarray], batch_size: int,
                          pooling: str) -> jax.Array:
  """(layers + 1, examples, hidden) float32 pooled hidden states of the frozen encoder."""
  def pooled(p, batch):
    model = nnx.merge(setup.graphdef, p)
    _, _, hidden = model.bert(batch["input_ids"], batch["input_mask"], batch["segment_ids"],
                              all_layers=True)
    return jnp.swapaxes(heads.pool_layers(hidden, batch["input_mask"], pooling), 0, 1)

  inputs = {k: features[k][:1] for k in batches.INPUT_KEYS}
  step = jax.jit(pooled, in_shardings=(setup.state_shardings.params,
                                       batches.batch_shardings(setup.mesh, inputs)),
                 out_shardings=sharding.replicated(setup.mesh))
  out = batches.predict(step, params, features, batch_size, setup.mesh)     # (examples, layers + 1, hidden)
  return jnp.asarray(np.swapaxes(out, 0, 1))


def fit(config, task, setup, params: dict[str, Any]) -> tuple[dict[str, Any], list[float]]:
  """Fits `scalar_mix` and `head` of `params` by full-batch L-BFGS; returns (params, losses)."""
  if config.head.mode != "features":
    raise ValueError("optim.solver='lbfgs' fits a head on frozen features: set "
                     "--config.head.mode=features")
  if task.kind == "span":
    raise ValueError("optim.solver='lbfgs' needs a sentence task (classification or regression), "
                     f"not the span task {config.task!r}")
  if jax.process_count() > 1:
    raise ValueError("optim.solver='lbfgs' runs in one process (the features are gathered on the "
                     "host); use optim.solver='gradient' for multi-host runs")
  train = task.train_features()
  layers = pooled_layer_features(setup, params, train, config.train.eval_batch_size,
                                 config.head.feature_pooling)
  batch = {k: jnp.asarray(train[k]) for k in task.label_keys}
  batch["weight"] = jnp.ones(layers.shape[1], jnp.float32)
  frozen = {k: v for k, v in params.items() if k not in _HEAD_KEYS}
  l2 = float(config.optim.lbfgs_l2)

  def loss_fn(head_params):
    model = nnx.merge(setup.graphdef, {**frozen, **head_params})
    logits = model.predict(model.scalar_mix(layers))
    total, count = heads.loss_sums(task.kind, logits, batch)
    kernel = head_params["head"]["kernel"]
    return total / count + l2 * jnp.sum(jnp.square(kernel))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  @jax.jit
  def step(head_params, state):
    value, grad = value_and_grad(head_params, state=state)
    updates, state = solver.update(grad, state, head_params, value=value, grad=grad,
                                   value_fn=loss_fn)
    return optax.apply_updates(head_params, updates), state, value

  head_params = {k: params[k] for k in _HEAD_KEYS}
  state = solver.init(head_params)
  losses = []
  for _ in range(int(config.optim.lbfgs_steps)):
    head_params, state, value = step(head_params, state)
    losses.append(float(value))
  final = {**params, **jax.device_put(head_params, {k: setup.state_shardings.params[k]
                                                    for k in _HEAD_KEYS})}
  return final, losses
