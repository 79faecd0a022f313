"""BERT's self-attention: one packed QKV projection, then attention with or without dropout.

Without dropout on the probabilities it runs `jax.nn.dot_product_attention` (cuDNN or XLA) or the
fused kernel at rate 0; with dropout, which `jax.nn.dot_product_attention` does not offer, one of
three paths (`model.attention_dropout_impl`), the fastest being the Pallas kernel of
`pretrain.model.attention_kernel`.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from pretrain import sharding
from pretrain.model import attention_kernel
from pretrain.model.config import BertConfig
from pretrain.model.dropout import dropout, dropout_mask, softmax_dropout
from pretrain.model.layers import einsum_f32_out, normal_init, param
from pretrain.speed import SpeedPath


class SelfAttention(nnx.Module):
  """Multi-head self-attention with one fused QKV projection."""

  def __init__(self, config: BertConfig, path: SpeedPath, *, rngs: nnx.Rngs):
    h, n, d = config.hidden_size, config.num_heads, config.head_dim
    init = normal_init(config)
    zeros = jax.nn.initializers.zeros
    self.qkv_kernel = param(rngs, init, (h, 3, n, d), ("embed", "qkv", "heads", "kv"), config)
    self.qkv_bias = param(rngs, zeros, (3, n, d), ("qkv", "heads", "kv"), config)
    self.out_kernel = param(rngs, init, (n, d, h), ("heads", "kv", "embed"), config)
    self.out_bias = param(rngs, zeros, (h,), ("norm",), config)
    self.dtype = config.compute_dtype
    self.dropout_rate = config.attention_dropout
    self.impl = path.attention                  # auto | xla | cudnn | kernel | twin
    self.dropout_impl = path.attention_dropout  # reference | lean | kernel | twin
    self.dropout_rng = path.dropout_rng
    self.grad_dtype = path.logits_grad_dtype

  def __call__(self, x, lengths, key, *, add_bias: bool = True):
    """Attention of x over itself; `add_bias=False` leaves the output bias to the caller."""
    dt = self.dtype
    # (batch, seq, 3, heads, head_dim): the GEMM's natural output order. Putting the qkv axis first
    # ("cbsnd") costs a transpose; this order made the cuDNN step 6% faster on an H200.
    qkv = jnp.einsum("bsh,hcnd->bscnd", x, self.qkv_kernel[...].astype(dt))
    qkv = qkv + self.qkv_bias[...].astype(dt)
    if key is not None and self.dropout_rate > 0.0:
      ctx = self._attention_with_dropout(qkv, lengths, key)
    elif self.impl in ("kernel", "twin"):  # the dropout kernel at rate 0, on the packed projection
      qkv = sharding.constrain(qkv, ("batch", "seq", None, "act_heads", "act_kv"))
      ctx = attention_kernel.qkv_dropout_attention(qkv, lengths, None, 0.0,
                                                   use_kernel=self.impl == "kernel")
    else:
      q, k, v = _split_qkv(qkv)
      ctx = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                         implementation=None if self.impl == "auto" else self.impl)
    out = jnp.einsum("bsnd,ndh->bsh", ctx, self.out_kernel[...].astype(dt))
    return out + self.out_bias[...].astype(dt) if add_bias else out

  def _attention_with_dropout(self, qkv, lengths, key):
    """Attention-probability dropout, which `jax.nn.dot_product_attention` does not offer.

    The path (`pretrain.speed`, from `model.attention_dropout_impl`): "reference" differentiates
    softmax and dropout by plain autodiff (float32 probabilities kept for the backward pass);
    "lean" computes the same forward values through `dropout.softmax_dropout`, whose backward
    keeps bfloat16 probabilities; both draw their masks as `model.dropout_rng` says. "kernel" runs
    `attention_kernel`'s Pallas kernel (GPUs) and "twin" its jax.numpy twin (elsewhere), whose
    masks are hashed from the key; the kernel reads q, k and v from the packed projection in place.
    """
    if self.dropout_impl in ("kernel", "twin"):
      qkv = sharding.constrain(qkv, ("batch", "seq", None, "act_heads", "act_kv"))
      return attention_kernel.qkv_dropout_attention(qkv, lengths, key, self.dropout_rate,
                                                    use_kernel=self.dropout_impl == "kernel")
    q, k, v = _split_qkv(qkv)
    scale = q.shape[-1] ** -0.5
    logits = einsum_f32_out("bqnd,bknd->bnqk", q, k, self.grad_dtype) * scale
    logits = attention_kernel.mask_padded_keys(logits, lengths)
    if self.dropout_impl == "lean":
      keep = dropout_mask(key, self.dropout_rate, logits.shape, self.dropout_rng)
      probs = softmax_dropout(logits, keep, self.dropout_rate, v.dtype)
    else:
      probs = dropout(jax.nn.softmax(logits, axis=-1), self.dropout_rate, key, self.dropout_rng)
      probs = probs.astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def _split_qkv(qkv):
  """q, k, v of the packed (batch, seq, 3, heads, head_dim) projection."""
  return (sharding.constrain(qkv[:, :, i], ("batch", "seq", "act_heads", "act_kv"))
          for i in range(3))
