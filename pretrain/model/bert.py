"""BERT (Devlin et al., 2019) in Flax NNX: embeddings, post-LN encoder, pooler.

Faithful to google-research/bert: word + position + token-type embeddings, LayerNorm(eps=1e-12),
dropout, post-LN layers, GELU, tanh pooler on [CLS]. Parameters are float32 and carry logical axis
names (metadata `axes`, read by `pretrain.sharding`); matmuls and activations run in `dtype`
(bfloat16 by default), LayerNorm statistics and softmax in float32. The module knows nothing of meshes.

Dropout is functional: `__call__` takes a PRNG key (None = deterministic), so the jitted train step
stays a pure function of (params, batch, key).
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from pretrain import sharding
from pretrain import speed
from pretrain.model import residual_norm
from pretrain.model.attention import SelfAttention
from pretrain.model.config import BertConfig
from pretrain.model.dropout import dropout, dropout_key, split_key
from pretrain.model.heads import MLMHead, NSPHead
from pretrain.model.layers import REMAT_POLICIES, Dense, LayerNorm, activation, normal_init, param
from pretrain.speed import SpeedPath


class Embeddings(nnx.Module):

  def __init__(self, config: BertConfig, path: SpeedPath, *, rngs: nnx.Rngs):
    init, h = normal_init(config), config.hidden_size
    self.word_embeddings = param(rngs, init, (config.padded_vocab_size, h), ("vocab", "embed"),
                                 config)
    self.position_embeddings = param(rngs, init, (config.max_position_embeddings, h),
                                     ("position", "embed"), config)
    self.token_type_embeddings = param(rngs, init, (config.type_vocab_size, h),
                                       ("position", "embed"), config)
    self.layer_norm = LayerNorm(h, config, rngs=rngs)
    self.dropout_rate = config.hidden_dropout
    self.dropout_rng = path.dropout_rng

  def __call__(self, input_ids, segment_ids, key):
    seq_len = input_ids.shape[1]
    x = jnp.take(self.word_embeddings[...], input_ids, axis=0)
    x = x + self.position_embeddings[...][None, :seq_len]
    x = x + jnp.take(self.token_type_embeddings[...], segment_ids, axis=0)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    return dropout(self.layer_norm(x), self.dropout_rate, key, self.dropout_rng)


class EncoderLayer(nnx.Module):
  """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

  Each `LN(x + dropout(branch + bias))` is one Pallas kernel pair on GPUs
  (`model.residual_norm_impl="fused"`, `model/residual_norm.py`, hashed masks as
  `dropout.hashed_dropout`'s), the same chain in jax.numpy elsewhere. Each such output feeds two
  consumers (the next residual add and the next branch), so it is handed on as a pair of the same
  array, `(for the residual, for the branch)`: the kernel's backward then adds the two gradients
  itself. A layer takes x or such a pair and returns a pair.
  """

  def __init__(self, config: BertConfig, path: SpeedPath, *, rngs: nnx.Rngs):
    h, m = config.hidden_size, config.intermediate_size
    self.attention = SelfAttention(config, path, rngs=rngs)
    self.attention_layer_norm = LayerNorm(h, config, rngs=rngs)
    self.intermediate = Dense(h, m, ("embed", "mlp"), config, rngs=rngs)
    self.output = Dense(m, h, ("mlp", "embed"), config, rngs=rngs)
    self.output_layer_norm = LayerNorm(h, config, rngs=rngs)
    self.activation = activation(config.hidden_act)
    self.dropout_rate = config.hidden_dropout
    self.dropout_rng = path.dropout_rng
    self.residual_norm_kernel = path.residual_norm == "kernel"

  def __call__(self, x, lengths, key):
    attn_key, attn_out_key, ffn_key = split_key(key, 3)
    x_res, x = x if isinstance(x, tuple) else (x, x)
    a = self.attention(x, lengths, attn_key, add_bias=False)
    x_res, x = self._add_norm(x_res, a, self.attention.out_bias, self.attention_layer_norm,
                              attn_out_key)
    f = self.activation(self.intermediate(x))
    f = sharding.constrain(f, ("batch", "seq", "act_mlp"))
    f = self.output(f, add_bias=False)
    return self._add_norm(x_res, f, self.output.bias, self.output_layer_norm, ffn_key)

  def _add_norm(self, residual, branch, bias, norm: LayerNorm, key):
    """norm(residual + dropout(branch + bias)), twice: (for the residual, for the branch)."""
    rate = 0.0 if key is None else self.dropout_rate
    if self.residual_norm_kernel:
      words = None if rate == 0.0 else jax.random.bits(key, (2,), jnp.uint32)
      y = residual_norm.fused(residual, branch, bias[...], norm.scale[...], norm.bias[...],
                              words, rate, norm.eps, fork=True)
    else:
      branch = dropout(branch + bias[...].astype(branch.dtype), rate, key, self.dropout_rng)
      y = (norm(residual + branch),) * 2
    return tuple(sharding.constrain(a, ("batch", "seq", "act_embed")) for a in y)


class BertModel(nnx.Module):
  """Embeddings -> encoder layers -> (sequence output, pooled [CLS] output).

  `model.scan_layers=False` (default) keeps one module per layer: parameters `layers/<i>/...`, the
  layout checkpoints, `pretrain/model/hf_convert.py` and fine-tuning use. With `scan_layers=True` the
  layers are one module whose parameters carry a leading layer axis (`layers/attention/qkv_kernel`
  of shape (num_layers, ...), logical axis None) run by one `jax.lax.scan`: a smaller program and
  faster compiles (TPU pods), usually a slower step on GPU. `stack_layer_params` and
  `unstack_layer_params` convert a parameter tree between the two layouts.
  `model.remat_policy` wraps each layer (or the scan body) in `jax.checkpoint` with that policy.
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, path: SpeedPath | None = None):
    path = path or speed.resolve(config)
    self.embeddings = Embeddings(config, path, rngs=rngs)
    if path.scan_layers:
      self.layers = _stacked_layers(config, path, rngs)
    else:
      self.layers = nnx.List([EncoderLayer(config, path, rngs=rngs)
                              for _ in range(config.num_layers)])
    self.pooler = Dense(config.hidden_size, config.hidden_size, ("embed", "mlp"), config,
                        rngs=rngs)
    self.num_layers = config.num_layers
    self.scan_layers = path.scan_layers
    self.remat_policy = path.remat_policy
    self.dropout_rng = path.dropout_rng

  def __call__(self, input_ids, input_mask, segment_ids, key=None, *, all_layers=False):
    """(sequence output, pooled output); with `all_layers`, also the tuple of hidden states
    (embeddings output, then every layer's output: num_layers + 1 entries).

    `input_mask` is 1 on real tokens, 0 on trailing padding (google-research/bert layout).
    """
    lengths = input_mask.astype(jnp.int32).sum(-1)
    key = dropout_key(key, self.dropout_rng)
    keys = None if key is None else jax.random.split(key, self.num_layers + 1)
    x = self.embeddings(input_ids, segment_ids, None if keys is None else keys[0])
    layer_keys = None if keys is None else keys[1:]
    policy = REMAT_POLICIES[self.remat_policy]
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)

      def body(h, xs):
        layer_state, layer_key = xs
        h = nnx.merge(graphdef, layer_state)(h, lengths, layer_key)
        return h, (h[1] if all_layers else None)

      if policy is not None:
        body = jax.checkpoint(body, policy=policy)
      embedded = x
      (_, x), ys = jax.lax.scan(body, (x, x), (state, layer_keys))
      hidden = [embedded, *ys] if all_layers else None
    else:
      hidden = [x]
      for i, layer in enumerate(self.layers):
        x = _apply_layer(layer, x, lengths, None if layer_keys is None else layer_keys[i], policy)
        hidden.append(x[1])
      x = x[1]            # a layer returns (for the next residual, for the next branch)
    pooled = jnp.tanh(self.pooler(x[:, 0]))
    return (x, pooled, tuple(hidden)) if all_layers else (x, pooled)


def _apply_layer(layer: EncoderLayer, x, lengths, key, policy):
  if policy is None:
    return layer(x, lengths, key)
  graphdef, state = nnx.split(layer)

  def run(layer_state, h, layer_key):
    return nnx.merge(graphdef, layer_state)(h, lengths, layer_key)

  return jax.checkpoint(run, policy=policy)(state, x, key)


def _stacked_layers(config: BertConfig, path: SpeedPath, rngs: nnx.Rngs) -> EncoderLayer:
  """One EncoderLayer whose parameters have a leading axis of num_layers (nnx.vmap over init)."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(layer_rngs):
    return EncoderLayer(config, path, rngs=layer_rngs)

  layers = make(rngs)
  for _, variable in nnx.iter_graph(layers):
    if isinstance(variable, nnx.Param):
      variable.set_metadata("axes", (None,) + tuple(variable.get_metadata()["axes"]))
  return layers


def stack_layer_params(params: dict, num_layers: int) -> dict:
  """A pure param dict in the default layout (`bert/layers/<i>/...`) -> the scan layout."""
  layers = [params["bert"]["layers"][i] for i in range(num_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "bert": {**params["bert"], "layers": stacked}}


def unstack_layer_params(params: dict) -> dict:
  """A pure param dict in the scan layout -> the default layout (`bert/layers/<i>/...`)."""
  stacked = params["bert"]["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  layers = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
  return {**params, "bert": {**params["bert"], "layers": layers}}


class PretrainOutput(NamedTuple):
  sequence_output: jax.Array   # (batch, seq, hidden), compute dtype
  pooled_output: jax.Array     # (batch, hidden)
  mlm_logits: jax.Array        # (batch, max_predictions, padded_vocab), float32
  nsp_logits: jax.Array        # (batch, 2), float32


class BertForPreTraining(nnx.Module):
  """BERT with the masked-LM head (tied to the word embeddings) and the next-sentence head."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, path: SpeedPath | None = None):
    path = path or speed.resolve(config)
    self.config = config
    self.bert = BertModel(config, rngs=rngs, path=path)
    self.mlm = MLMHead(config, path, rngs=rngs)
    self.nsp = NSPHead(config, rngs=rngs)

  def __call__(self, batch: dict[str, jax.Array], key: jax.Array | None = None) -> PretrainOutput:
    seq, pooled = self.bert(batch["input_ids"], batch["input_mask"], batch["segment_ids"], key)
    mlm_logits = self.mlm(seq, batch["masked_lm_positions"],
                          self.bert.embeddings.word_embeddings[...])
    return PretrainOutput(seq, pooled, mlm_logits, self.nsp(pooled))
