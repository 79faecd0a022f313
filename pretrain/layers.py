"""Building blocks shared by the encoder and the heads: config, parameters, Dense, LayerNorm, dropout.

Every parameter is float32 (`param_dtype`) and carries its logical axis names as the metadata `axes`,
which `pretrain.sharding` maps to mesh axes; every matmul runs in the compute `dtype`.
"""

from __future__ import annotations

import dataclasses
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
    if self.attention_impl not in ("auto", "xla", "cudnn"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r}; choose auto, xla or cudnn")

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


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  return _ACTIVATIONS[name]


def param(rngs: nnx.Rngs | None, init, shape, axes, config: BertConfig) -> nnx.Param:
  """A parameter with its logical axis names; `init` is a jax.nn.initializers function."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)), axes=tuple(axes))


def normal_init(config: BertConfig):
  return jax.nn.initializers.truncated_normal(stddev=config.initializer_range)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if key is None else list(jax.random.split(key, n))


class Dense(nnx.Module):
  """x @ kernel + bias over the last axis of x."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str],
               config: BertConfig, *, rngs: nnx.Rngs):
    self.kernel = param(rngs, normal_init(config), (in_features, out_features), axes, config)
    self.bias = param(rngs, jax.nn.initializers.zeros, (out_features,), ("norm",), config)
    self.dtype = config.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


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
