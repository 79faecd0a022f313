"""Pretraining heads and objective: masked-LM (tied decoder, masked positions only) and NSP.

The MLM head gathers the `max_predictions_per_seq` masked positions before its transform and vocabulary
projection, as google-research/bert does, so it never computes logits for every token. The decoder
reuses the word-embedding table (padded to a multiple of 128) with its own bias; logits of the padded
vocabulary entries are pushed to the float32 minimum, so they never win an argmax or take probability.
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from pretrain import sharding
from pretrain.model.config import BertConfig
from pretrain.model.layers import Dense, LayerNorm, activation, einsum_f32_out, param
from pretrain.speed import SpeedPath


class MLMHead(nnx.Module):

  def __init__(self, config: BertConfig, path: SpeedPath, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.transform = Dense(h, h, ("embed", "mlp"), config, rngs=rngs)
    self.layer_norm = LayerNorm(h, config, rngs=rngs)
    self.bias = param(rngs, jax.nn.initializers.zeros, (config.padded_vocab_size,), ("vocab",),
                      config)
    self.activation = activation(config.hidden_act)
    self.vocab_size = config.vocab_size
    self.dtype = config.compute_dtype
    self.grad_dtype = path.logits_grad_dtype
    self.gather = path.mlm_gather

  def __call__(self, sequence_output, positions, word_embeddings):
    """(batch, seq, hidden), (batch, predictions), (vocab, hidden) -> float32 logits."""
    positions = positions.astype(jnp.int32)
    if self.gather == "one_hot":
      # The same rows as a batched one-hot matmul (exact: one nonzero term per output). Its
      # backward is a matmul too. take_along_axis's gather (and scatter-add backward) made XLA on
      # GPU lay the activations of every layer out batch-minor, with transposes around every
      # matmul: 6.8 ms of a 54 ms base-128 step on an H100 (docs/benchmarks.md).
      select = jax.nn.one_hot(positions, sequence_output.shape[1], dtype=sequence_output.dtype)
      x = jnp.einsum("bps,bsh->bph", select, sequence_output)
    else:
      x = jnp.take_along_axis(sequence_output, positions[..., None], axis=1)
    x = self.layer_norm(self.activation(self.transform(x)))
    # float32 logits; with model.logits_grad_dtype="bfloat16" their gradient enters the two
    # backward matmuls (30k-wide) in bfloat16 instead of as float32 GEMMs.
    logits = einsum_f32_out("bph,vh->bpv", x, word_embeddings.astype(self.dtype), self.grad_dtype)
    logits = logits + self.bias[...]
    # Keep the vocabulary dimension of the logits whole. Splitting it over `tensor` (which the
    # partitioner also picks by itself, from the table's sharding) lets XLA (jax 0.10.2 and 0.11.2)
    # miscompile the gradient on meshes with data, fsdp and tensor all > 1 for some shapes:
    # tests/test_equivalence.py::test_xla_sharded_gradient_canary reproduces it in plain JAX.
    logits = sharding.constrain(logits, ("batch", None, None))
    # Padded entries pushed to the float32 minimum by adding a constant row: the same values as a
    # select, but a backward pass that is the identity instead of another pass over the logits.
    real = jnp.arange(logits.shape[-1]) < self.vocab_size
    return logits + jnp.where(real, 0.0, jnp.finfo(jnp.float32).min)


class NSPHead(nnx.Module):
  """Is-next / not-next from the pooled [CLS] output (label 0 = B follows A, as in BERT)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(config.hidden_size, 2, ("embed", None), config, rngs=rngs)

  def __call__(self, pooled):
    return self.dense(pooled).astype(jnp.float32)


class LossSums(NamedTuple):
  """Per-batch sums, so micro-batches and hosts add up exactly before normalising."""
  mlm_nll: jax.Array        # sum over masked positions of -log p(original token) x weight
  mlm_correct: jax.Array    # weighted count of masked positions predicted right
  mlm_weight: jax.Array     # number of (real) masked positions
  nsp_nll: jax.Array
  nsp_correct: jax.Array
  num_sequences: jax.Array


def loss_sums(mlm_logits, nsp_logits, batch) -> LossSums:
  weights = batch["masked_lm_weights"].astype(jnp.float32)
  mlm_logp = jax.nn.log_softmax(mlm_logits, axis=-1)
  mlm_target = batch["masked_lm_ids"].astype(jnp.int32)
  # The target's log-probability picked by a comparison with an iota, not take_along_axis: exact
  # (one nonzero term), and its backward is elementwise instead of a scatter into zeros.
  is_target = jnp.arange(mlm_logp.shape[-1]) == mlm_target[..., None]
  mlm_nll = -jnp.where(is_target, mlm_logp, 0.0).sum(-1)
  mlm_hit = (jnp.argmax(mlm_logits, -1) == mlm_target).astype(jnp.float32)
  nsp_logp = jax.nn.log_softmax(nsp_logits, axis=-1)
  nsp_target = batch["next_sentence_labels"].astype(jnp.int32).reshape(-1)
  nsp_nll = -jnp.take_along_axis(nsp_logp, nsp_target[:, None], axis=-1)[:, 0]
  nsp_hit = (jnp.argmax(nsp_logits, -1) == nsp_target).astype(jnp.float32)
  return LossSums(
      mlm_nll=(mlm_nll * weights).sum(), mlm_correct=(mlm_hit * weights).sum(),
      mlm_weight=weights.sum(), nsp_nll=nsp_nll.sum(), nsp_correct=nsp_hit.sum(),
      num_sequences=jnp.asarray(nsp_target.shape[0], jnp.float32))


def total_loss(sums: LossSums, mlm_weight_total, num_sequences_total) -> jax.Array:
  """BERT's objective: mean MLM loss over masked positions + mean NSP loss over sequences.

  The denominators are the totals of the whole (global) batch, passed in separately, so that the
  gradient of a sum over micro-batches equals the gradient on the full batch exactly.
  """
  return (sums.mlm_nll / jnp.maximum(mlm_weight_total, 1.0)
          + sums.nsp_nll / jnp.maximum(num_sequences_total, 1.0))


def summarize(sums: LossSums) -> dict[str, jax.Array]:
  w = jnp.maximum(sums.mlm_weight, 1.0)
  n = jnp.maximum(sums.num_sequences, 1.0)
  mlm_loss, nsp_loss = sums.mlm_nll / w, sums.nsp_nll / n
  return dict(loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, mlm_accuracy=sums.mlm_correct / w,
              nsp_loss=nsp_loss, nsp_accuracy=sums.nsp_correct / n)
