"""Building blocks shared by the encoder and the heads: config, parameters, Dense, LayerNorm, dropout.

Every parameter is float32 (`param_dtype`) and carries its logical axis names as the metadata `axes`,
which `pretrain.sharding` maps to mesh axes; every matmul runs in the compute `dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  vocab_pad_multiple: int = 128
  # Speed switches (docs/benchmarks.md measures them). Defaults = the fastest measured on GPU;
  # each alternative computes the same function (or, for dropout masks, the same distribution).
  scan_layers: bool = False             # one jax.lax.scan over stacked layers (see model.py)
  remat_policy: str = "none"            # none | full | dots_saveable | dots_with_no_batch_dims_saveable
  dropout_rng: str = "hash"             # hash (positions hashed) | threefry | rbg | unsafe_rbg
  attention_dropout_impl: str = "fused"       # fused | reference | lean (see SelfAttention)
  logits_grad_dtype: str = "float32"    # float32 | bfloat16: dtype of the float32 logits' gradient
                                        # fed to the backward matmuls (MLM decoder, attention scores)
  mlm_gather: str = "one_hot"           # one_hot | take: how the MLM head picks masked positions
  residual_norm_impl: str = "fused"     # fused | xla: LayerNorm(residual + dropout(branch + bias))
                                        # as one Pallas kernel pair on GPUs (pretrain/residual_norm.py)

  @classmethod
  def from_config(cls, model_config: Any) -> BertConfig:
    """From the `model` group of a config (ConfigDict or mapping); unknown keys are an error."""
    values = dict(model_config)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(fields)}")
    config = cls(**values)
    config.validate()
    return config

  def validate(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"model.hidden_act={self.hidden_act!r}; choose one of {sorted(_ACTIVATIONS)}")
    if self.attention_impl not in ("auto", "xla", "cudnn", "fused"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; choose auto, xla, cudnn "
                       "or fused")
    choices = dict(remat_policy=tuple(REMAT_POLICIES), dropout_rng=DROPOUT_RNGS,
                   attention_dropout_impl=("reference", "lean", "fused"),
                   logits_grad_dtype=("float32", "bfloat16"), mlm_gather=("take", "one_hot"),
                   residual_norm_impl=("fused", "xla"))
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {list(allowed)}")

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt(2))), computed in float32.

  `jax.nn.gelu(approximate=False)` writes it with erfc, whose XLA expansion evaluates two
  polynomial branches and an exp for every element; XLA then stored its derivative terms from the
  forward pass (three tensors of the FFN's width). With erf, one rational polynomial, the forward
  writes one: 3.9 -> 2.0 ms forward and 4.0 -> 2.9 ms backward per base-128 step on an H100. The
  values agree to float32 rounding except far in the negative tail, where both are ~0. This is
  also the form PyTorch's (and transformers') exact GELU uses.
  """
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * (2.0 ** -0.5)))).astype(x.dtype)


_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  return _ACTIVATIONS[name]


# model.remat_policy -> what the backward pass may keep from the forward pass of a layer.
REMAT_POLICIES = {
    "none": None,                                   # no rematerialisation: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,   # recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg", "hash")


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_out_bf16_grad(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, a, b)` with a float32 result, whose backward matmuls run in a's dtype.

  Plain autodiff of an einsum with `preferred_element_type=float32` feeds the float32 cotangent
  to the backward matmuls, which then run as float32 GEMMs on upcast operands. Here the cotangent
  is rounded to the operands' dtype (bfloat16) first, as mixed-precision training does elsewhere;
  the forward value is exactly the plain one.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_fwd(spec, a, b):
  return einsum_f32_out_bf16_grad(spec, a, b), (a, b)


def _einsum_bwd(spec, residuals, g):
  a, b = residuals
  _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)
  return vjp(g.astype(a.dtype))


einsum_f32_out_bf16_grad.defvjp(_einsum_fwd, _einsum_bwd)


def einsum_f32_out(spec: str, a: jax.Array, b: jax.Array, grad_dtype: str) -> jax.Array:
  """A float32-result einsum of low-precision operands; `grad_dtype` as model.logits_grad_dtype."""
  if grad_dtype == "bfloat16" and a.dtype != jnp.float32:
    return einsum_f32_out_bf16_grad(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def param(rngs: nnx.Rngs | None, init, shape, axes, config: BertConfig) -> nnx.Param:
  """A parameter with its logical axis names; `init` is a jax.nn.initializers function."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)), axes=tuple(axes))


def normal_init(config: BertConfig):
  return jax.nn.initializers.truncated_normal(stddev=config.initializer_range)


def keep_mask(key: jax.Array, rate: float, shape) -> jax.Array:
  """Where inverted dropout keeps its input: True with probability 1 - rate."""
  return jax.random.bernoulli(key, 1.0 - rate, shape)


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
# Hashed dropout masks: the same construction as the attention kernel's (pretrain/attention.py).

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


class Dense(nnx.Module):
  """x @ kernel + bias over the last axis of x."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str],
               config: BertConfig, *, rngs: nnx.Rngs):
    self.kernel = param(rngs, normal_init(config), (in_features, out_features), axes, config)
    self.bias = param(rngs, jax.nn.initializers.zeros, (out_features,), ("norm",), config)
    self.dtype = config.compute_dtype

  def __call__(self, x: jax.Array, *, add_bias: bool = True) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype) if add_bias else y


class LayerNorm(nnx.Module):
  """LayerNorm with float32 statistics, output in the compute dtype."""

  def __init__(self, features: int, config: BertConfig, *, rngs: nnx.Rngs):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), ("norm",), config)
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), ("norm",), config)
    self.eps = config.layer_norm_eps
    self.dtype = config.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)
