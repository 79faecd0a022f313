"""The fused attention kernel with hashed dropout (`pretrain/attention.py`), on the CPU.

- The Pallas kernel, run by Pallas' interpreter, computes its jax.numpy twin's output and
  gradients (float32: to rounding), with and without dropout, with padded keys, at block sizes
  that split the sequence into several tiles.
- Under a 4-way mesh (shard_map over batch and heads) the kernel gives what it gives unsharded:
  masks come from global batch and head indices, so they do not depend on the mesh.
- The hashed masks keep 1 - rate of the probabilities, differ across planes, keys and positions,
  and without dropout the twin is `jax.nn.dot_product_attention`.
- The model's `attention_dropout_impl="fused"` on the CPU runs the twin, deterministic in its key.
(The kernel's Triton compile and its speed are checked on a GPU: tools/bench_attention.py.)
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain import sharding
from pretrain import speed
from pretrain.model import attention_kernel as attention
from pretrain.model.attention import SelfAttention
from pretrain.model.config import BertConfig

B, S, N, D = 4, 64, 2, 16


def _inputs(seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v, g = (jax.random.normal(x, (B, S, N, D), dtype) for x in keys[:4])
  lengths = jnp.array([S, 40, 17, 1])
  return q, k, v, g, lengths, keys[4]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_kernel_equals_its_twin(rate):
  q, k, v, g, lengths, key = _inputs()
  seeds = attention.plane_seeds(key, B, N)
  twin = lambda q, k, v: attention.reference_attention(q, k, v, lengths, seeds, rate)  # noqa: E731
  kernel = lambda q, k, v: attention.fused_attention(  # noqa: E731
      q, k, v, lengths, seeds, rate, blocks=(16, 32, 16, 4, 4), interpret=True)
  out_t, vjp_t = jax.vjp(twin, q, k, v)
  out_k, vjp_k = jax.vjp(kernel, q, k, v)
  np.testing.assert_allclose(out_k, out_t, atol=2e-6, rtol=1e-5)
  for name, a, b in zip("qkv", vjp_k(g), vjp_t(g)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")
  assert float(jnp.abs(vjp_t(g)[0]).max()) > 0.1          # the gradients are not all zero


def test_kernel_under_a_mesh_equals_unsharded():
  q, k, v, _, lengths, key = _inputs(1)
  rate = 0.2
  plain = attention.dropout_attention(q, k, v, lengths, key, rate, use_kernel=True,
                                      blocks=(32, 32, 32, 4, 4), interpret=True)
  mesh = sharding.make_mesh((2, 1, 2), jax.devices()[:4])        # batch 2 ways, heads 2 ways
  act = sharding.named(mesh, ("batch", "seq", "act_heads", "act_kv"))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, lengths, key: attention.dropout_attention(
        q, k, v, lengths, key, rate, use_kernel=True, blocks=(32, 32, 32, 4, 4), interpret=True))
    sharded = fn(*(jax.device_put(x, act) for x in (q, k, v)),
                 jax.device_put(lengths, sharding.named(mesh, ("batch",))), key)
  assert sharded.sharding.spec == act.spec
  np.testing.assert_allclose(sharded, plain, atol=1e-6, rtol=1e-6)
  twin = attention.dropout_attention(q, k, v, lengths, key, rate, use_kernel=False)
  np.testing.assert_allclose(plain, twin, atol=2e-6, rtol=1e-5)


def test_packed_qkv_kernel_equals_separate_arrays():
  """The model's entry: the kernel reads q, k, v from the packed (b, s, 3, n, d) projection and
  writes one packed gradient; the same output and gradients as on three sliced arrays, with and
  without a 4-way (batch x heads) mesh."""
  q, k, v, g, lengths, key = _inputs(3)
  qkv = jnp.stack([q, k, v], axis=2)
  kw = dict(use_kernel=True, blocks=(16, 32, 16, 4, 4), interpret=True)
  separate = lambda qkv: attention.dropout_attention(  # noqa: E731
      qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, key, 0.2, **kw)
  packed = lambda qkv: attention.qkv_dropout_attention(qkv, lengths, key, 0.2, **kw)  # noqa: E731
  out_s, vjp_s = jax.vjp(separate, qkv)
  out_p, vjp_p = jax.vjp(packed, qkv)
  np.testing.assert_array_equal(out_p, out_s)
  np.testing.assert_array_equal(vjp_p(g)[0], vjp_s(g)[0])
  assert float(jnp.abs(vjp_p(g)[0][:, :, 2]).max()) > 0.1          # dV lands in its slot
  mesh = sharding.make_mesh((2, 1, 2), jax.devices()[:4])
  with jax.set_mesh(mesh):
    spec = sharding.named(mesh, ("batch", "seq", None, "act_heads", "act_kv"))

    def run(qkv, g):
      out, vjp = jax.vjp(packed, qkv)
      return out, vjp(g)[0]

    out_m, grad_m = jax.jit(run)(jax.device_put(qkv, spec), g)
  np.testing.assert_allclose(out_m, out_s, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(grad_m, vjp_s(g)[0], atol=1e-5, rtol=1e-5)


def test_hashed_masks_keep_the_rate_and_vary():
  key = jax.random.key(3)
  seeds = attention.plane_seeds(key, 4, 4)
  keep = np.asarray(attention.hashed_keep_mask(seeds, 128, 128, 0.1))   # (4, 4, 128, 128)
  assert abs(keep.mean() - 0.9) < 0.004, keep.mean()                 # 262,144 draws: sd 0.0006
  for plane in keep.reshape(16, 128, 128):
    assert abs(plane.mean() - 0.9) < 0.02
  # two planes, two keys: agreement as for independent masks (0.9^2 + 0.1^2 = 0.82), not 1
  assert abs((keep[0, 0] == keep[0, 1]).mean() - 0.82) < 0.01
  assert abs((keep[0, 0] == keep[1, 0]).mean() - 0.82) < 0.01
  other_seeds = attention.plane_seeds(jax.random.key(4), 4, 4)
  other = np.asarray(attention.hashed_keep_mask(other_seeds, 128, 128, 0.1))
  assert abs((keep == other).mean() - 0.82) < 0.005
  # neighbours along a row and a column are not correlated either
  assert abs((keep[..., 1:] == keep[..., :-1]).mean() - 0.82) < 0.005
  assert abs((keep[..., 1:, :] == keep[..., :-1, :]).mean() - 0.82) < 0.005
  assert attention.hashed_keep_mask(seeds, 8, 8, 0.0).all()
  # the same key gives the same seeds: a batch's masks are reproducible
  np.testing.assert_array_equal(seeds, attention.plane_seeds(key, 4, 4))


def test_twin_without_dropout_is_dot_product_attention():
  q, k, v, _, lengths, key = _inputs(2)
  ours = attention.dropout_attention(q, k, v, lengths, key, 0.0)
  theirs = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(ours, theirs, atol=2e-6, rtol=1e-5)


def test_model_fused_path_on_cpu(monkeypatch):
  config = BertConfig(hidden_size=32, num_heads=2, attention_dropout=0.1, dtype="float32",
                      attention_dropout_impl="fused")
  layer = SelfAttention(config, speed.resolve(config), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  lengths = jnp.array([16, 9])
  a = layer(x, lengths, jax.random.key(5))
  np.testing.assert_array_equal(a, layer(x, lengths, jax.random.key(5)))
  assert not np.allclose(a, layer(x, lengths, jax.random.key(6)))
  off = dataclasses.replace(config, attention_dropout=0.0)
  layer_off = SelfAttention(off, speed.resolve(off), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer_off(x, lengths, jax.random.key(5)), layer(x, lengths, None),
                             atol=1e-6)
  # attention_impl="fused": without dropout, the kernel at rate 0 (its twin on the CPU)
  rates = []
  packed_entry = attention.qkv_dropout_attention
  monkeypatch.setattr(attention, "qkv_dropout_attention",
                      lambda *args, **kw: rates.append(args[3]) or packed_entry(*args, **kw))
  fused_off = dataclasses.replace(off, attention_impl="fused")
  assert speed.resolve(fused_off).attention == "twin"          # no GPU here
  kernel_off = SelfAttention(fused_off, speed.resolve(fused_off), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(kernel_off(x, lengths, None), layer(x, lengths, None), atol=1e-6)
  assert rates == [0.0]                        # it went through the kernel's entry, at rate 0
  with pytest.raises(ValueError, match="attention_dropout_impl"):
    dataclasses.replace(config, attention_dropout_impl="flash").validate()


def test_kernel_shape_limits():
  assert attention.kernel_supports(128, 64) and attention.kernel_supports(384, 64)
  assert not attention.kernel_supports(100, 64)          # the twin runs instead
  assert not attention.kernel_supports(128, 48)
  fit = attention._fit_blocks  # pylint: disable=protected-access
  assert fit(384, (64, 64, 64, 4, 4)) == (64, 64, 64, 4, 4)
  assert fit(48, (64, 64, 64, 4, 4)) == (16, 16, 16, 4, 4)
