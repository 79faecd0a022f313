"""The train state and its layout on the mesh: what pretraining and fine-tuning share.

A model is split once (`nnx.split`) into a static graph and a pure dict of parameters. `Setup` holds
the static parts of a run (graph, optimizer, the state's shardings); `TrainState` is the pytree the
jitted step takes and returns, created directly in its sharded layout, never whole on one device.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from pretrain import sharding
from pretrain.checkpoint import abstract_like
from pretrain.model.config import BertConfig
from pretrain.speed import SpeedPath


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # pure nested dict of float32 arrays (see BertForPreTraining)
  opt_state: Any           # optax state
  rng: jax.Array           # uint32 key data; dropout uses fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run on a mesh: the graph, the optimizer and the state's shardings."""
  model_config: BertConfig
  mesh: Mesh
  make_model: Callable[[Any], nnx.Module]   # PRNG key (or int seed) -> a freshly initialised model
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState
  speed_path: SpeedPath

  def init(self, seed: int, restore: Callable[[Any], Any] | None = None) -> TrainState:
    """A fresh train state, created directly in its sharded layout.

    `restore(params) -> params` may replace some of the fresh parameters (fine-tuning puts the
    pretrained encoder in) before the optimizer state is made for them.
    """
    key = jax.random.PRNGKey(seed)
    with jax.set_mesh(self.mesh):
      params = jax.jit(lambda k: nnx.to_pure_dict(nnx.split(self.make_model(k))[1]),
                       out_shardings=self.state_shardings.params)(key)
      if restore is not None:
        params = restore(params)
      return self._with_optimizer(params, key)

  def from_params(self, params: Any, seed: int) -> TrainState:
    """The train state of given parameters (host arrays, the tree of `abstract_state.params`),
    put in their sharded layout and dtype without drawing random ones first (for BERT-Base that
    saves compiling and running the whole initialiser); step, optimizer state and rng as
    `init(seed)` makes them."""
    abstract = self.abstract_state.params
    if jax.tree.structure(params) != jax.tree.structure(abstract):
      raise ValueError("the parameters do not have the model's parameter tree")
    with jax.set_mesh(self.mesh):
      placed = jax.tree.map(lambda a, x, s: jax.device_put(np.asarray(x, a.dtype), s),
                            abstract, params, self.state_shardings.params)
      return self._with_optimizer(placed, jax.random.PRNGKey(seed))

  def _with_optimizer(self, params: Any, key: jax.Array) -> TrainState:
    def make(params, key):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params),
                        rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    return jax.jit(make, out_shardings=self.state_shardings, donate_argnums=0)(params, key)

  def apply(self, params, batch, key=None) -> Any:
    return nnx.merge(self.graphdef, params)(batch, key)


def make_setup(make_model: Callable[[Any], nnx.Module], model_config: BertConfig, mesh: Mesh,
               tx: optax.GradientTransformation, schedule: optax.Schedule, speed_path: SpeedPath
               ) -> Setup:
  """The Setup of `make_model`'s model (built on `speed_path`) with optimizer `tx`, its state laid
  out over `mesh`."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: make_model(0)))
  shardings, abstract = state_layout(abstract_params, tx, mesh)
  return Setup(model_config, mesh, make_model, graphdef, tx, schedule, shardings, abstract,
               speed_path)


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
