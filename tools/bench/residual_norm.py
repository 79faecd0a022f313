"""LayerNorm(residual + dropout(branch + bias)), forward + backward, alone: the kernels against XLA.

  python -m tools.bench.residual_norm [--shapes=256x128x768,32x512x1024] \
      [--blocks="8,4,4;16,4,8"] [--json=FILE]

For each (batch x seq x hidden) shape, in bfloat16 with hidden dropout 0.1: the kernel pair
(`pretrain/residual_norm.py`) is first checked against the plain chain it replaces
(`residual_norm.reference`, same hashed masks) on the same inputs, output and every gradient; then
the median time of one forward + backward (all five gradients) over windows of back-to-back calls
(one device sync per window), for XLA's chain and the kernels at every block setting. GPU only.
"""

from __future__ import annotations

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pretrain.model import residual_norm
from tools.bench import kernel_timing

_SHAPES = flags.DEFINE_list("shapes", ["256x128x768", "128x128x1024", "32x512x1024"],
                            "batch x seq x hidden")
_BLOCKS = flags.DEFINE_string(
    "blocks", "8,4,4;4,4,4;16,4,4;16,8,8;32,8,8;2,4,4",
    "Kernel settings to time, ';'-separated: rows per program, forward warps, backward warps "
    "(pretrain.residual_norm.DEFAULT_BLOCKS first).")
_RATE = flags.DEFINE_float("rate", 0.1, "Hidden dropout.")
_WINDOWS = flags.DEFINE_integer("windows", 7, "Timing windows.")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls per window.")
_JSON = flags.DEFINE_string("json", None, "Also append the results to this JSON-lines file.")


def _time(fn, *args) -> float:
  return kernel_timing.median_seconds(fn, *args, windows=_WINDOWS.value, calls=_CALLS.value)


def _fwd_bwd(chain, rate):
  def loss(r, a, bias, scale, offset, words, dy):
    y = chain(r, a, bias, scale, offset, words, rate, 1e-12)
    return (y.astype(jnp.float32) * dy.astype(jnp.float32)).sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def main(argv):
  del argv
  rate = _RATE.value
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  rows = []
  for shape in _SHAPES.value:
    b, s, h = (int(x) for x in shape.split("x"))
    keys = jax.random.split(jax.random.key(0), 7)
    r, a, dy = (jax.random.normal(x, (b, s, h), jnp.bfloat16) for x in keys[:3])
    bias, offset = (0.1 * jax.random.normal(x, (h,)) for x in keys[3:5])
    scale = 1.0 + 0.1 * jax.random.normal(keys[5], (h,))
    words = jax.random.bits(keys[6], (2,), jnp.uint32)
    args = (r, a, bias, scale, offset, words, dy)
    ref = _fwd_bwd(residual_norm.reference, rate)
    ref_loss, ref_grads = ref(*args)
    rows.append(dict(shape=shape, path="xla chain", ms=_time(ref, *args) * 1e3))
    print(json.dumps(rows[-1]), flush=True)
    for blocks in _BLOCKS.value.split(";"):
      blk = tuple(int(x) for x in blocks.split(","))
      fn = _fwd_bwd(functools.partial(residual_norm.fused, blocks=blk), rate)
      loss, grads = fn(*args)
      err = [float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max() /
                   jnp.abs(w.astype(jnp.float32)).max()) for g, w in zip(grads, ref_grads)]
      rows.append(dict(shape=shape, path=f"kernel {blocks}", ms=_time(fn, *args) * 1e3,
                       loss=float(loss), ref_loss=float(ref_loss), grad_rel_err=err))
      print(json.dumps(rows[-1]), flush=True)
  kernel_timing.append_jsonl(_JSON.value, rows)


if __name__ == "__main__":
  app.run(main)
