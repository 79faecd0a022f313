"""LayerNorm(residual + dropout(branch + bias)) as one kernel pair (`pretrain/residual_norm.py`).

- The Pallas kernels, run by Pallas' interpreter on the CPU, give the plain chain's output and the
  residual's and branch's gradients bit for bit (bfloat16 activations, the plain chain's roundings
  and hashed masks), and its parameter gradients to float32 rounding (the bias gradient to the
  plain chain's bfloat16 sum).
- `fork=True` (the output twice, for two consumers): the kernel adds the two gradients.
- Under a 4-way batch mesh (shard_map; partial sums added across devices) the same results.
- In the model, `residual_norm_impl="fused"` (kernel forced on, interpreted) and "xla" give the
  same loss and gradients.
(The Triton compile and speed are checked on a GPU: tools/bench_residual_norm.py.)
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain import sharding
from pretrain import speed
from pretrain.model import residual_norm
from pretrain.model.bert import BertForPreTraining
from pretrain.model.config import BertConfig

B, S = 4, 16


def _inputs(hidden, seed=0):
  k = jax.random.split(jax.random.key(seed), 7)
  r, a, dy = (jax.random.normal(x, (B, S, hidden)).astype(jnp.bfloat16) for x in k[:3])
  bias = 0.1 * jax.random.normal(k[3], (hidden,))
  scale = 1.0 + 0.1 * jax.random.normal(k[4], (hidden,))
  offset = 0.1 * jax.random.normal(k[5], (hidden,))
  return (r, a, bias, scale, offset), dy, jax.random.bits(k[6], (2,), jnp.uint32)


def _value_and_grads(fn, args, dy, words, rate):
  def loss(*args):
    y = fn(*args, words, rate, 1e-12)
    return (y.astype(jnp.float32) * dy.astype(jnp.float32)).sum(), y
  (_, y), grads = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)(*args)
  return y, grads


def _check_equal(got, want):
  (y_k, g_k), (y_r, g_r) = got, want
  np.testing.assert_array_equal(np.float32(y_k), np.float32(y_r))
  for name, a, b in zip(("residual", "branch"), g_k[:2], g_r[:2]):
    np.testing.assert_array_equal(np.float32(a), np.float32(b), err_msg=f"d{name}")
  # the plain chain sums the bias gradient in bfloat16, the kernel in float32
  np.testing.assert_allclose(g_k[2], g_r[2], rtol=2e-2, atol=2e-2 * float(jnp.abs(g_r[2]).max()))
  for name, a, b in zip(("scale", "offset"), g_k[3:], g_r[3:]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=f"d{name}")
  assert float(jnp.abs(g_r[1]).max()) > 0.1                  # not all zero


@pytest.mark.parametrize("hidden,rate", [(48, 0.0), (48, 0.1), (64, 0.5)])
def test_kernel_equals_plain_chain(hidden, rate):
  args, dy, words = _inputs(hidden)
  want = _value_and_grads(residual_norm.reference, args, dy, words, rate)
  kernel = functools.partial(residual_norm.fused, blocks=(4, 4, 4), interpret=True)
  _check_equal(_value_and_grads(kernel, args, dy, words, rate), want)
  if rate:      # the masks matter: other words, other results
    other = _value_and_grads(kernel, args, dy, words + 1, rate)
    assert not np.array_equal(np.float32(other[0]), np.float32(want[0]))


def test_forked_output_adds_both_gradients():
  """fork=True: the output twice; the backward kernel adds the two gradients (in float32, where
  autodiff of the plain chain adds them in bfloat16: equal to that rounding)."""
  args, dy, words = _inputs(48, seed=2)
  dy2 = jax.random.normal(jax.random.key(5), dy.shape).astype(jnp.bfloat16)

  def forked(*args):
    y1, y2 = residual_norm.fused(*args, words, 0.1, 1e-12, fork=True, blocks=(4, 4, 4),
                                 interpret=True)
    return (y1.astype(jnp.float32) * dy.astype(jnp.float32)).sum() + (
        y2.astype(jnp.float32) * dy2.astype(jnp.float32)).sum()

  def plain(*args):
    y = residual_norm.reference(*args, words, 0.1, 1e-12)
    return (y.astype(jnp.float32) * dy.astype(jnp.float32)).sum() + (
        y.astype(jnp.float32) * dy2.astype(jnp.float32)).sum()

  got = jax.grad(forked, argnums=tuple(range(5)))(*args)
  want = jax.grad(plain, argnums=tuple(range(5)))(*args)
  for name, a, b in zip(("residual", "branch", "bias", "scale", "offset"), got, want):
    a, b = np.float32(a), np.float32(b)
    np.testing.assert_allclose(a, b, atol=2e-2 * np.abs(b).max(), err_msg=name)
  # the sum, not one of its parts: dropping dy2 moves the residual gradient by far more
  one = jax.grad(lambda *a: residual_norm.reference(*a, words, 0.1, 1e-12).astype(
      jnp.float32).__mul__(dy.astype(jnp.float32)).sum())(*args)
  assert np.abs(np.float32(got[0]) - np.float32(one)).max() > 0.5


def test_kernel_under_a_mesh_equals_unsharded():
  args, dy, words = _inputs(32, seed=1)
  kernel = functools.partial(residual_norm.fused, blocks=(8, 4, 4), interpret=True)
  want = _value_and_grads(kernel, args, dy, words, 0.3)
  mesh = sharding.make_mesh((2, 2, 1), jax.devices()[:4])        # batch over data x fsdp
  act = sharding.named(mesh, ("batch", "seq", "act_embed"))
  with jax.set_mesh(mesh):
    r, a = (jax.device_put(x, act) for x in args[:2])
    got = jax.jit(lambda *xs: _value_and_grads(kernel, xs[:5], xs[5], words, 0.3))(
        r, a, *args[2:], jax.device_put(dy, act))
  y, grads = got
  np.testing.assert_array_equal(np.float32(y), np.float32(want[0]))
  for a, b in zip(grads, want[1]):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-5, atol=1e-4)


TINY = BertConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  max_position_embeddings=16, vocab_pad_multiple=32, hidden_dropout=0.2,
                  attention_dropout=0.1)


def _model_loss_and_grads(config, batch, key, path=None):
  model = BertForPreTraining(config, rngs=nnx.Rngs(0), path=path)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    out = nnx.merge(graphdef, params)(batch, key)
    return jnp.mean(out.mlm_logits.astype(jnp.float32) ** 2) + jnp.mean(out.nsp_logits ** 2)

  return jax.value_and_grad(loss)(params)


def test_model_fused_path_equals_xla_path(monkeypatch):
  ids = jax.random.randint(jax.random.key(1), (2, S), 0, 96)
  batch = dict(input_ids=ids, input_mask=jnp.ones((2, S), jnp.int32),
               segment_ids=jnp.zeros((2, S), jnp.int32),
               masked_lm_positions=jnp.array([[1, 3, 5, 0], [2, 4, 6, 8]]))
  key = jax.random.key(2)
  loss_x, grads_x = _model_loss_and_grads(
      dataclasses.replace(TINY, residual_norm_impl="xla"), batch, key)
  calls = []

  def kernel(*args, **kwargs):
    calls.append(1)
    return residual_norm_fused(*args, **kwargs, blocks=(4, 4, 4), interpret=True)

  residual_norm_fused = residual_norm.fused
  monkeypatch.setattr(residual_norm, "fused", kernel)
  assert speed.resolve(TINY).residual_norm == "xla"         # no GPU here: XLA's chain ...
  path = dataclasses.replace(speed.resolve(TINY), residual_norm="kernel")  # ... unless told
  loss_f, grads_f = _model_loss_and_grads(TINY, batch, key, path)
  assert len(calls) == 2 * TINY.num_layers
  np.testing.assert_allclose(loss_f, loss_x, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_f), jax.tree.leaves(grads_x)):
    scale = float(jnp.abs(b).max()) + 1e-6
    np.testing.assert_allclose(a, b, atol=2e-2 * scale, err_msg=jax.tree_util.keystr(path))
  # the kernel draws hashed masks only: another dropout_rng is refused, naming both keys
  with pytest.raises(speed.SpeedPathError, match="residual_norm_impl.*dropout_rng"):
    speed.resolve(dataclasses.replace(TINY, dropout_rng="threefry",
                                      attention_dropout_impl="reference"))
