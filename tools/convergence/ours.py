"""The project's side: the train and eval steps of `pretrain.step.build`, started from the init
folder's weights, fed by the loader's prefetcher, evaluated as `pretrain.train` evaluates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from pretrain import sharding
from pretrain import step as step_lib
from pretrain import train as train_lib
from pretrain.data import loader
from pretrain.model import hf_convert
from tools.convergence import weights
from tools.convergence.weights import InputError


class Ours:
  """`loop.Side` for the project's pretraining step."""
  system = "ours"

  def __init__(self, config: ml_collections.ConfigDict, init_dir: str):
    self.source = loader.make_source(config, split="train")   # checks the data first
    self.mesh = sharding.make_mesh(config.mesh.shape)
    built = step_lib.build(config, self.mesh)
    # The cheap checks first: an error after the compilations start waits for them at exit.
    if config.model.scan_layers:
      raise InputError("model.scan_layers=True: the transformers import needs one set of "
                       "weights per layer; set --config.model.scan_layers=False")
    self.eval_batches = train_lib.held_out_batches(config)
    if not self.eval_batches:
      raise InputError(f"the shards in {config.data.path} have no eval split: recreate them with "
                       "`python -m tools.data create --eval_fraction=0.01`")
    # Both programs compile while the weights are read and placed (at base on an H100 the train
    # step's compilation took 33 s, after the weights, and the eval step's 10 s at the first
    # evaluation): the train step's is waited for before the first step, in `batches`.
    batch = loader.abstract_batch(config.train.global_batch_size, config.data.max_seq_length,
                                  config.data.max_predictions_per_seq, self.mesh)
    abstract = built.setup.abstract_state
    self._compiling = [
        step_lib.compile_in_background(built.train_step, self.mesh, abstract, batch),
        step_lib.compile_in_background(built.eval_step, self.mesh, abstract.params, batch)]
    self.train_step, self.eval_step = built.train_step, built.eval_step
    self.model_config = built.setup.model_config
    imported = weights.load_params(init_dir, self.model_config)   # (checked by the parent too)
    if jax.tree.structure(imported) != jax.tree.structure(abstract.params):
      raise InputError("the imported weights do not have the model's parameter tree")
    # Every parameter is imported: no random initialiser to compile and run first.
    self.state = built.setup.from_params(imported, config.seed)
    self.info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                     speed_path=built.setup.speed_path.describe())
    self._prefetcher: loader.Prefetcher | None = None

  def batches(self) -> Iterator[Any]:
    self._compiling[0].join()
    self._prefetcher = loader.Prefetcher(self.source, self.mesh)
    return self._prefetcher

  def step(self, batch: Any) -> dict[str, jax.Array]:
    with jax.set_mesh(self.mesh):
      self.state, metrics = self.train_step(self.state, batch)
    return metrics

  def fetch(self, handles: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
    return [dict(loss=float(m["loss"]), learning_rate=float(m["learning_rate"]),
                 grad_norm=float(m["grad_norm"])) for m in jax.device_get(handles)]

  def evaluate(self) -> dict[str, float]:
    self._compiling[1].join()             # (done long before, but for the shortest runs)
    with jax.set_mesh(self.mesh):
      return train_lib.evaluate(self.eval_step, self.state.params, self.eval_batches, self.mesh)

  def hf_state_dict(self) -> dict[str, np.ndarray]:
    return hf_convert.hf_from_params(jax.device_get(self.state.params), self.model_config)

  def close(self) -> None:
    for thread in self._compiling:
      thread.join()
    if self._prefetcher is not None:
      self._prefetcher.close()
