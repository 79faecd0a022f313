"""Sharded train state, the pure train/eval steps, and the pretraining loop.

The model is split once (`nnx.split`) into a static graph and a pure dict of parameters; the jitted
steps take and return plain pytrees, with the state donated and explicit in/out shardings. Parameters
and optimizer state are created directly in their sharded layout, never whole on one device.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import signal
import time
from typing import Any

from absl import logging
import flax
from flax import nnx
import fsspec
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax
import tqdm

from pretrain import heads
from pretrain import input as input_lib
from pretrain import masking
from pretrain import perf
from pretrain import sharding
from pretrain import shards
from pretrain.checkpoint import Checkpointer, abstract_like
from pretrain.logs import MetricsWriter, write_text
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.optim import make_optimizer
from pretrain.perf import flops_per_sequence
from pretrain.synthetic import SyntheticSource
from pretrain.tokenizer import check_tokenizer, load_tokenizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # pure nested dict of float32 arrays (see BertForPreTraining)
  opt_state: Any           # optax state
  rng: jax.Array           # uint32 key data; dropout uses fold_in(rng, step)


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
  if k < 1:
    raise ValueError(f"train.grad_accum_steps={k} must be at least 1")
  if train.global_batch_size % (dp * k):
    raise ValueError(
        f"train.global_batch_size={train.global_batch_size} must be divisible by the data-parallel "
        f"size ({dp} = data x fsdp of mesh {dict(mesh.shape)}) times train.grad_accum_steps={k}; "
        f"e.g. {max(dp * k, train.global_batch_size // (dp * k) * dp * k)}")
  if train.global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size={train.global_batch_size} must be divisible by the "
                     f"number of processes ({process_count})")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run on a mesh: the graph, the optimizer and the state's shardings."""
  model_config: BertConfig
  mesh: Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState

  def init(self, seed: int) -> TrainState:
    """A fresh train state, created directly in its sharded layout."""

    def init_state(key):
      params = nnx.split(BertForPreTraining(self.model_config, rngs=nnx.Rngs(key)))[1]
      params = nnx.to_pure_dict(params)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params),
                        rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    with jax.set_mesh(self.mesh):
      return jax.jit(init_state, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed))

  def apply(self, params, batch, key=None) -> Any:
    return nnx.merge(self.graphdef, params)(batch, key)


def make_setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
  model_config = BertConfig.from_config(config.model)
  tx, schedule = make_optimizer(config.optim, config.train.num_train_steps)
  abstract_model = nnx.eval_shape(lambda: BertForPreTraining(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)

  shardings, abstract = state_layout(abstract_params, tx, mesh)
  return Setup(model_config, mesh, graphdef, tx, schedule, shardings, abstract)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict:
  """NamedShardings of an (abstract) nnx param state, from each parameter's logical `axes`."""
  out = {}
  for path, variable in nnx.to_flat_state(abstract_params):
    axes = variable.get_metadata()["axes"]
    name = "/".join(map(str, path))
    sharding.check_divisible(name, variable.shape, axes, mesh)
    _set_path(out, path, sharding.named(mesh, axes))
  return out


def state_layout(abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh
                 ) -> tuple[TrainState, TrainState]:
  """(shardings, abstract state with those shardings) of a TrainState holding these params."""
  params_sharding = param_shardings(abstract_params, mesh)
  params = nnx.to_pure_dict(abstract_params)
  replicated = sharding.replicated(mesh)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, params_sharding,
                                        transform_non_params=lambda _: replicated)
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0)))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_abstract, rng=rng)
  shardings = TrainState(step=replicated, params=params_sharding, opt_state=opt_shardings,
                         rng=replicated)
  return shardings, abstract_like(abstract, shardings)


def _set_path(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _split_micro(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...), micro-batch i = rows i, i+k, ...: each device keeps its own rows."""
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def make_train_step(setup: Setup, grad_accum_steps: int = 1) -> Callable:
  """jit((state, batch) -> (state, metrics)), state donated; call it under `jax.set_mesh`."""

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
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  batch_shardings = input_lib.batch_shardings(setup.mesh)
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def make_eval_step(setup: Setup) -> Callable:
  """jit((params, batch) -> LossSums) without dropout; sums add up across eval batches."""

  def eval_step(params, batch):
    out = setup.apply(params, batch)
    return heads.loss_sums(out.mlm_logits, out.nsp_logits, batch)

  return jax.jit(eval_step, in_shardings=(setup.state_shardings.params,
                                          input_lib.batch_shardings(setup.mesh)),
                 out_shardings=sharding.replicated(setup.mesh))


class PreemptionGuard:
  """Turns SIGTERM/SIGINT (TPU maintenance, Ctrl-C) into a flag the loop checks between steps.

  With several processes the flag is shared only at log steps (see `should_stop`), so a signalled
  run stops at the next multiple of `train.log_every_steps`, on every process at once.
  """

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: nothing to install
        pass
    return self

  def _handle(self, signum, _frame):
    self.requested = signal.Signals(signum).name

  def should_stop(self, sync_point: bool) -> bool:
    """Whether to stop after this step; call it on every process at every step.

    One process stops as soon as a signal arrived. Several processes may get SIGTERM at different
    steps, yet must all save the same step: they stop only at sync points (`sync_point` must be
    the same on all processes, e.g. the log steps, where the loop syncs with the host anyway) and
    only together, when any of them has been signalled.
    """
    if jax.process_count() == 1:
      return self.requested is not None
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def make_source(config: ml_collections.ConfigDict, *, split: str) -> input_lib.Source | None:
  """The host-local batch stream of `split` ("train" or "eval"); None if the data has no such split."""
  data = config.data
  seed = config.seed if split == "train" else data.eval_seed
  common = dict(global_batch_size=config.train.global_batch_size, seed=seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if data.source == "synthetic":
    return SyntheticSource(
        vocab_size=config.model.vocab_size, max_seq_length=data.max_seq_length,
        max_predictions_per_seq=data.max_predictions_per_seq,
        masked_lm_prob=data.masked_lm_prob, **common)
  if data.source != "shards":
    raise ValueError(f"data.source={data.source!r}; choose 'shards' or 'synthetic'")
  if not data.path:
    raise ValueError("data.source='shards' needs data.path, a directory made by "
                     "`python -m tools.data create`")
  manifest = shards.read_manifest(data.path)
  if split not in manifest["splits"]:
    return None
  tokenizer = tokenizer_of_shards(data.path, manifest)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} but the tokenizer of the shards "
                     f"in {data.path} has {tokenizer.vocab_size} entries; set "
                     f"--config.model.vocab_size={tokenizer.vocab_size}")
  spec = masking.MaskingSpec.for_tokenizer(tokenizer, data.max_predictions_per_seq,
                                           data.masked_lm_prob, data.whole_word_mask)
  return input_lib.ShardSource(
      data.path, split=split, max_seq_length=data.max_seq_length,
      max_predictions_per_seq=data.max_predictions_per_seq, dynamic_masking=spec,
      verify=data.verify_checksums, **common)


def tokenizer_of_shards(directory: str, manifest: dict[str, Any]):
  """The tokenizer recorded with the shards, checked against its hash in the manifest."""
  info = manifest["tokenizer"]
  path = os.path.join(directory, info["file"])
  check_tokenizer(path, info["sha256"])
  return load_tokenizer(path, lowercase=info.get("lowercase"))


def record_tokenizer(data_path: str, workdir: str):
  """Copies the shards' tokenizer into the workdir with its manifest entry (`tokenizer.json`), so a
  checkpoint carries the vocabulary it was trained with (fine-tuning reads it from there)."""
  info = shards.read_manifest(data_path)["tokenizer"]
  source, target = os.path.join(data_path, info["file"]), os.path.join(workdir, info["file"])
  check_tokenizer(source, info["sha256"])
  with fsspec.open(source, "rb") as f_in, fsspec.open(target, "wb") as f_out:
    f_out.write(f_in.read())
  write_text(os.path.join(workdir, "tokenizer.json"), json.dumps(info, indent=2))


def held_out_batches(config: ml_collections.ConfigDict) -> list[dict]:
  """The first `train.eval_steps` host batches of the held-out stream; [] if there is none.

  Read once per run: every evaluation scores the same batches, without re-opening (and
  re-verifying) the eval shards.
  """
  source = make_source(config, split="eval")
  return [] if source is None else [next(source) for _ in range(config.train.eval_steps)]


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict[str, float]:
  """Metrics summed over `batches` (`held_out_batches`); {} without any."""
  total = None
  for batch in batches:
    sums = eval_step(params, input_lib.to_global(batch, mesh))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    return {}
  return {k: float(v) for k, v in heads.summarize(jax.device_get(total)).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains until `train.num_train_steps`, resuming from the workdir's latest checkpoint."""
  train_cfg = config.train
  mesh = sharding.make_mesh(config.mesh.shape)
  validate(config, mesh, jax.process_count())
  setup = make_setup(config, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      save_interval_steps=config.ckpt.save_interval_steps,
                      max_to_keep=config.ckpt.max_to_keep, async_save=config.ckpt.async_save)
  source = make_source(config, split="train")
  if ckpt.latest_step is not None:
    state, data_state = ckpt.restore(setup.abstract_state)
    source.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
  else:
    state = setup.init(config.seed)
    logging.info("initialised a new model: %s", _param_summary(state.params))
  start = int(state.step)

  writer = MetricsWriter(workdir)
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    if config.data.source == "shards":
      record_tokenizer(config.data.path, workdir)
  train_step, eval_step = make_train_step(setup, train_cfg.grad_accum_steps), make_eval_step(setup)
  eval_batches = None                          # held_out_batches, read at the first evaluation
  seq_len = config.data.max_seq_length
  flops = flops_per_sequence(setup.model_config, seq_len, config.data.max_predictions_per_seq)
  peak = train_cfg.peak_tflops_per_device or perf.peak_tflops(jax.devices()[0].device_kind)

  batches = input_lib.Prefetcher(source, mesh)
  pending: list[dict[str, jax.Array]] = []
  progress = tqdm.tqdm(total=train_cfg.num_train_steps, initial=start, desc="pretrain",
                       disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=2.0)
  step, last_log_step, last_log_time = start, start, time.perf_counter()
  try:
    with PreemptionGuard() as guard, jax.set_mesh(mesh):
      while step < train_cfg.num_train_steps:
        state, metrics = train_step(state, next(batches))
        step += 1
        pending.append(metrics)
        progress.update(1)
        log_step = step % train_cfg.log_every_steps == 0 or step == train_cfg.num_train_steps
        if log_step:
          values = _mean(jax.device_get(pending))    # the hot loop syncs only at log steps
          elapsed = time.perf_counter() - last_log_time
          seq_per_s = (step - last_log_step) * train_cfg.global_batch_size / elapsed
          values.update(seq_per_s=seq_per_s, tokens_per_s=seq_per_s * seq_len,
                        tflops_per_device=seq_per_s * flops / 1e12 / jax.device_count())
          if peak:
            values["mfu"] = values["tflops_per_device"] / peak
          writer.write(step, values, "train")
          progress.set_postfix(loss=f"{values['loss']:.3f}", mlm_acc=f"{values['mlm_accuracy']:.3f}",
                               seq_s=f"{seq_per_s:.0f}", refresh=False)
          pending, last_log_step, last_log_time = [], step, time.perf_counter()
        if step % train_cfg.eval_every_steps == 0 or step == train_cfg.num_train_steps:
          if eval_batches is None:
            eval_batches = held_out_batches(config)
          eval_metrics = evaluate(eval_step, state.params, eval_batches, mesh)
          if eval_metrics:
            writer.write(step, eval_metrics, "eval")
            progress.write(f"step {step}: eval " + " ".join(
                f"{k}={v:.4f}" for k, v in eval_metrics.items()))
          else:
            logging.info("no eval split in %s: evaluation skipped", config.data.path)
          last_log_time = time.perf_counter()        # evaluation is not training throughput
        ckpt.save(step, state, batches.state(), force=step == train_cfg.num_train_steps)
        if guard.should_stop(sync_point=log_step):
          logging.warning("%s received: saving a checkpoint at step %d and stopping",
                          guard.requested or "a stop signal on another process", step)
          ckpt.save(step, state, batches.state(), force=True)
          break
  finally:
    batches.close()
    progress.close()
    ckpt.close()
    writer.close()
  return state


def _mean(history: list[dict[str, Any]]) -> dict[str, float]:
  return {k: float(sum(float(h[k]) for h in history) / len(history)) for k in history[0]}


def _param_summary(params) -> str:
  n = sum(x.size for x in jax.tree.leaves(params))
  return f"{n / 1e6:.2f}M parameters"
