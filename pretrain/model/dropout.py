"""Dropout and its random masks: drawn with jax.random, or hashed from positions.

`model.dropout_rng` picks the masks of every dropout in the model (`pretrain.speed` checks that the
kernels it selects can honour it). The hashed masks are the attention kernel's construction
(`pretrain.model.attention_kernel`), computed from iotas, so they fuse into their consumer, do not
depend on the mesh, and are recomputed in the backward pass instead of stored.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

def dropout_key(key: jax.Array | None, impl: str) -> jax.Array | None:
  """The key dropout draws its masks from, given the step's key (`train.py` makes a threefry key).

  "threefry" uses `key` as it is (masks independent of the mesh). "rbg"/"unsafe_rbg" seed a key of
  that implementation from 128 bits of `key`, so dropout masks come from XLA's RngBitGenerator
  (Philox on GPU), which is cheaper than threefry; the masks then depend on how the arrays are
  sharded, so runs on different meshes no longer match bit for bit. "hash" also uses `key` as it
  is: `dropout` then hashes each element's position with two words drawn from it
  (`hashed_dropout`), independent of the mesh and the cheapest of the four.
  """
  if key is None or impl in ("threefry", "hash"):
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def keep_mask(key: jax.Array, rate: float, shape) -> jax.Array:
  """Where inverted dropout keeps its input: True with probability 1 - rate."""
  return jax.random.bernoulli(key, 1.0 - rate, shape)


def dropout_mask(key: jax.Array, rate: float, shape, rng: str) -> jax.Array:
  """The keep mask `dropout(x, rate, key, rng)` applies to an x of `shape`."""
  if rng == "hash":
    return hashed_dropout_mask(jax.random.bits(key, (2,), jnp.uint32), shape, rate)
  return keep_mask(key, rate, shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None, rng: str) -> jax.Array:
  """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0.

  `rng` is model.dropout_rng: "hash" hashes positions (`hashed_dropout`), the others draw the
  mask from `key` with jax.random.
  """
  if key is None or rate == 0.0:
    return x
  if rng == "hash":
    return hashed_dropout(x, jax.random.bits(key, (2,), jnp.uint32), rate)
  return apply_keep(x, keep_mask(key, rate, x.shape), rate)


def apply_keep(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
  """Where `keep`, x / (1 - rate), else 0; the division in float32.

  Written `x / (1.0 - rate)` on a bfloat16 x, jax would round the constant to bfloat16 first:
  0.9 becomes 0.8984375, and every kept activation would be scaled 0.17% too much.
  """
  return jnp.where(keep, x.astype(jnp.float32) / (1.0 - rate), 0).astype(x.dtype)



# ------------------------------------------------------------------------------------------------
# Hashed masks: the same construction as the attention kernel's.

GOLDEN = 0x9E3779B9     # 2^32 / golden ratio: the Weyl step of SplitMix-style generators


def fmix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def index_seeds(words: jax.Array, index: jax.Array) -> jax.Array:
  """uint32 seeds, one per entry of the uint32 `index`, from two uint32 `words` of a key."""
  return fmix32(fmix32(index ^ words[0]) + words[1])


def dropout_threshold(rate: float) -> int:
  """A uint32 hash at least this is kept: probability 1 - rate."""
  return min(int(round(rate * 2.0**32)), 2**32 - 1)


def hashed_keep(offset: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
  """Where hashed dropout keeps the element at uint32 `offset` of a batch row with `seed`:
  fmix32(offset * GOLDEN + seed) >= rate * 2^32 (SplitMix-style), True w.p. 1 - rate."""
  return fmix32(offset * jnp.uint32(GOLDEN) + seed) >= jnp.uint32(dropout_threshold(rate))


def hashed_dropout_mask(words: jax.Array, shape, rate: float) -> jax.Array:
  """bool `shape` = (batch, ...): where hashed dropout keeps an element, True w.p. 1 - rate.

  Each batch row gets a seed from its global index and the two uint32 `words`; the element at
  offset o within its row is kept when fmix32(o * GOLDEN + seed) >= rate * 2^32 (SplitMix-style).
  Everything is computed from iotas of the global shape, so under jit the mask is the same on
  every mesh, and it fuses into its consumer: no random bits are written to memory.
  """
  if math.prod(shape[1:]) >= 2**32:
    raise ValueError(f"hashed dropout needs fewer than 2^32 elements per batch row; got {shape}")
  seed = index_seeds(words, jnp.arange(shape[0], dtype=jnp.uint32))
  seed = seed.reshape((shape[0],) + (1,) * (len(shape) - 1))
  offset = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in range(len(shape) - 1, 0, -1):
    offset = offset + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
    stride *= shape[dim]
  return hashed_keep(offset, seed, rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hashed_dropout(x: jax.Array, words: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout with `hashed_dropout_mask(words, x.shape, rate)`.

  The backward pass recomputes the mask from `words` instead of keeping a boolean tensor.
  """
  return apply_keep(x, hashed_dropout_mask(words, x.shape, rate), rate)


def _hashed_dropout_fwd(x, words, rate):
  return hashed_dropout(x, words, rate), words


def _hashed_dropout_bwd(rate, words, g):
  # The barrier keeps XLA from merging this mask with the forward pass's identical one (CSE),
  # which would store the forward mask as a boolean tensor after all.
  keep = hashed_dropout_mask(jax.lax.optimization_barrier(words), g.shape, rate)
  return apply_keep(g, keep, rate), None


hashed_dropout.defvjp(_hashed_dropout_fwd, _hashed_dropout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def softmax_dropout(logits: jax.Array, keep: jax.Array, rate: float, dtype) -> jax.Array:
  """dropout(softmax(logits)) in float32, cast to `dtype`: the same values as the plain chain.

  The difference is the backward pass: plain autodiff keeps the float32 softmax output (4 bytes
  per attention score) and differentiates softmax and dropout in separate float32 passes; this
  keeps the probabilities in `dtype` (2 bytes) with the keep mask, and returns the logits'
  gradient from one fused expression, dlogits = t - p * sum(t) with t = p * keep * g / (1-rate).
  """
  return _softmax_dropout_fwd(logits, keep, rate, dtype)[0]


def _softmax_dropout_fwd(logits, keep, rate, dtype):
  p = jax.nn.softmax(logits, axis=-1)
  z = jnp.where(keep, p / (1.0 - rate), 0).astype(dtype)
  return z, (p.astype(dtype), keep)


def _softmax_dropout_bwd(rate, dtype, residuals, g):
  del dtype
  p_low, keep = residuals
  p = p_low.astype(jnp.float32)
  t = p * jnp.where(keep, g.astype(jnp.float32) / (1.0 - rate), 0)
  return t - p * t.sum(-1, keepdims=True), None


softmax_dropout.defvjp(_softmax_dropout_fwd, _softmax_dropout_bwd)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


