"""The post-LN block's tail, LayerNorm(residual + dropout(branch + bias)), as one GPU kernel pair.

Every BERT layer ends twice in this chain: the attention output and the FFN output are each
biased, dropped out, added to the layer's input and normalised. XLA compiled it into several
passes over the activations, forward and backward (one of them writing a float32 tensor of their
size), plus one for the bias gradient: 0.60 ms per chain, forward + backward, at base-128 on an
H100. Here one Pallas (Triton) kernel does the forward chain in one pass over its inputs and
another the whole backward in one pass: the gradients of the residual and of the branch (dropout
applied), and per-block partial sums of the LayerNorm scale, LayerNorm bias and branch bias
gradients, which XLA adds up in one reduction: 0.28 ms, and the base-128 step went from 54.4 to
48.0 ms (docs/benchmarks.md). With `fork=True` the output is returned twice, for its two consumers
(the next residual add and the next branch), and the backward kernel adds their two gradients
itself, which saved XLA's separate add (47.4 ms).

The dropout mask is `dropout.hashed_dropout_mask`'s (model.dropout_rng="hash"): the same hash of
each element's position and its batch row's seed, recomputed in the backward pass, so this path
and the plain one (`reference`) compute the same function with the same masks, to rounding. The
roundings follow the plain path's: the biased branch, the dropped branch and the sum are rounded
to the compute dtype; statistics and normalisation are float32.

Layout: (batch, seq, hidden) in and out, processed as rows of `hidden`, `block_rows` rows per
program (a block never straddles two sequences, so its dropout seed is one scalar). Triton wants
power-of-two shapes, so a row is handled in chunks of the largest power of two dividing hidden
(768 = 3 x 256).
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pretrain import sharding
from pretrain.model.dropout import hashed_dropout, hashed_keep, index_seeds

try:                                   # the Triton backend of Pallas (jaxlib's GPU build has it)
  from jax.experimental.pallas import triton as plgpu
except ImportError:                    # pragma: no cover
  plgpu = None

# (rows per program, warps forward, warps backward): of six settings tried on an H100
# (tools/bench_residual_norm.py, docs/benchmarks.md), the fastest at hidden 1024 and within 3% of
# the fastest (16, 4, 4) at hidden 768, which is 50% slower at 1024.
DEFAULT_BLOCKS = (8, 4, 4)


def reference(residual, branch, bias, scale, offset, words, rate: float, eps: float):
  """The plain chain: LayerNorm(residual + hashed_dropout(branch + bias)), float32 statistics.

  `words` are the two uint32 words of the dropout key (`dropout.dropout`), None without dropout.
  """
  dt = residual.dtype
  x = branch + bias.astype(dt)
  if words is not None and rate > 0.0:
    x = hashed_dropout(x, words, rate)
  z = (residual + x).astype(jnp.float32)
  mean = z.mean(-1, keepdims=True)
  var = jnp.square(z - mean).mean(-1, keepdims=True)
  y = (z - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale + offset).astype(dt)


# ------------------------------------------------------------------------------------------------
# The kernels. Grid: one program per block of `block_rows` rows of the (rows, hidden) arrays.

def _chunks(hidden: int) -> list[pl.Slice]:
  chunk = min(hidden & -hidden, 1024)         # largest power of two dividing hidden, at most 1024
  return [pl.ds(c, chunk) for c in range(0, hidden, chunk)]


def _keep(seed, positions, cols: pl.Slice, hidden: int, rate: float):
  """`dropout.hashed_dropout_mask` for a tile: element (s, h) of its row has offset s * hidden + h."""
  offset = (positions.astype(jnp.uint32)[:, None] * jnp.uint32(hidden)
            + (cols.start + jnp.arange(cols.size)).astype(jnp.uint32)[None, :])
  return hashed_keep(offset, seed, rate)


def _positions(block_rows: int, seq: int):
  """Each row's position in its sequence (a block lies within one sequence)."""
  return (pl.program_id(0) * block_rows) % seq + jnp.arange(block_rows)


def _forward_kernel(r_ref, a_ref, bias_ref, scale_ref, offset_ref, seed_ref, y_ref, *saved,
                    rate, eps, seq, block_rows):
  hidden = r_ref.shape[-1]
  dt = r_ref.dtype
  positions = _positions(block_rows, seq)
  zs = []
  for cols in _chunks(hidden):
    x = (a_ref[:, cols].astype(jnp.float32) + bias_ref[cols].astype(dt).astype(jnp.float32)[None])
    x = x.astype(dt).astype(jnp.float32)
    if rate > 0.0:
      keep = _keep(seed_ref[...], positions, cols, hidden, rate)
      x = jnp.where(keep, (x / (1.0 - rate)).astype(dt).astype(jnp.float32), 0.0)
    z = (r_ref[:, cols].astype(jnp.float32) + x).astype(dt)
    if saved:
      saved[0][:, cols] = z
    zs.append(z.astype(jnp.float32))
  mean = sum(z.sum(axis=-1) for z in zs) / hidden
  var = sum(jnp.square(z - mean[:, None]).sum(axis=-1) for z in zs) / hidden
  rstd = jax.lax.rsqrt(var + eps)
  for cols, z in zip(_chunks(hidden), zs):
    y = (z - mean[:, None]) * rstd[:, None] * scale_ref[cols][None] + offset_ref[cols][None]
    y_ref[:, cols] = y.astype(y_ref.dtype)
  if saved:
    saved[1][...] = mean
    saved[2][...] = rstd


def _backward_kernel(*refs, rate, seq, block_rows, forked):
  """dr, da, and this block's column sums of the scale, offset and bias gradients (one
  (3, hidden) block of the partial sums). `forked`: the output's gradient comes in two parts."""
  dys, (z_ref, mean_ref, rstd_ref, scale_ref, seed_ref, dr_ref, da_ref, partial_ref) = (
      refs[:1 + forked], refs[1 + forked:])
  hidden = z_ref.shape[-1]
  dt = z_ref.dtype
  positions = _positions(block_rows, seq)
  mean, rstd = mean_ref[...], rstd_ref[...]
  tiles, sum_g, sum_gx = [], 0.0, 0.0
  for cols in _chunks(hidden):
    dy = sum(dy_ref[:, cols].astype(jnp.float32) for dy_ref in dys)
    xhat = (z_ref[:, cols].astype(jnp.float32) - mean[:, None]) * rstd[:, None]
    g = dy * scale_ref[cols][None]
    sum_g = sum_g + g.sum(axis=-1)
    sum_gx = sum_gx + (g * xhat).sum(axis=-1)
    partial_ref[0, cols] = (dy * xhat).sum(axis=0)          # scale
    partial_ref[1, cols] = dy.sum(axis=0)                   # offset
    tiles.append((cols, g, xhat))
  mean_g, mean_gx = sum_g / hidden, sum_gx / hidden
  for cols, g, xhat in tiles:
    dz = (rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])).astype(dt)
    dr_ref[:, cols] = dz
    da = dz.astype(jnp.float32)
    if rate > 0.0:
      keep = _keep(seed_ref[...], positions, cols, hidden, rate)
      da = jnp.where(keep, da / (1.0 - rate), 0.0)
    da = da.astype(dt)
    da_ref[:, cols] = da
    partial_ref[2, cols] = da.astype(jnp.float32).sum(axis=0)   # bias


def _row_specs(block_rows, hidden, seq):
  rows = pl.BlockSpec((block_rows, hidden), lambda i: (i, 0))
  vector = pl.BlockSpec((hidden,), lambda i: (0,))
  per_row = pl.BlockSpec((block_rows,), lambda i: (i,))
  seed = pl.BlockSpec((None,), lambda i: (i * block_rows // seq,))
  partial = pl.BlockSpec((None, 3, hidden), lambda i: (i, 0, 0))
  return rows, vector, per_row, seed, partial


def _params(interpret, num_warps):
  return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _forward(r, a, bias, scale, offset, seeds, rate, eps, blocks, interpret, save):
  b, s, h = r.shape
  rows, vector, per_row, seed, _ = _row_specs(blocks[0], h, s)
  n = b * s
  out_specs, out_shape = [rows], [jax.ShapeDtypeStruct((n, h), r.dtype)]
  if save:
    out_specs += [rows, per_row, per_row]
    out_shape += [jax.ShapeDtypeStruct((n, h), r.dtype),
                  jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)]
  kernel = functools.partial(_forward_kernel, rate=rate, eps=eps, seq=s, block_rows=blocks[0])
  out = pl.pallas_call(
      kernel, grid=(n // blocks[0],),
      in_specs=[rows, rows, vector, vector, vector, seed], out_specs=out_specs,
      out_shape=out_shape, compiler_params=_params(interpret, blocks[1]), interpret=interpret,
      name="residual_norm_fwd",
  )(r.reshape(n, h), a.reshape(n, h), bias, scale, offset, seeds)
  return [out[0].reshape(b, s, h)] + list(out[1:])


def _backward(dys, z, mean, rstd, scale, seeds, rate, blocks, interpret):
  b, s, h = dys[0].shape
  block_rows = blocks[0]
  rows, vector, per_row, seed, partial = _row_specs(block_rows, h, s)
  n = b * s
  act = jax.ShapeDtypeStruct((n, h), z.dtype)
  part = jax.ShapeDtypeStruct((n // block_rows, 3, h), jnp.float32)
  kernel = functools.partial(_backward_kernel, rate=rate, seq=s, block_rows=block_rows,
                             forked=len(dys) == 2)
  dr, da, partial_sums = pl.pallas_call(
      kernel, grid=(n // block_rows,),
      in_specs=[rows] * len(dys) + [rows, per_row, per_row, vector, seed],
      out_specs=[rows, rows, partial],
      out_shape=[act, act, part],
      compiler_params=_params(interpret, blocks[2]), interpret=interpret,
      name="residual_norm_bwd",
  )(*(dy.reshape(n, h) for dy in dys), z, mean, rstd, scale, seeds)
  return dr.reshape(b, s, h), da.reshape(b, s, h), partial_sums


# Under a mesh the kernels run per shard of the batch (shard_map); the partial sums of the
# parameter gradients come back sharded the same way and are added up outside, where XLA inserts
# the cross-device reduction.

def _per_shard(fn, in_axes, out_axes):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return fn
  spec = lambda axes: sharding.logical_to_spec(axes) if axes else jax.sharding.PartitionSpec()  # noqa: E731
  return jax.shard_map(fn, in_specs=tuple(spec(a) for a in in_axes),
                       out_specs=tuple(spec(a) for a in out_axes), check_vma=False)


_ACT = ("batch", "seq", "act_embed")
_ROWS = ("batch", "act_embed")      # (batch x seq, hidden), rows in batch-major order
_ROW = ("batch",)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _fused(r, a, bias, scale, offset, seeds, rate, eps, blocks, interpret, fork):
  fn = lambda *args: tuple(_forward(*args, rate, eps, blocks, interpret, False))  # noqa: E731
  y = _per_shard(fn, (_ACT, _ACT, None, None, None, _ROW), (_ACT,))(
      r, a, bias, scale, offset, seeds)[0]
  return (y, y) if fork else y


def _fused_fwd(r, a, bias, scale, offset, seeds, rate, eps, blocks, interpret, fork):
  fn = lambda *args: tuple(_forward(*args, rate, eps, blocks, interpret, True))  # noqa: E731
  y, z, mean, rstd = _per_shard(fn, (_ACT, _ACT, None, None, None, _ROW),
                                (_ACT, _ROWS, _ROW, _ROW))(r, a, bias, scale, offset, seeds)
  return ((y, y) if fork else y), (z, mean, rstd, scale, seeds, bias)


def _fused_bwd(rate, eps, blocks, interpret, fork, res, dy):
  del eps
  z, mean, rstd, scale, seeds, bias = res
  dys = tuple(dy) if fork else (dy,)
  fn = lambda *args: _backward(args[:-5], *args[-5:], rate, blocks, interpret)  # noqa: E731
  dr, da, partial_sums = _per_shard(
      fn, (_ACT,) * len(dys) + (_ROWS, _ROW, _ROW, None, _ROW),
      (_ACT, _ACT, ("batch", None, None)))(*dys, z, mean, rstd, scale, seeds)
  dscale, doffset, dbias = partial_sums.sum(0)         # one reduction (across devices too)
  return (dr, da, dbias.astype(bias.dtype), dscale.astype(scale.dtype),
          doffset.astype(scale.dtype), None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def kernel_supports(hidden: int) -> bool:
  """The kernel's shape limit: hidden a multiple of 16 (its chunks are powers of two >= 16)."""
  return (hidden & -hidden) >= 16


def fused(residual, branch, bias, scale, offset, words, rate: float, eps: float, *,
          fork: bool = False, blocks=DEFAULT_BLOCKS, interpret: bool = False):
  """The Pallas kernel pair: the same function as `reference`, (batch, seq, hidden) in and out.

  `fork=True` returns the output twice, for two consumers (the next residual and the next
  branch): the backward kernel then reads their two gradients and adds them itself, instead of
  XLA adding them in a pass of its own.
  """
  if residual.shape != branch.shape or residual.dtype != branch.dtype:
    raise ValueError(f"residual {residual.shape} {residual.dtype} and branch {branch.shape} "
                     f"{branch.dtype} must match")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate} must be in [0, 1)")
  b, s, _ = residual.shape
  if words is None:
    rate = 0.0
  seeds = (jnp.zeros((b,), jnp.uint32) if rate == 0.0
           else index_seeds(words, jnp.arange(b, dtype=jnp.uint32)))
  largest = s & -s                       # largest power of two dividing seq
  blocks = (min(blocks[0], largest),) + tuple(blocks[1:])
  return _fused(residual, branch, bias, scale, offset, seeds, float(rate), float(eps),
                tuple(blocks), interpret, fork)
