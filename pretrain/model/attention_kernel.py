"""Self-attention with dropout on the probabilities, fused into one GPU kernel (Pallas / Triton).

`jax.nn.dot_product_attention` runs cuDNN's fused kernel but offers no dropout on the attention
probabilities, which BERT's recipe uses (0.1). Without a fused kernel the step materialises the
(batch, heads, seq, seq) scores, probabilities and dropout mask in HBM, forward and backward, and
draws the mask with threefry: about 10 ms of a 66 ms base-128 step on an H200 (docs/benchmarks.md).

Here the mask is not drawn but hashed: element (b, h, i, j) is kept when a 32-bit hash of its
position and the step's dropout key is at least `rate * 2**32` (SplitMix-style: a Weyl step on
the position, offset by a per-plane seed, through murmur3's finaliser). The kernel recomputes the
same mask in its backward pass instead of storing it, and `reference_attention` computes the same
masks with plain jax.numpy, so the two paths agree to rounding on every backend and mesh (the
seeds use global batch and head indices). The finaliser mixes every input bit into every output
bit; dropout needs no more (tests/test_attention.py checks the keep rate and that masks are
uncorrelated across neighbouring positions, planes and keys).

Layout: q, k, v are (batch, seq, heads, head_dim), as the QKV projection writes them, read in
place by the kernel (no head-major copies). Padding: keys at positions >= length are masked.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from pretrain import sharding
from pretrain.model.dropout import GOLDEN, dropout_threshold, fmix32, index_seeds

try:                                   # the Triton backend of Pallas (jaxlib's GPU build has it)
  from jax.experimental.pallas import triton as plgpu
except ImportError:                    # pragma: no cover
  plgpu = None

# The logit of a padded key: large and negative, yet finite (the kernel's online softmax subtracts
# running maxima, where -inf would give NaN), shared by every attention path of the model.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)


# ------------------------------------------------------------------------------------------------
# The dropout hash, shared by the kernel and the reference (its pieces are in
# pretrain.model.dropout, which hashes the hidden dropout masks the same way).

def plane_seeds(key: jax.Array, batch: int, heads: int) -> jax.Array:
  """uint32 (batch, heads): one seed per attention plane, from the dropout key and the plane's
  global (batch, head) index; computed before any sharding, so no shard sees local indices."""
  b = jnp.arange(batch, dtype=jnp.uint32)[:, None]
  plane = b * jnp.uint32(heads) + jnp.arange(heads, dtype=jnp.uint32)[None, :]
  return index_seeds(jax.random.bits(key, (2,), jnp.uint32), plane)


def _keep(seed: jax.Array, rows: jax.Array, cols: jax.Array, seq_k: int, threshold: int):
  """Where dropout keeps the probability at (rows[:, None], cols[None, :]) of one plane.

  SplitMix-style: the position's index times an odd constant plus the plane's seed, then one
  finaliser. (Two finaliser rounds cost 14% more kernel time at seq 512 on an H100.) The row
  and column parts are multiplied once per tile, leaving an add and the finaliser per element.
  """
  g = jnp.uint32(GOLDEN)
  row_part = rows.astype(jnp.uint32) * (jnp.uint32(seq_k) * g) + seed
  col_part = cols.astype(jnp.uint32) * g
  return fmix32(row_part[:, None] + col_part[None, :]) >= jnp.uint32(threshold)


def hashed_keep_mask(seeds: jax.Array, seq_q: int, seq_k: int, rate: float) -> jax.Array:
  """bool (batch, heads, seq_q, seq_k): the kernel's dropout mask, in plain jax.numpy."""
  rows, cols = jnp.arange(seq_q), jnp.arange(seq_k)
  keep = jax.vmap(jax.vmap(lambda s: _keep(s, rows, cols, seq_k, dropout_threshold(rate))))
  return keep(seeds)


# ------------------------------------------------------------------------------------------------
# Reference: the same function in plain jax.numpy (CPU, TPU, and the tests' yardstick).

def mask_padded_keys(logits: jax.Array, lengths: jax.Array) -> jax.Array:
  """(batch, heads, q, k) float32 logits with keys at positions >= length set to MASK_VALUE."""
  valid = jnp.arange(logits.shape[-1])[None, :] < lengths[:, None]          # (batch, key)
  return jnp.where(valid[:, None, None, :], logits, MASK_VALUE)


def reference_attention(q, k, v, lengths, seeds, rate: float):
  """softmax(q k^T / sqrt(d), keys < length) with hashed dropout, then @ v; (b, s, n, d)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = mask_padded_keys(logits, lengths)
  probs = jax.nn.softmax(logits, axis=-1)
  if rate > 0.0:
    keep = hashed_keep_mask(seeds, q.shape[1], k.shape[1], rate)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
  return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)


# ------------------------------------------------------------------------------------------------
# The kernels. Grid (q blocks, batch, heads) forward; (batch, heads, blocks) backward, where each
# program computes dK, dV of one key block and dQ of the query block with the same index.

def _scores(q, k, valid, scale):
  """Base-2 logits of one tile: log2(e) * scale * q k^T, masked keys at a large negative value."""
  s = plgpu.dot(q, k.T) * (scale * _LOG2E)
  return jnp.where(valid[None, :] != 0, s, MASK_VALUE)


def _forward_kernel(q_ref, k_ref, v_ref, valid_ref, seed_ref, o_ref, lse_ref, *, scale, rate,
                    block_q, block_k):
  seq_k = k_ref.shape[0]
  i = pl.program_id(0)
  seed = seed_ref[...]
  threshold = dropout_threshold(rate)
  q = q_ref[...]
  rows = i * block_q + jnp.arange(block_q)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    ks = pl.dslice(j * block_k, block_k)
    s = _scores(q, k_ref[ks, :], valid_ref[ks], scale)
    m = jnp.maximum(m_prev, s.max(axis=-1))
    corr = jnp.exp2(m_prev - m)
    p = jnp.exp2(s - m[:, None])
    l = corr * l_prev + p.sum(axis=-1)
    if rate > 0.0:
      p = jnp.where(_keep(seed, rows, j * block_k + jnp.arange(block_k), seq_k, threshold), p, 0.)
    acc = corr[:, None] * acc + plgpu.dot(p.astype(v_ref.dtype), v_ref[ks, :])
    return acc, m, l

  acc = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(0, seq_k // block_k, body, (acc, m, l))
  o_ref[...] = (acc * (1.0 / ((1.0 - rate) * l))[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _backward_kernel(q_ref, k_ref, v_ref, valid_ref, seed_ref, do_ref, lse_ref, delta_ref,
                     dq_ref, dk_ref, dv_ref, *, scale, rate, block):
  seq = q_ref.shape[0]
  t = pl.program_id(2)
  seed = seed_ref[...]
  threshold = dropout_threshold(rate)
  inv_keep = 1.0 / (1.0 - rate)
  span = t * block + jnp.arange(block)
  tile = pl.dslice(t * block, block)

  def tile_grads(q, k, v, do, lse, delta, valid, rows, cols):
    """The dropped probabilities P * keep / (1 - rate) and dS (the logits' gradient) of one tile."""
    p = jnp.exp2(_scores(q, k, valid, scale) - lse[:, None])
    dp = plgpu.dot(do, v.T)
    if rate > 0.0:
      keep = _keep(seed, rows, cols, seq, threshold)
      pd = jnp.where(keep, p * inv_keep, 0.0)
      dp = jnp.where(keep, dp * inv_keep, 0.0)
    else:
      pd = p
    return pd, p * (dp - delta[:, None]) * scale

  # dK, dV of key tile t: loop over query tiles.
  k, v, valid_t = k_ref[tile, :], v_ref[tile, :], valid_ref[tile]

  def dkdv(j, carry):
    dk, dv = carry
    qs = pl.dslice(j * block, block)
    q, do = q_ref[qs, :], do_ref[qs, :]
    rows = j * block + jnp.arange(block)
    pd, ds = tile_grads(q, k, v, do, lse_ref[qs], delta_ref[qs], valid_t, rows, span)
    dv = dv + plgpu.dot(pd.astype(do.dtype).T, do)
    dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
    return dk, dv

  zeros = jnp.zeros((block, q_ref.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(0, seq // block, dkdv, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dQ of query tile t: loop over key tiles.
  q, do, lse, delta = q_ref[tile, :], do_ref[tile, :], lse_ref[tile], delta_ref[tile]

  def dq_body(j, dq):
    ks = pl.dslice(j * block, block)
    k = k_ref[ks, :]
    cols = j * block + jnp.arange(block)
    _, ds = tile_grads(q, k, v_ref[ks, :], do, lse, delta, valid_ref[ks], span, cols)
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, seq // block, dq_body, zeros)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _block(size: int, want: int) -> int:
  b = min(want, size)
  if size % b or b & (b - 1):
    raise ValueError(f"sequence length {size} must be a multiple of a power-of-two block "
                     f"(asked for {want})")
  return b


def _specs_bsnd(block, d, index):
  """Blocks of `block` positions x head_dim of one (batch, head) of a (b, s, n, d) array."""
  return pl.BlockSpec((None, block, None, d), index)


def _specs_qkv(block, d, index, c):
  """The same blocks of q (c=0), k (1) or v (2) inside the packed (b, s, 3, n, d) QKV array."""
  def packed_index(*grid):
    j, i, h, _ = index(*grid)
    return j, i, c, h, 0
  return pl.BlockSpec((None, block, None, None, d), packed_index)


def _inputs_and_specs(qkv, block, index):
  """(arrays, block specs) of q, k, v: three (b, s, n, d) arrays, or one packed (b, s, 3, n, d)."""
  if isinstance(qkv, tuple):
    return list(qkv), [_specs_bsnd(block, qkv[0].shape[-1], index)] * 3
  return [qkv] * 3, [_specs_qkv(block, qkv.shape[-1], index, c) for c in range(3)]


def _forward(qkv, valid, seeds, rate, block_q, block_k, num_warps, num_stages, interpret):
  q = qkv[0] if isinstance(qkv, tuple) else qkv[:, :, 0]
  b, s, n, d = q.shape
  block_q, block_k = _block(s, block_q), _block(s, block_k)
  full = lambda i, j, h: (j, 0, h, 0)                                  # noqa: E731
  tile = lambda i, j, h: (j, i, h, 0)                                  # noqa: E731
  arrays, specs = _inputs_and_specs(qkv, s, full)
  specs[0] = _inputs_and_specs(qkv, block_q, tile)[1][0]                # q: one block of queries
  kernel = functools.partial(_forward_kernel, scale=d ** -0.5, rate=rate, block_q=block_q,
                             block_k=block_k)
  return pl.pallas_call(
      kernel,
      grid=(s // block_q, b, n),
      in_specs=specs + [pl.BlockSpec((None, s), lambda i, j, h: (j, 0)),
                        pl.BlockSpec((None, None), lambda i, j, h: (j, h))],
      out_specs=[_specs_bsnd(block_q, d, tile),
                 pl.BlockSpec((None, None, block_q), lambda i, j, h: (j, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, s, n, d), q.dtype),
                 jax.ShapeDtypeStruct((b, n, s), jnp.float32)],
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages),
      interpret=interpret, name="dropout_attention_fwd",
  )(*arrays, valid, seeds)


def _packed_backward_kernel(*refs, **kwargs):
  """`_backward_kernel` writing dQ, dK, dV into one (block, 3, head_dim) block of dQKV."""
  *inputs, dqkv_ref = refs
  _backward_kernel(*inputs, *(dqkv_ref.at[:, c, :] for c in range(3)), **kwargs)


def _backward(qkv, valid, seeds, o, lse, do, rate, block, num_warps, num_stages, interpret):
  packed = not isinstance(qkv, tuple)
  b, s, n, d = o.shape
  block = _block(s, block)
  # delta_i = sum_j P_ij dP_ij = do_i . o_i, dropout included (dP carries the same mask as P).
  delta = jnp.einsum("bsnd,bsnd->bns", o.astype(jnp.float32), do.astype(jnp.float32))
  full = lambda j, h, t: (j, 0, h, 0)                                  # noqa: E731
  tile = lambda j, h, t: (j, t, h, 0)                                  # noqa: E731
  row = pl.BlockSpec((None, None, s), lambda j, h, t: (j, h, 0))
  arrays, specs = _inputs_and_specs(qkv, s, full)
  kernel = functools.partial(_packed_backward_kernel if packed else _backward_kernel,
                             scale=d ** -0.5, rate=rate, block=block)
  if packed:
    out_specs = pl.BlockSpec((None, block, 3, None, d), lambda j, h, t: (j, t, 0, h, 0))
    out_shape = jax.ShapeDtypeStruct(qkv.shape, qkv.dtype)
  else:
    out_specs = [_specs_bsnd(block, d, tile)] * 3
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qkv]
  return pl.pallas_call(
      kernel,
      grid=(b, n, s // block),
      in_specs=specs + [pl.BlockSpec((None, s), lambda j, h, t: (j, 0)),
                        pl.BlockSpec((None, None), lambda j, h, t: (j, h)),
                        _specs_bsnd(s, d, full), row, row],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages),
      interpret=interpret, name="dropout_attention_bwd",
  )(*arrays, valid, seeds, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(qkv, valid, seeds, rate, blocks, interpret):
  """`qkv`: a tuple (q, k, v) of (b, s, n, d) arrays or one packed (b, s, 3, n, d) array."""
  return _fused_fwd(qkv, valid, seeds, rate, blocks, interpret)[0]


def _fused_fwd(qkv, valid, seeds, rate, blocks, interpret):
  o, lse = _forward(qkv, valid, seeds, rate, blocks[0], blocks[1], blocks[3], blocks[5],
                    interpret)
  return o, (qkv, valid, seeds, o, lse)


def _fused_bwd(rate, blocks, interpret, res, do):
  qkv, valid, seeds, o, lse = res
  dqkv = _backward(qkv, valid, seeds, o, lse, do, rate, blocks[2], blocks[4], blocks[5],
                   interpret)
  return (tuple(dqkv) if isinstance(qkv, tuple) else dqkv), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)

# (forward block_q, forward block_k, backward block, forward warps, backward warps, pipeline
# stages): the fastest of the settings tried at seq 128 and 512 on an H100
# (tools/bench_attention.py, docs/benchmarks.md).
DEFAULT_BLOCKS = (64, 64, 64, 4, 4, 3)


def kernel_supports(seq: int, head_dim: int) -> bool:
  """The kernel's shape limits: power-of-two head_dim >= 16, seq a multiple of 16."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and seq % 16 == 0


def _fit_blocks(seq: int, blocks) -> tuple[int, ...]:
  """Each block size made the largest power of two <= it that divides seq."""
  largest = seq & -seq                                 # largest power of two dividing seq
  return tuple(min(b, largest) for b in blocks[:3]) + tuple(blocks[3:])


def fused_attention(q, k, v, lengths, seeds, rate: float, *, blocks=DEFAULT_BLOCKS,
                    interpret: bool = False):
  """The Pallas kernel: same function as `reference_attention`, (b, s, n, d) in and out.

  Self-attention: q, k and v share their shape.
  """
  if q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"fused attention needs q, k, v of one shape; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  return _kernel((q, k, v), lengths, seeds, rate, blocks, interpret)


def fused_qkv_attention(qkv, lengths, seeds, rate: float, *, blocks=DEFAULT_BLOCKS,
                        interpret: bool = False):
  """`fused_attention` of the packed (b, s, 3, n, d) projection: the kernels read q, k and v in
  place (no slice copies) and the backward writes one packed gradient (no concatenation)."""
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise ValueError(f"packed QKV must be (batch, seq, 3, heads, head_dim); got {qkv.shape}")
  return _kernel(qkv, lengths, seeds, rate, blocks, interpret)


def _kernel(qkv, lengths, seeds, rate, blocks, interpret):
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"attention dropout rate {rate} must be in [0, 1)")
  seq = qkv[0].shape[1] if isinstance(qkv, tuple) else qkv.shape[1]
  valid = (jnp.arange(seq)[None, :] < lengths[:, None]).astype(jnp.int32)
  blocks = tuple(blocks) + DEFAULT_BLOCKS[len(blocks):]          # stages optional
  return _fused(qkv, valid, seeds, float(rate), blocks, interpret)


def dropout_attention(q, k, v, lengths, key, rate: float, *, use_kernel: bool = False,
                      blocks=DEFAULT_BLOCKS, interpret: bool = False):
  """Attention with hashed dropout: the GPU kernel (`use_kernel`) or its jax.numpy twin.

  Both draw the same masks, so the choice changes rounding, not the function; `pretrain.speed`
  makes it for the model (the kernel on a GPU, for shapes `kernel_supports`).
  `interpret=True` runs the kernel in Pallas' interpreter (any backend; the tests' CPU check).

  Under a mesh the kernel runs per shard (`shard_map` over the batch and head axes, as
  `pretrain.sharding` places them); the plane seeds are computed from global indices first, so
  the masks do not depend on the mesh.
  """
  return _dispatch((q, k, v), lengths, key, rate, use_kernel, blocks, interpret)


def qkv_dropout_attention(qkv, lengths, key, rate: float, *, use_kernel: bool = False,
                          blocks=DEFAULT_BLOCKS, interpret: bool = False):
  """`dropout_attention` of the packed (batch, seq, 3, heads, head_dim) QKV projection."""
  return _dispatch(qkv, lengths, key, rate, use_kernel, blocks, interpret)


def _dispatch(qkv, lengths, key, rate, use_kernel, blocks, interpret):
  packed = not isinstance(qkv, tuple)
  b, s, n, d = qkv[:, :, 0].shape if packed else qkv[0].shape
  seeds = plane_seeds(key, b, n) if rate > 0.0 else jnp.zeros((b, n), jnp.uint32)
  if not use_kernel:
    q, k, v = (qkv[:, :, c] for c in range(3)) if packed else qkv
    return reference_attention(q, k, v, lengths, seeds, rate)
  blocks = _fit_blocks(s, blocks)
  if packed:
    fn = functools.partial(fused_qkv_attention, rate=rate, blocks=blocks, interpret=interpret)
    args = (qkv,)
  else:
    fn = functools.partial(fused_attention, rate=rate, blocks=blocks, interpret=interpret)
    args = qkv
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return fn(*args, lengths, seeds)
  act = sharding.logical_to_spec(("batch", "seq", "act_heads", "act_kv"))
  act_in = (act,) * 3
  if packed:
    act_in = (sharding.logical_to_spec(("batch", "seq", None, "act_heads", "act_kv")),)
  spec_seeds = sharding.logical_to_spec(("batch", "act_heads"))
  spec_len = sharding.logical_to_spec(("batch",))
  return jax.shard_map(fn, in_specs=(*act_in, spec_len, spec_seeds), out_specs=act,
                       check_vma=False)(*args, lengths, seeds)
