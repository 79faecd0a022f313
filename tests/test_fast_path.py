"""The speed switches of `model.*` compute what the plain path computes (CPU, tiny model).

- `scan_layers`, `remat_policy` and `mlm_gather`: the same loss and gradients (float32, dropout on,
  same key).
- `attention_dropout_impl="lean"` and `logits_grad_dtype="bfloat16"`: the same loss (the forward
  pass is unchanged) and gradients within bfloat16 rounding.
- `dropout_rng="rbg"` and `"threefry"`: other masks than the default `"hash"` (so another loss with
  dropout), deterministic given the key, and the dropout rate kept. (Without dropout no random bits
  are drawn: nothing changes.)
- `dropout_rng="hash"` (the default): hashed masks keep 1 - rate, are uncorrelated across
  neighbours and keys, do not depend on the mesh, and its backward pass recomputes the same mask.
- the exact GELU in its erf form equals jax.nn.gelu's erfc form.
- dropout divides kept values by 1 - rate in float32 (as a bfloat16 constant, 0.9 is 0.8984375).
- a scanned model trains on a mesh: one sharded train step equals the unrolled model's.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close, tiny_config
from pretrain import sharding
from pretrain import state as state_lib
from pretrain import step as step_lib
from pretrain.data import loader
from pretrain.data.synthetic import SyntheticSource
from pretrain.model import dropout as dropout_lib
from pretrain.model import heads
from pretrain.model import layers
from pretrain.model.bert import BertForPreTraining, stack_layer_params, unstack_layer_params
from pretrain.model.config import BertConfig
from pretrain.model.dropout import dropout_key, keep_mask

TINY = BertConfig(vocab_size=250, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=32, dtype="float32", hidden_dropout=0.1,
                  attention_dropout=0.1, attention_dropout_impl="reference")
KEY = jax.random.key(7)


def batch_of(size=8):
  source = SyntheticSource(vocab_size=250, max_seq_length=32, max_predictions_per_seq=5,
                           global_batch_size=size, seed=3)
  return {k: jnp.asarray(v) for k, v in next(source).items()}


def init_params(config=TINY):
  return nnx.to_pure_dict(nnx.split(BertForPreTraining(config, rngs=nnx.Rngs(0)))[1])


@functools.lru_cache(maxsize=None)
def _compiled(config):
  graphdef = nnx.split(nnx.eval_shape(lambda: BertForPreTraining(config, rngs=nnx.Rngs(0))))[0]

  def loss_fn(p, batch, key):
    out = nnx.merge(graphdef, p)(batch, key)
    sums = heads.loss_sums(out.mlm_logits, out.nsp_logits, batch)
    return heads.total_loss(sums, sums.mlm_weight, sums.num_sequences)

  return jax.jit(jax.value_and_grad(loss_fn))


def loss_and_grads(config, params, batch, key=KEY):
  return _compiled(config)(params, batch, key)


@pytest.fixture(scope="module")
def plain():
  params, batch = init_params(), batch_of()
  loss, grads = loss_and_grads(TINY, params, batch)
  return params, batch, float(loss), grads


@pytest.mark.parametrize("scan, policy, gather", [(True, "full", "take"),
                                                  (False, "dots_with_no_batch_dims_saveable",
                                                   "one_hot")])
def test_scan_remat_gather_same_loss_and_grads(plain, scan, policy, gather):
  params, batch, loss, grads = plain
  config = dataclasses.replace(TINY, scan_layers=scan, remat_policy=policy, mlm_gather=gather)
  p = stack_layer_params(params, TINY.num_layers) if scan else params
  fast_loss, fast_grads = loss_and_grads(config, p, batch)
  if scan:
    fast_grads = unstack_layer_params(fast_grads)
  np.testing.assert_allclose(float(fast_loss), loss, rtol=1e-6)
  assert_trees_close(fast_grads, grads, rtol=1e-4, atol=1e-6)


def test_scan_layout_and_conversion():
  config = dataclasses.replace(TINY, scan_layers=True)
  model = nnx.eval_shape(lambda: BertForPreTraining(config, rngs=nnx.Rngs(0)))
  flat = {path: v for path, v in nnx.to_flat_state(nnx.split(model)[1])}
  kernel = flat[("bert", "layers", "attention", "qkv_kernel")]
  assert kernel.shape == (2, 32, 3, 4, 8)
  assert kernel.get_metadata()["axes"] == (None, "embed", "qkv", "heads", "kv")
  params = init_params()
  stacked = stack_layer_params(params, 2)
  assert jax.tree.map(jnp.shape, stacked["bert"]["layers"]) == jax.tree.map(
      jnp.shape, nnx.to_pure_dict(nnx.split(model)[1])["bert"]["layers"])
  assert_trees_close(unstack_layer_params(stacked), params, rtol=0, atol=0)


def test_lean_attention_and_bf16_logit_grads_same_loss():
  config = dataclasses.replace(TINY, dtype="bfloat16")
  fast = dataclasses.replace(config, attention_dropout_impl="lean", logits_grad_dtype="bfloat16")
  params, batch = init_params(), batch_of()
  loss, grads = loss_and_grads(config, params, batch)
  fast_loss, fast_grads = loss_and_grads(fast, params, batch)
  assert float(fast_loss) == float(loss)               # same forward values, same masks
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    f = fast_grads
    for k in path:
      f = f[k.key]
    err = float(jnp.linalg.norm(f - g) / (jnp.linalg.norm(g) + 1e-12))
    assert err < 3e-2, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("rng", ["rbg", "threefry"])
def test_drawn_dropout_masks(plain, rng):
  params, batch, hash_loss, _ = plain
  config = dataclasses.replace(TINY, dropout_rng=rng, residual_norm_impl="xla")
  loss_a, _ = loss_and_grads(config, params, batch)
  loss_b, _ = loss_and_grads(config, params, batch)
  assert float(loss_a) == float(loss_b)                # deterministic given the key
  assert abs(float(loss_a) - hash_loss) > 1e-5         # other masks
  keep = keep_mask(dropout_key(KEY, rng), 0.1, (1 << 20,))
  assert abs(float(keep.mean()) - 0.9) < 3e-3          # 10 sigma at 2^20 draws


def test_hashed_dropout_masks():
  words = jax.random.bits(KEY, (2,), jnp.uint32)
  keep = np.asarray(dropout_lib.hashed_dropout_mask(words, (64, 128, 128), 0.1))
  assert abs(keep.mean() - 0.9) < 3e-3                 # 10 sigma at 2^20 elements
  rows = keep.reshape(64, -1).mean(1)
  assert rows.min() > 0.88 and rows.max() < 0.92       # every batch row keeps the rate
  centred = keep - keep.mean()
  for shifted in (np.roll(centred, 1, axis=-1), np.roll(centred, 1, axis=-2),
                  np.roll(centred, 1, axis=0)):
    assert abs((centred * shifted).mean() / centred.var()) < 0.01   # ~10 sigma
  other = np.asarray(dropout_lib.hashed_dropout_mask(jax.random.bits(jax.random.key(8), (2,),
                                                                jnp.uint32),
                                                (64, 128, 128), 0.1))
  assert abs(((keep - 0.9) * (other - 0.9)).mean() / centred.var()) < 0.01
  assert dropout_lib.hashed_dropout_mask(words, (4, 8), 0.0).all()


def test_hashed_dropout_backward_and_mesh():
  x = jax.random.normal(jax.random.key(1), (8, 16, 32))
  words = jax.random.bits(KEY, (2,), jnp.uint32)
  keep = dropout_lib.hashed_dropout_mask(words, x.shape, 0.25)
  y, vjp = jax.vjp(lambda x: dropout_lib.hashed_dropout(x, words, 0.25), x)
  np.testing.assert_array_equal(y, jnp.where(keep, x / 0.75, 0))
  np.testing.assert_array_equal(vjp(jnp.ones_like(x))[0], jnp.where(keep, 1 / 0.75, 0))
  mesh = sharding.make_mesh((2, 2, 1), jax.devices()[:4])
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  sharded = jax.jit(lambda x: dropout_lib.hashed_dropout(x, words, 0.25))(jax.device_put(x, spec))
  np.testing.assert_array_equal(sharded, y)           # global positions: mesh-independent


def test_gelu_erf_form_equals_erfc_form():
  x = jnp.linspace(-12.0, 12.0, 20001)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), rtol=2e-6,
                             atol=1e-6)
  xb = x.astype(jnp.bfloat16)
  assert layers.gelu(xb).dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(layers.gelu(xb), np.float32),
                             np.asarray(jax.nn.gelu(xb.astype(jnp.float32), approximate=False)),
                             rtol=8e-3, atol=1e-6)


def test_scanned_train_step_on_mesh_equals_unrolled():
  mesh = sharding.make_mesh((2, 2, 1), jax.devices()[:4])   # layer axis replicated, embed on fsdp
  overrides = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
  plain_config = tiny_config(**overrides)
  scan_config = tiny_config(**overrides, **{"model.scan_layers": True})
  setups = [step_lib.make_setup(c, mesh) for c in (plain_config, scan_config)]
  batch = loader.to_global(next(loader.make_source(plain_config, split="train")), mesh)
  state = setups[0].init(0)
  host = jax.device_get(state)                 # the step donates `state`
  params = stack_layer_params(host.params, plain_config.model.num_layers)
  scanned = state_lib.TrainState(step=host.step, params=params,
                             opt_state=setups[1].tx.init(params), rng=host.rng)
  scanned = jax.device_put(scanned, setups[1].state_shardings)
  outs = []
  with jax.set_mesh(mesh):
    for setup, s in zip(setups, (state, scanned)):
      outs.append(step_lib.make_train_step(setup)(s, batch))
  (u_state, u_metrics), (s_state, s_metrics) = outs
  np.testing.assert_allclose(float(s_metrics["loss"]), float(u_metrics["loss"]), rtol=1e-6)
  assert_trees_close(unstack_layer_params(jax.device_get(s_state.params)),
                     jax.device_get(u_state.params), rtol=1e-5, atol=1e-6)


def test_dropout_scales_kept_values_in_float32():
  x = jnp.full((4, 64), 100.0, jnp.bfloat16)
  for rng in ("hash", "threefry"):
    y = dropout_lib.dropout(x, 0.1, jax.random.key(0), rng)
    kept = np.float32(y)[np.float32(y) != 0]
    assert kept.size and np.all(kept == np.float32(jnp.bfloat16(100.0 / 0.9))), (rng, kept[:4])
