"""Task models on the pretrained encoder: classification, regression and span (SQuAD) heads.

Full fine-tuning reads, for classification/regression, BERT's pooled [CLS] output (`pooler`, as BERT
does), the raw final [CLS] state (`cls`) or the mean of the final token states over the input mask
(`mean`: sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with it, their pooler
never was); span heads read every token. Where the pooler is not read its weights are neither
restored nor trained (`uses_pooler`). Feature-extraction mode freezes the encoder (`stop_gradient`,
and the optimizer leaves it alone) and feeds the head a learned softmax-weighted mix of all hidden
states, ELMo's scalar mix (Peters et al., 2018): gamma * sum_j softmax(w)_j h_j over the embeddings
output and every layer.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from pretrain import speed
from pretrain.model.bert import BertModel
from pretrain.model.config import BertConfig
from pretrain.model.dropout import dropout, split_key
from pretrain.model.layers import Dense, param
from pretrain.speed import SpeedPath

KINDS = ("classification", "regression", "span")
POOLINGS = ("pooler", "cls", "mean")        # full fine-tuning; the first is the default
FEATURE_POOLINGS = ("mean", "cls")          # features mode (per layer); the first is the default


def uses_pooler(kind: str, features: bool, pooling: str) -> bool:
  """Whether the head reads BERT's pooler: full fine-tuning of a sentence task with "pooler"."""
  return kind != "span" and not features and pooling == "pooler"


class ScalarMix(nnx.Module):

  def __init__(self, num_inputs: int, config: BertConfig, *, rngs: nnx.Rngs):
    zeros, ones = jax.nn.initializers.zeros, jax.nn.initializers.ones
    self.weights = param(rngs, zeros, (num_inputs,), ("norm",), config)   # softmax -> uniform
    self.gamma = param(rngs, ones, (), (), config)

  def __call__(self, hidden_states):
    """Mixes a sequence of equally shaped arrays (or one array stacked on axis 0), in float32."""
    stacked = jnp.stack([h.astype(jnp.float32) for h in hidden_states]) \
        if isinstance(hidden_states, (tuple, list)) else hidden_states.astype(jnp.float32)
    w = jax.nn.softmax(self.weights[...])
    return self.gamma[...] * jnp.tensordot(w, stacked, axes=1)


class TaskModel(nnx.Module):
  """BertModel + a task head; `__call__(batch, key)` returns float32 logits.

  classification: (batch, num_labels); regression: (batch,); span: (batch, seq, 2) start/end logits.
  """

  def __init__(self, config: BertConfig, *, kind: str, num_labels: int = 2, head_dropout: float = 0.1,
               features: bool = False, pooling: str | None = None, rngs: nnx.Rngs,
               path: SpeedPath | None = None):
    """`pooling`: "pooler", "cls" or "mean" in full fine-tuning (default "pooler"); "cls" or "mean"
    in features mode (default "mean"), where it pools every layer before the scalar mix."""
    if kind not in KINDS:
      raise ValueError(f"task kind {kind!r}; choose one of {KINDS}")
    key, choices = (("head.feature_pooling", FEATURE_POOLINGS) if features
                    else ("head.pooling", POOLINGS))
    pooling = pooling or choices[0]
    if pooling not in choices:
      raise ValueError(f"{key}={pooling!r}; choose one of {', '.join(map(repr, choices))}")
    self.kind, self.features, self.pooling = kind, features, pooling
    self.head_dropout = head_dropout
    path = path or speed.resolve(config)
    self.dropout_rng = path.dropout_rng
    self.bert = BertModel(config, rngs=rngs, path=path)
    if features:
      self.scalar_mix = ScalarMix(config.num_layers + 1, config, rngs=rngs)
    outputs = {"classification": num_labels, "regression": 1, "span": 2}[kind]
    self.head = Dense(config.hidden_size, outputs, ("embed", None), config, rngs=rngs)

  def encode(self, batch, key=None):
    """The head's input: pooled (batch, hidden) or per-token (batch, seq, hidden) features."""
    if not self.features:
      seq, pooled = self.bert(batch["input_ids"], batch["input_mask"], batch["segment_ids"], key)
      if self.kind == "span":
        return seq
      if self.pooling == "pooler":
        return pooled
      return pool_layers([seq], batch["input_mask"], self.pooling)[0]
    _, _, hidden = self.bert(batch["input_ids"], batch["input_mask"], batch["segment_ids"],
                             all_layers=True)       # frozen: no dropout in the encoder
    hidden = [jax.lax.stop_gradient(h) for h in hidden]
    if self.kind == "span":
      return self.scalar_mix(hidden)
    return self.scalar_mix(pool_layers(hidden, batch["input_mask"], self.pooling))

  def predict(self, features, key=None):
    """The head alone, on `encode`'s output (feature-extraction training reuses it)."""
    features = dropout(features, self.head_dropout, key, self.dropout_rng)
    out = self.head(features).astype(jnp.float32)
    return out[..., 0] if self.kind == "regression" else out

  def __call__(self, batch, key=None):
    encoder_key, head_key = split_key(key, 2)
    return self.predict(self.encode(batch, encoder_key), head_key)


def pool_layers(hidden, input_mask, pooling: str) -> jax.Array:
  """Per-layer sentence features (layers, batch, hidden): the [CLS] vector or the masked mean."""
  stacked = jnp.stack([h.astype(jnp.float32) for h in hidden])
  if pooling == "cls":
    return stacked[:, :, 0]
  mask = input_mask.astype(jnp.float32)[None, :, :, None]
  return (stacked * mask).sum(2) / jnp.maximum(mask.sum(2), 1.0)


def loss_sums(kind: str, logits, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of per-example losses, number of examples) over the rows with `weight` 1 (padding rows 0).

  classification: cross-entropy; regression: squared error; span: mean of start and end
  cross-entropies (google-research/bert's SQuAD loss).
  """
  weight = batch["weight"].astype(jnp.float32)
  if kind == "classification":
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  elif kind == "regression":
    per_example = jnp.square(logits - batch["label"].astype(jnp.float32))
  else:
    # Padding tokens cannot be an answer: their logits are masked before the softmax.
    masked = jnp.where(batch["input_mask"][..., None] > 0, logits, -1e9)
    start = optax.softmax_cross_entropy_with_integer_labels(masked[..., 0], batch["start_positions"])
    end = optax.softmax_cross_entropy_with_integer_labels(masked[..., 1], batch["end_positions"])
    per_example = 0.5 * (start + end)
  return (per_example * weight).sum(), weight.sum()
