"""Attention with probability dropout, forward + backward, alone: the fused kernel against XLA.

  python -m tools.bench.attention [--shapes=256x128x12x64,32x512x16x64] \
      [--blocks="64,64,64,4,4,3;..."] [--no_dropout_too] [--json=FILE]

For each (batch x seq x heads x head_dim) shape, in bfloat16 with dropout 0.1 and real padding
(lengths from seq/2 to seq), on the packed (batch, seq, 3, heads, head_dim) projection the model
hands over: first the kernel is checked against its jax.numpy twin
(`pretrain.attention.reference_attention`, same hashed masks) on the same inputs, output and
gradients; then the median time of one forward + backward over windows of back-to-back calls
(one device sync per window) for XLA's paths (the model's "reference" and "lean" dropout, threefry
masks; the hashed-mask twin) and the kernel at every block setting. GPU only.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pretrain.model import attention_kernel as attention
from pretrain.model.attention import SelfAttention
from tools.bench import kernel_timing

_SHAPES = flags.DEFINE_list("shapes", ["256x128x12x64", "128x128x16x64", "32x512x16x64"],
                            "batch x seq x heads x head_dim")
_BLOCKS = flags.DEFINE_string(
    "blocks", "64,64,64,4,4,3;64,64,64,4,4,2;128,64,64,8,4,2;64,128,64,4,4,2;64,64,128,4,8,2",
    "Kernel settings to time, ';'-separated: fwd block_q, fwd block_k, bwd block, fwd warps, "
    "bwd warps, pipeline stages (pretrain.model.attention_kernel.DEFAULT_BLOCKS first).")
_RATE = flags.DEFINE_float("rate", 0.1, "Attention dropout.")
_NO_DROPOUT_TOO = flags.DEFINE_bool(
    "no_dropout_too", False, "Also time the kernel at its first setting without dropout (no "
    "hash): what the masks cost.")
_WINDOWS = flags.DEFINE_integer("windows", 7, "Timing windows.")
_CALLS = flags.DEFINE_integer("calls", 10, "Calls per window.")
_JSON = flags.DEFINE_string("json", None, "Also append the results to this JSON-lines file.")


def _time(fn, *args) -> float:
  return kernel_timing.median_seconds(fn, *args, windows=_WINDOWS.value, calls=_CALLS.value)


def _xla_path(impl: str, rate: float):
  """The model's own explicit attention (`SelfAttention._attention_with_dropout`)."""
  holder = type("Holder", (), {})()         # the attributes the method reads
  holder.dropout_rate, holder.dropout_impl, holder.grad_dtype = rate, impl, "bfloat16"
  holder.dropout_rng = "threefry"
  method = SelfAttention._attention_with_dropout  # pylint: disable=protected-access
  return lambda qkv, lengths, key: method(holder, qkv, lengths, key)


def _fwd_bwd(f):
  def loss(qkv, lengths, key, g):
    return (f(qkv, lengths, key).astype(jnp.float32) * g).sum()
  return jax.jit(jax.value_and_grad(loss))


def main(argv):
  del argv
  rate = _RATE.value
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  rows = []
  for shape in _SHAPES.value:
    b, s, n, d = (int(x) for x in shape.split("x"))
    keys = jax.random.split(jax.random.key(0), 4)
    qkv = jax.random.normal(keys[0], (b, s, 3, n, d), jnp.bfloat16)    # the packed projection
    g = jax.random.normal(keys[1], (b, s, n, d), jnp.bfloat16)
    lengths = jax.random.randint(keys[2], (b,), s // 2, s + 1)
    key = keys[3]

    # correctness against the jax.numpy twin (same masks), float32 math on bf16 inputs
    twin = lambda qkv, lengths, key: attention.reference_attention(  # noqa: E731
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, attention.plane_seeds(key, b, n), rate)
    ref_loss, ref_grad = _fwd_bwd(twin)(qkv, lengths, key, g)
    for blocks in _BLOCKS.value.split(";"):
      blk = tuple(int(x) for x in blocks.split(","))
      kern = lambda qkv, lengths, key, blk=blk: attention.qkv_dropout_attention(  # noqa: E731
          qkv, lengths, key, rate, use_kernel=True, blocks=blk)
      fn = _fwd_bwd(kern)
      loss, grad = fn(qkv, lengths, key, g)
      err = [float(jnp.abs(grad[:, :, c].astype(jnp.float32) - ref_grad[:, :, c].astype(
          jnp.float32)).max() / jnp.abs(ref_grad[:, :, c].astype(jnp.float32)).max())
             for c in range(3)]
      rows.append(dict(shape=shape, path=f"kernel {blocks}", ms=_time(fn, qkv, lengths, key, g)
                       * 1e3, loss=float(loss), ref_loss=float(ref_loss), grad_rel_err=err))
      print(json.dumps(rows[-1]), flush=True)
    if _NO_DROPOUT_TOO.value:
      blk = tuple(int(x) for x in _BLOCKS.value.split(";")[0].split(","))
      fn = _fwd_bwd(lambda qkv, lengths, key: attention.qkv_dropout_attention(
          qkv, lengths, key, 0.0, use_kernel=True, blocks=blk))
      rows.append(dict(shape=shape, path=f"kernel {blk} without dropout",
                       ms=_time(fn, qkv, lengths, key, g) * 1e3))
      print(json.dumps(rows[-1]), flush=True)
    for name, f in [("xla reference (threefry)", _xla_path("reference", rate)),
                    ("xla lean (threefry)", _xla_path("lean", rate)),
                    ("xla hashed twin", twin)]:
      t = _time(_fwd_bwd(f), qkv, lengths, key, g)
      rows.append(dict(shape=shape, path=name, ms=t * 1e3))
      print(json.dumps(rows[-1]), flush=True)
  kernel_timing.append_jsonl(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
