"""The model's configuration: architecture, precision and speed switches, one frozen dataclass.

`BertConfig.from_config(config.model)` builds it from the `model` group of a config and checks every
value; which implementation each speed switch actually runs is decided in `pretrain.speed`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# The allowed values of the choice fields (the layers map the names to functions).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
REMAT_POLICY_NAMES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg", "hash")
CHOICES = dict(
    hidden_act=ACTIVATIONS,
    attention_impl=("auto", "xla", "cudnn", "fused"),
    remat_policy=REMAT_POLICY_NAMES,
    dropout_rng=DROPOUT_RNGS,
    attention_dropout_impl=("reference", "lean", "fused"),
    logits_grad_dtype=("float32", "bfloat16"),
    mlm_gather=("take", "one_hot"),
    residual_norm_impl=("fused", "xla"),
)
# The fields that define the architecture (and so a checkpoint's shapes); the rest may change
# between pretraining, fine-tuning and export.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps",
                     "vocab_pad_multiple")


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
  scan_layers: bool = False             # one jax.lax.scan over stacked layers (see bert.py)
  remat_policy: str = "none"            # none | full | dots_saveable |
                                        # dots_with_no_batch_dims_saveable
  dropout_rng: str = "hash"             # hash (positions hashed) | threefry | rbg | unsafe_rbg
  attention_dropout_impl: str = "fused"       # fused | reference | lean (see SelfAttention)
  logits_grad_dtype: str = "float32"    # float32 | bfloat16: dtype of the float32 logits' gradient
                                        # fed to the backward matmuls (MLM decoder,
                                        # attention scores)
  mlm_gather: str = "one_hot"           # one_hot | take: how the MLM head picks masked positions
  residual_norm_impl: str = "fused"     # fused | xla: LayerNorm(residual + dropout(branch + bias))
                                        # as one Pallas kernel pair on GPUs (model/residual_norm.py)

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
    for name, allowed in CHOICES.items():
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

