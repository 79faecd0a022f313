"""The pretraining loop: data in, steps on the mesh, metrics, evaluation, checkpoints, preemption.

The step itself is built in `pretrain.step` (shared with the benchmark and the AOT check); this
module runs it: it resumes from the workdir's latest checkpoint, feeds batches from the loader,
logs at log steps only (the one host sync), evaluates on the held-out stream and saves.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from absl import logging
import fsspec
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from pretrain import guard as guard_lib
from pretrain import perf
from pretrain import sharding
from pretrain import step as step_lib
from pretrain import workdir_lock
from pretrain.checkpoint import Checkpointer
from pretrain.data import loader
from pretrain.data import shards
from pretrain.data.tokenizer import check_tokenizer
from pretrain.logs import MetricsWriter, write_config, write_text
from pretrain.model import heads
from pretrain.state import TrainState


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
  source = loader.make_source(config, split="eval")
  if source is None:
    return []
  try:
    return [next(source) for _ in range(config.train.eval_steps)]
  finally:
    if hasattr(source, "close"):    # a remote ShardSource: stop reading ahead
      source.close()


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict[str, float]:
  """Metrics summed over `batches` (`held_out_batches`); {} without any."""
  total = None
  for batch in batches:
    sums = eval_step(params, loader.to_global(batch, mesh))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    return {}
  return {k: float(v) for k, v in heads.summarize(jax.device_get(total)).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Pretrains until `train.num_train_steps`, resuming from the workdir's newest intact checkpoint.

  The run holds the workdir's lock throughout (another run on it raises workdir_lock.WorkdirBusy).
  A loss or gradient norm that is not finite stops it with guard.NonFiniteError, and a checkpoint
  that cannot be saved or restored with checkpoint.CheckpointError: each one line that says what
  survived (docs/reliability.md).
  """
  with workdir_lock.held(workdir):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  train_cfg = config.train
  mesh = sharding.make_mesh(config.mesh.shape)
  built = step_lib.build(config, mesh)
  setup = built.setup
  batch_shape = loader.abstract_batch(config.train.global_batch_size, config.data.max_seq_length,
                                      config.data.max_predictions_per_seq, mesh)
  source = loader.make_source(config, split="train")    # the data's checks, before anything is made
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      save_interval_steps=config.ckpt.save_interval_steps,
                      max_to_keep=config.ckpt.max_to_keep, async_save=config.ckpt.async_save,
                      checksums=config.ckpt.get("checksums", True))
  try:
    # The train step compiles while the checkpoint is restored or the model initialised; started
    # after the data's checks, so that a mistake there is reported without waiting for it.
    compiling = step_lib.compile_in_background(built.train_step, mesh, setup.abstract_state,
                                               batch_shape)
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is not None:
      source.set_state(restored[1])
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, _, _ = restored
    logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
  else:
    state = setup.init(config.seed)
    logging.info("initialised a new model: %s", _param_summary(state.params))
  start = int(state.step)
  finite = guard_lib.Guard(ckpt, guard_lib.learning_rate_key(config))

  writer = MetricsWriter(workdir)
  if jax.process_index() == 0:
    write_config(workdir, config, setup.speed_path)
    if config.data.source == "shards":
      record_tokenizer(config.data.path, workdir)
  train_step, eval_step = built.train_step, built.eval_step
  eval_batches = None                          # held_out_batches, read at the first evaluation
  seq_len = config.data.max_seq_length
  flops = perf.flops_per_sequence(setup.model_config, seq_len, config.data.max_predictions_per_seq)
  peak = train_cfg.peak_tflops_per_device or perf.peak_tflops(jax.devices()[0].device_kind)

  compiling.join()
  # The eval step compiles while the first steps train, not at the first evaluation.
  compiling = step_lib.compile_in_background(eval_step, mesh, setup.abstract_state.params,
                                             batch_shape)
  batches = loader.Prefetcher(source, mesh)
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
          pending = jax.device_get(pending)          # the hot loop syncs only at log steps
          finite.check_metrics(pending, last_log_step + 1)
          values = guard_lib.aggregate(pending)
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
        every = train_cfg.eval_every_steps
        if (every and step % every == 0) or step == train_cfg.num_train_steps:
          pending = jax.device_get(pending)          # evaluation syncs: check first
          finite.check_metrics(pending, last_log_step + 1)
          if eval_batches is None:
            eval_batches = held_out_batches(config)
            compiling.join()
          eval_metrics = evaluate(eval_step, state.params, eval_batches, mesh)
          if eval_metrics:
            writer.write(step, eval_metrics, "eval")
            progress.write(f"step {step}: eval " + " ".join(
                f"{k}={v:.4f}" for k, v in eval_metrics.items()))
          else:
            logging.info("no eval split in %s: evaluation skipped", config.data.path)
          last_log_time = time.perf_counter()        # evaluation is not training throughput
        pending = _checked_save(ckpt, finite, step, state, batches, pending, last_log_step,
                                force=step == train_cfg.num_train_steps)
        if guard.should_stop(sync_point=log_step):
          logging.warning("%s received: saving a checkpoint at step %d and stopping",
                          guard.requested or "a stop signal on another process", step)
          _checked_save(ckpt, finite, step, state, batches, pending, last_log_step, force=True)
          break
  finally:
    batches.close()
    progress.close()
    writer.close()
    ckpt.close()          # last: it raises CheckpointError if the final save failed
  return state


def _checked_save(ckpt: Checkpointer, finite: guard_lib.Guard, step: int, state: TrainState,
                  batches: loader.Prefetcher, pending: list[dict[str, Any]], last_log_step: int,
                  force: bool) -> list[dict[str, Any]]:
  """Saves if `step` is due (or `force`), after checking the steps since the last log and the
  state itself: a save is a host sync anyway, and no checkpoint may hold a diverged state.
  Returns `pending` (fetched to the host if it checked them)."""
  if ckpt.will_save(step, force):
    pending = jax.device_get(pending)
    finite.check_metrics(pending, last_log_step + 1)
    finite.check_state(state, step)
    ckpt.save(step, state, batches.state(), force=True)
  return pending


def _param_summary(params) -> str:
  n = sum(x.size for x in jax.tree.leaves(params))
  return f"{n / 1e6:.2f}M parameters"
