"""The fine-tuning run: model from a pretraining checkpoint, sharded train/predict steps, evaluation,
best-checkpoint keeping, prediction files, and several seeds summarised.

Layout of a run's workdir: `seed_<s>/` per seed (metrics.jsonl, tensorboard/, best/ checkpoint,
prediction files, results.json) and a top-level `results.json` with every seed and the mean, standard
deviation and median of each metric.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from absl import logging
from flax import nnx
import fsspec
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax
import tqdm

from configs.pretrain import get_config as pretrain_config
from finetune import batches
from finetune import heads
from finetune import lbfgs
from finetune import pretrained as pretrained_lib
from finetune.optim import make_optimizer
from finetune.task import Task, check_inputs, make_task
from pretrain import sharding
from pretrain import speed
from pretrain.checkpoint import Checkpointer
from pretrain.optim import peak_learning_rate
from pretrain.data.tokenizer import load_tokenizer
from pretrain.logs import MetricsWriter, write_config, write_text
from pretrain.model.config import ARCHITECTURE_KEYS, BertConfig
from pretrain.state import Setup, TrainState, make_setup as make_state_setup

# ------------------------------------------------------------------------------------------------
# Model, tokenizer and initial weights


def model_config_for(config: ml_collections.ConfigDict, pretrained) -> BertConfig:
  """The checkpoint's architecture with this config's dropout/precision; checks explicit overrides."""
  if pretrained is not None:
    architecture, where = dict(pretrained.architecture), f"the checkpoint in {pretrained.workdir}"
  elif config.model_variant:
    variant = pretrain_config(config.model_variant).model
    architecture = {k: variant[k] for k in ARCHITECTURE_KEYS}
    where = f"configs/pretrain.py:{config.model_variant}"
  else:
    raise ValueError("set --config.init_checkpoint=PRETRAINING_WORKDIR, or --config.from_scratch "
                     "with --config.model_variant=VARIANT and --config.tokenizer=PATH")
  for key, value in config.model.items():
    if key in architecture and value is not None and value != architecture[key]:
      raise ValueError(f"model.{key}={value} but {where} has {key}={architecture[key]}")
  runtime = {k: v for k, v in config.model.items() if k not in ARCHITECTURE_KEYS}
  model_config = BertConfig(**architecture, **runtime)
  model_config.validate()
  return model_config


def load_pretrained(config: ml_collections.ConfigDict):
  """(Pretrained or None, tokenizer) with the vocabulary checked against the model."""
  pretrained = None
  if config.init_checkpoint:
    pretrained = pretrained_lib.locate(config.init_checkpoint, config.init_step)
  elif not config.from_scratch:
    raise ValueError("no --config.init_checkpoint given; pass one, or --config.from_scratch=True "
                     "to fine-tune from random weights")
  if config.tokenizer:
    tokenizer = load_tokenizer(config.tokenizer)
  elif pretrained is not None:
    tokenizer = pretrained.tokenizer()
  else:
    raise ValueError("from scratch without a checkpoint needs --config.model_variant=VARIANT (a "
                     "configs/pretrain.py variant) and --config.tokenizer=PATH")
  return pretrained, tokenizer


def pooling_of(config: ml_collections.ConfigDict) -> str:
  """The head's pooling: head.pooling in full fine-tuning, head.feature_pooling in features mode."""
  return config.head.feature_pooling if config.head.mode == "features" else config.head.pooling


def restores_pooler(config: ml_collections.ConfigDict, task: Task) -> bool:
  """Whether the checkpoint's pooler is restored: asked for (restore_pooler), read by the head."""
  return config.restore_pooler and heads.uses_pooler(task.kind, config.head.mode == "features",
                                                     pooling_of(config))


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer, pretrained,
                    model_config: BertConfig):
  """Refuses a tokenizer the model cannot read: another vocabulary size, or, where pretrained
  weights are restored, a `--config.tokenizer` other than the one they were pretrained with (the
  same size does not make the same vocabulary: a SentencePiece and BERT's WordPiece can both have
  30,522 entries)."""
  pretrained_lib.check_vocabulary(tokenizer, model_config.vocab_size,
                                  "model_variant" if pretrained is None else pretrained.workdir)
  recorded = None if pretrained is None or config.from_scratch else pretrained.tokenizer_sha256
  if recorded not in (None, tokenizer.sha256):
    raise ValueError(f"vocabulary mismatch: the tokenizer {tokenizer.path} is not the one "
                     f"{pretrained.workdir} was pretrained with ({pretrained.tokenizer_path}: same "
                     "size, other entries); drop --config.tokenizer to use the checkpoint's own")


def make_setup(config: ml_collections.ConfigDict, task: Task, model_config: BertConfig, mesh: Mesh,
               num_steps: int) -> Setup:
  features = config.head.mode == "features"
  if config.head.mode not in ("finetune", "features"):
    raise ValueError(f"head.mode={config.head.mode!r}; choose 'finetune' or 'features'")

  path = speed.resolve(model_config, mesh=mesh, seq_len=config.data.max_seq_length)

  def make_model(key):
    return heads.TaskModel(model_config, kind=task.kind, num_labels=task.num_labels,
                           head_dropout=config.head.dropout, features=features,
                           pooling=pooling_of(config), rngs=nnx.Rngs(key), path=path)

  # Features mode freezes the encoder (only the scalar mix and the head train); a head that does
  # not read the pooler leaves it frozen too, rather than decaying weights nothing uses.
  pooler_unused = not heads.uses_pooler(task.kind, features, pooling_of(config))

  def frozen(path) -> bool:
    names = tuple(getattr(k, "key", None) for k in path[:2])
    return (features and names[0] == "bert") or (pooler_unused and names == ("bert", "pooler"))

  trainable = None
  if features or pooler_unused:
    abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: make_model(0)))[1])
    trainable = jax.tree_util.tree_map_with_path(lambda path, _: not frozen(path),
                                                 abstract_params)
  tx, schedule = make_optimizer(config.optim, num_steps, model_config.num_layers, trainable)
  return make_state_setup(make_model, model_config, mesh, tx, schedule, path)


def init_state(setup: Setup, seed: int, pretrained, restore_pooler: bool) -> TrainState:
  """Random head (and encoder, from scratch); the pretrained encoder restored into its shardings."""
  if pretrained is None:
    return setup.init(seed)

  def restore(params):
    target = dict(setup.abstract_state.params["bert"])
    if not restore_pooler:
      target.pop("pooler")
    return {**params, "bert": {**params["bert"],
                               **pretrained_lib.restore_encoder(pretrained, target)}}

  return setup.init(seed, restore)


# ------------------------------------------------------------------------------------------------
# Steps


def make_train_step(setup: Setup, kind: str, batch_example: dict[str, np.ndarray]):
  """jit((state, batch) -> (state, metrics)), state donated."""

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      total, count = heads.loss_sums(kind, setup.apply(params, batch, key), batch)
      return total / jnp.maximum(count, 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, learning_rate=setup.schedule(state.step),
                   grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_shardings = batches.batch_shardings(setup.mesh, batch_example)
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def make_predict_step(setup: Setup):
  """jit((params, inputs) -> outputs) without dropout, outputs replicated (every host gets all)."""
  inputs = {k: np.zeros((1, 1), np.int32) for k in batches.INPUT_KEYS}
  return jax.jit(lambda params, batch: setup.apply(params, batch),
                 in_shardings=(setup.state_shardings.params,
                               batches.batch_shardings(setup.mesh, inputs)),
                 out_shardings=sharding.replicated(setup.mesh))


# ------------------------------------------------------------------------------------------------
# One seed, several seeds


def evaluate(task: Task, predict_step, params, mesh, batch_size: int) -> tuple[dict, dict]:
  """(metrics over every labelled eval set, outputs of every set by name)."""
  metrics, outputs = {}, {}
  for eval_set in task.eval_sets():
    outputs[eval_set.name] = batches.predict(predict_step, params, eval_set.features, batch_size,
                                             mesh)
    if eval_set.labelled:
      metrics.update({f"{eval_set.name}/{k}": v
                      for k, v in task.metrics(eval_set, outputs[eval_set.name]).items()})
  return metrics, outputs


def run_seed(config, task: Task, setup: Setup, steps: tuple[Any, Any], pretrained, seed: int,
             workdir: str, num_steps: int) -> dict[str, Any]:
  """One fine-tuning run; `steps` = (train_step, predict_step), compiled once for all seeds."""
  train_cfg = config.train
  train_step, predict_step = steps
  state = init_state(setup, seed, None if config.from_scratch else pretrained,
                     restores_pooler(config, task))
  writer = MetricsWriter(workdir)
  best = Checkpointer(os.path.join(workdir, "best"), save_interval_steps=1, max_to_keep=1,
                      async_save=False, best_metric=task.main_metric) \
      if config.ckpt.keep_best else None
  history, best_metrics, best_step, best_outputs = [], None, 0, {}
  start_time = time.perf_counter()

  def record(step, params):
    nonlocal best_metrics, best_step, best_outputs
    metrics, outputs = evaluate(task, predict_step, params, setup.mesh, train_cfg.eval_batch_size)
    writer.write(step, metrics, "eval")
    history.append({"step": step, **metrics})
    if best_metrics is None or metrics[task.main_metric] > best_metrics[task.main_metric]:
      best_metrics, best_step, best_outputs = metrics, step, outputs
      if best is not None:
        best.save(step, params, metrics=metrics, force=True)
    return metrics

  with jax.set_mesh(setup.mesh):
    if config.optim.solver == "lbfgs":
      params, losses = lbfgs.fit(config, task, setup, state.params)
      writer.write(len(losses), {"loss": losses[-1]}, "train")
      state = state.replace(params=params)
      record(len(losses), state.params)
    elif config.optim.solver != "gradient":
      raise ValueError(f"optim.solver={config.optim.solver!r}; choose 'gradient' or 'lbfgs'")
    else:
      train_features = task.train_features()
      keys = batches.INPUT_KEYS + task.label_keys
      stream = batches.train_batches(train_features, keys, train_cfg.batch_size, seed)
      steps_per_epoch = len(train_features["input_ids"]) // train_cfg.batch_size
      eval_every = train_cfg.eval_every_steps or steps_per_epoch
      progress = tqdm.tqdm(total=num_steps, desc=f"{config.task} seed {seed}", dynamic_ncols=True,
                           disable=jax.process_index() != 0, mininterval=2.0)
      pending, batch = [], next(stream)
      for step in range(1, num_steps + 1):
        state, metrics = train_step(state, batches.to_global(batch, setup.mesh))
        pending.append(metrics)
        progress.update(1)
        if step % train_cfg.log_every_steps == 0 or step == num_steps:
          values = {k: float(np.mean([float(m[k]) for m in jax.device_get(pending)]))
                    for k in pending[0]}
          writer.write(step, values, "train")
          progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
          pending = []
        if step % eval_every == 0 or step == num_steps:
          metrics = record(step, state.params)
          progress.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if step < num_steps:
          batch = next(stream)
      progress.close()

  # Dev predictions come from the best evaluation's outputs; test sets need the best weights back.
  files = []
  if jax.process_index() == 0:
    for eval_set in task.eval_sets():
      files += task.write_predictions(eval_set, best_outputs[eval_set.name], workdir)
  params = state.params
  if task.predict_sets() and best is not None and best.best_step() != history[-1]["step"]:
    params = best.restore(setup.abstract_state.params, best.best_step(), with_data=False)[0]
  for pred_set in task.predict_sets():
    out = batches.predict(predict_step, params, pred_set.features, train_cfg.eval_batch_size,
                          setup.mesh)
    if jax.process_index() == 0:
      files += task.write_predictions(pred_set, out, workdir)
  if best is not None:
    best.close()
  writer.close()
  result = {"seed": seed, "best_step": best_step, "metrics": best_metrics or {},
            "history": history, "files": [os.path.basename(f) for f in files],
            "seconds": round(time.perf_counter() - start_time, 1)}
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, "results.json"), json.dumps(result, indent=2))
  return result


def _finished_seed(seed_dir: str) -> dict[str, Any] | None:
  path = os.path.join(seed_dir, "results.json")
  fs, local = fsspec.core.url_to_fs(path)
  if not fs.exists(local):
    return None
  with fsspec.open(path, "r", encoding="utf-8") as f:
    return json.load(f)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean, sample standard deviation, median, min and max of every metric over the seeds."""
  summary = {}
  for name in runs[0]["metrics"]:
    values = [r["metrics"][name] for r in runs]
    summary[name] = {"mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "median": statistics.median(values), "min": min(values),
                     "max": max(values)}
  return summary


def check_settings(config: ml_collections.ConfigDict):
  """The settings a run divides by, slices with or picks from, before anything is read."""
  for key in ("seeds", "train.batch_size", "train.eval_batch_size"):
    value = config[key] if "." not in key else config.train[key.split(".")[1]]
    if value < 1:
      raise ValueError(f"{key}={value} must be at least 1")
  if config.train.max_train_examples < 0:
    raise ValueError(f"train.max_train_examples={config.train.max_train_examples} must be 0 "
                     "(all) or more")
  peak_learning_rate(config.optim)        # (a negative rate is refused there)
  for key, choices in (("pooling", heads.POOLINGS), ("feature_pooling", heads.FEATURE_POOLINGS)):
    if config.head[key] not in choices:
      raise ValueError(f"head.{key}={config.head[key]!r}; choose one of "
                       f"{', '.join(map(repr, choices))}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes `config.seeds` times (seeds seed, seed+1, ...) and writes `results.json`."""
  check_settings(config)
  check_inputs(config)                  # every input file, before anything is read or compiled
  pretrained, tokenizer = load_pretrained(config)
  model_config = model_config_for(config, pretrained)
  check_tokenizer(config, tokenizer, pretrained, model_config)
  seq_len = config.data.max_seq_length
  if seq_len > model_config.max_position_embeddings:
    raise ValueError(f"data.max_seq_length={seq_len} exceeds the model's max_position_embeddings="
                     f"{model_config.max_position_embeddings}")
  mesh = sharding.make_mesh(config.mesh.shape)
  task = make_task(config, tokenizer)
  num_examples = len(task.train_features()["input_ids"])
  task.eval_sets(), task.predict_sets()   # read now: a bad dev or test file fails before training
  dp = sharding.data_parallel_size(mesh)
  if config.train.batch_size % dp or config.train.eval_batch_size % dp:
    raise ValueError(f"train.batch_size={config.train.batch_size} and train.eval_batch_size="
                     f"{config.train.eval_batch_size} must be multiples of the data-parallel size "
                     f"{dp} of mesh {dict(mesh.shape)}")
  steps_per_epoch = num_examples // config.train.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{num_examples} training examples do not fill one batch of "
                     f"train.batch_size={config.train.batch_size}")
  num_steps = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
  setup = make_setup(config, task, model_config, mesh, num_steps)
  logging.info("%s", setup.speed_path.describe())
  logging.info("fine-tuning %s: %d examples, %d steps, %s", config.task, num_examples, num_steps,
               "from scratch" if config.from_scratch else f"from {config.init_checkpoint}")
  if jax.process_index() == 0:
    write_config(workdir, config, setup.speed_path)

  example = {k: v[:1] for k, v in task.train_features().items()
             if k in batches.INPUT_KEYS + task.label_keys}
  example["weight"] = np.ones(1, np.float32)
  steps = make_train_step(setup, task.kind, example), make_predict_step(setup)
  runs = []
  for seed in range(config.seed, config.seed + config.seeds):
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    finished = _finished_seed(seed_dir)
    if finished is not None:      # a re-run of an interrupted multi-seed job skips what is done
      logging.info("seed %d already finished in %s: reusing its results", seed, seed_dir)
      runs.append(finished)
      continue
    runs.append(run_seed(config, task, setup, steps, pretrained, seed, seed_dir, num_steps))
  results = {"task": config.task, "main_metric": task.main_metric,
             "init": "scratch" if config.from_scratch else config.init_checkpoint,
             "summary": summarize(runs),
             "runs": [{k: r[k] for k in ("seed", "best_step", "metrics")} for r in runs]}
  if jax.process_index() == 0:
    write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    main = results["summary"].get(task.main_metric)
    if main:
      logging.info("%s %s over %d seed(s): median %.4f, mean %.4f, std %.4f", config.task,
                   task.main_metric, len(runs), main["median"], main["mean"], main["std"])
  return results
