"""The pretraining step, built one way for the training loop, the benchmark and the AOT check.

`build(config, mesh)` validates the config against the mesh, resolves the speed path, lays out the
train state and returns the jitted train and eval steps: pure functions of (state, batch) with the
state donated and explicit in/out shardings.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import threading
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from pretrain import sharding
from pretrain import speed
from pretrain.data import loader
from pretrain.model import heads
from pretrain.model.bert import BertForPreTraining
from pretrain.model.config import BertConfig
from pretrain.optim import make_optimizer
from pretrain.state import Setup, TrainState, make_setup as make_state_setup


def validate(config: ml_collections.ConfigDict, mesh: Mesh, process_count: int = 1):
  """Checks that need the mesh; each error names the config key to change."""
  data, train, model = config.data, config.train, config.model
  if data.max_predictions_per_seq > data.max_seq_length:
    raise ValueError(f"data.max_predictions_per_seq={data.max_predictions_per_seq} exceeds "
                     f"data.max_seq_length={data.max_seq_length}")
  if data.max_seq_length > model.max_position_embeddings:
    raise ValueError(f"data.max_seq_length={data.max_seq_length} exceeds "
                     f"model.max_position_embeddings={model.max_position_embeddings}")
  dp, k = sharding.data_parallel_size(mesh), train.grad_accum_steps
  for key in ("global_batch_size", "grad_accum_steps", "log_every_steps"):
    if train[key] < 1:
      raise ValueError(f"train.{key}={train[key]} must be at least 1")
  if train.eval_every_steps < 0:
    raise ValueError(f"train.eval_every_steps={train.eval_every_steps} must be 0 (only at the end) "
                     "or more")
  if train.global_batch_size % (dp * k):
    raise ValueError(
        f"train.global_batch_size={train.global_batch_size} must be divisible by the data-parallel "
        f"size ({dp} = data x fsdp of mesh {dict(mesh.shape)}) times train.grad_accum_steps={k}; "
        f"e.g. {max(dp * k, train.global_batch_size // (dp * k) * dp * k)}")
  if train.global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size={train.global_batch_size} must be divisible by the "
                     f"number of processes ({process_count})")


def make_setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
  """The Setup of BERT with the MLM and NSP heads, as `config` describes it, on `mesh`."""
  model_config = BertConfig.from_config(config.model)
  path = speed.resolve(model_config, mesh=mesh, seq_len=config.data.max_seq_length)
  tx, schedule = make_optimizer(config.optim, config.train.num_train_steps)
  return make_state_setup(
      lambda key: BertForPreTraining(model_config, rngs=nnx.Rngs(key), path=path),
      model_config, mesh, tx, schedule, path)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...), micro-batch i = rows i, i+k, ...: each device keeps its own rows."""
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def make_train_step(setup: Setup, grad_accum_steps: int = 1, skip_nonfinite: bool = False
                    ) -> Callable:
  """jit((state, batch) -> (state, metrics)), state donated; call it under `jax.set_mesh`.

  With `skip_nonfinite` (train.skip_nonfinite_steps) a step whose loss or gradient norm is not
  finite leaves the parameters and the optimizer state as they were (optax's `apply_if_finite`
  way, inside the step: no host sync), and reports `skipped_steps` 1. The step counter still
  advances, as the batch was consumed; the optimizer's own count (Adam's bias correction and the
  learning-rate schedule it applies) does not, so it lags the logged `learning_rate` by the number
  of skipped steps.
  """

  def loss_and_grads(params, micro, key, mlm_weight_total, num_sequences_total):
    def loss_fn(p):
      out = setup.apply(p, micro, key)
      sums = heads.loss_sums(out.mlm_logits, out.nsp_logits, micro)
      return heads.total_loss(sums, mlm_weight_total, num_sequences_total), sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, sums

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    weight_total = batch["masked_lm_weights"].astype(jnp.float32).sum()
    seq_total = jnp.asarray(batch["input_ids"].shape[0], jnp.float32)
    if grad_accum_steps == 1:
      grads, sums = loss_and_grads(state.params, batch, key, weight_total, seq_total)
    else:
      micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)

      def accumulate(carry, xs):
        index, micro_batch = xs
        g, s = loss_and_grads(state.params, micro_batch, jax.random.fold_in(key, index),
                              weight_total, seq_total)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               heads.LossSums(*[jnp.zeros((), jnp.float32)] * len(heads.LossSums._fields)))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                      (jnp.arange(grad_accum_steps), micro))
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = heads.summarize(sums)
    metrics.update(learning_rate=setup.schedule(state.step), grad_norm=optax.tree.norm(grads))
    if skip_nonfinite:
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      keep = lambda new, old: jnp.where(finite, new, old)   # noqa: E731
      params = jax.tree.map(keep, params, state.params)
      opt_state = jax.tree.map(keep, opt_state, state.opt_state)
      metrics["skipped_steps"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  batch_shardings = loader.batch_shardings(setup.mesh)
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def make_eval_step(setup: Setup) -> Callable:
  """jit((params, batch) -> LossSums) without dropout; sums add up across eval batches."""

  def eval_step(params, batch):
    out = setup.apply(params, batch)
    return heads.loss_sums(out.mlm_logits, out.nsp_logits, batch)

  return jax.jit(eval_step, in_shardings=(setup.state_shardings.params,
                                          loader.batch_shardings(setup.mesh)),
                 out_shardings=sharding.replicated(setup.mesh))


def compile_in_background(jitted: Callable, mesh: Mesh, *args: Any) -> threading.Thread:
  """Starts compiling `jitted` for arguments shaped and placed like `args` (arrays or
  ShapeDtypeStructs with shardings) on a thread, so that its first call finds the program in JAX's
  cache. Join the thread before that call: a call while it still compiles compiles again. A
  failure is left for the first call to raise in the foreground.

  The thread is not a daemon: a program that stops on an error while it compiles waits for it at
  exit. A daemon thread still inside JAX when the interpreter shuts down aborts the process
  ("FATAL: exception not rethrown", exit status 134, seen on 1 in 8 `pretrain` runs at base whose
  data path was wrong), which would replace the program's one-line error. So run the cheap checks
  before starting it; a second Ctrl-C during that wait still ends the process the hard way."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      args)                     # taken now: the arrays themselves may be donated meanwhile

  def compile_():
    try:
      with jax.set_mesh(mesh):
        jitted.lower(*abstract).compile()
    except Exception:  # pylint: disable=broad-except
      logging.debug("background compilation failed; the first call will compile", exc_info=True)

  thread = threading.Thread(target=compile_, name="compile-ahead", daemon=False)
  thread.start()
  return thread


@dataclasses.dataclass(frozen=True)
class Built:
  """A pretraining run's static parts and its jitted steps (call them under `jax.set_mesh`)."""
  setup: Setup
  train_step: Callable        # (state, batch) -> (state, metrics), state donated
  eval_step: Callable         # (params, batch) -> heads.LossSums


def build(config: ml_collections.ConfigDict, mesh: Mesh, process_count: int | None = None
          ) -> Built:
  """The one recipe for the step: validate against the mesh, lay out the state, jit the steps."""
  validate(config, mesh, jax.process_count() if process_count is None else process_count)
  setup = make_setup(config, mesh)
  logging.info("%s", setup.speed_path.describe())
  skip = bool(config.train.get("skip_nonfinite_steps", False))
  return Built(setup, make_train_step(setup, config.train.grad_accum_steps, skip),
               make_eval_step(setup))
