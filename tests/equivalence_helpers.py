"""What tests/test_equivalence.py and tests/test_equivalence_training.py share: Setups, train
steps and initial states, batches of the synthetic source, and the comparisons of runs.

All in float32 with `tiny_config`. Compiling is what costs time on CPU, so Setups, train steps and
initial states are built once per (mesh, config) and shared by the tests of both files (this
module's caches).
"""

import functools

import jax
import numpy as np

from helpers import tiny_config
from pretrain import sharding
from pretrain import state as state_lib
from pretrain import step as step_lib
from pretrain.data import loader
from pretrain.data.synthetic import SyntheticSource

SEED = 0
STEPS = 3             # step 0 has learning rate 0 (linear warmup from 0): 3 steps = 2 real updates
RTOL, ATOL = 1e-5, 1e-6
SINGLE = (1, 1, 1)
NO_OVERRIDES = ()


def make_mesh(shape):
  return sharding.make_mesh(shape, jax.devices()[:1] if shape == SINGLE else None)


def config_for(overrides=NO_OVERRIDES):
  return tiny_config(**{"data.source": "synthetic", **dict(overrides)})


@functools.cache
def get_setup(shape, overrides=NO_OVERRIDES) -> state_lib.Setup:
  return step_lib.make_setup(config_for(overrides), make_mesh(shape))


@functools.cache
def get_train_step(shape, overrides=NO_OVERRIDES, grad_accum_steps=1):
  return step_lib.make_train_step(get_setup(shape, overrides), grad_accum_steps)


_INITS = {}      # shape -> host copy of Setup.init(SEED)
_UNUSED = {}     # shape -> that init's device arrays, until a test takes them (init compiles once)


def get_init(shape):
  """Host copy of `Setup.init(SEED)` on this mesh, computed once."""
  if shape not in _INITS:
    state = get_setup(shape).init(SEED)
    _INITS[shape], _UNUSED[shape] = to_host(state), state
  return _INITS[shape]


def init_on_device(shape):
  """`Setup.init(SEED)`'s own output arrays (not a copy put back on the mesh)."""
  get_init(shape)
  if shape in _UNUSED:
    return _UNUSED.pop(shape)
  return get_setup(shape).init(SEED)


def to_host(tree):
  """A numpy copy (np.array copies: nothing aliases a buffer that a donating step may free)."""
  return jax.tree.map(np.array, tree)


def on_device(host_state, setup):
  return jax.device_put(host_state, setup.state_shardings)


def train_batches(config, start, count):
  source = loader.make_source(config, split="train")
  assert isinstance(source, SyntheticSource)
  source.set_state({"next_batch": start})
  return [next(source) for _ in range(count)]


def run_steps(step_fn, mesh, state, local_batches):
  """Runs the train step over the batches; returns the final state and host metrics per step."""
  history = []
  with jax.set_mesh(mesh):
    for batch in local_batches:
      state, metrics = step_fn(state, loader.to_global(batch, mesh))
      history.append(to_host(metrics))
  return state, history


def assert_metrics_close(got, want, rtol=RTOL, note=""):
  assert len(got) == len(want)
  for step, (g, w) in enumerate(zip(got, want)):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=0,
                                 err_msg=f"metric {key} at step {step}{note}")


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
