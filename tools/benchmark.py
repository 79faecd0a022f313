"""Times the jitted pretraining step after compilation and reports seq/s, tokens/s, TFLOP/s and MFU.

  python -m tools.benchmark --config=configs/pretrain.py:base \
      --config.train.global_batch_size=256 --config.data.max_seq_length=128 [--steps=30]

Useful FLOPs per sequence (`pretrain.perf.flops_per_sequence`):
  6 x non-embedding encoder params x seq + 12 x layers x hidden x seq^2
  + 6 x (hidden^2 + hidden x vocab) x masked positions.
MFU is reported against the device's datasheet bf16 peak and against a bf16 matmul rate measured
here in the same run (`--matmul_size`), which is the ceiling a real step can approach.

The step runs on one synthetic batch already on the devices, so the figures are the step alone; the
input pipeline is not timed here.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py:base", "Pretraining config and variant.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up); median over windows.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_WINDOW = flags.DEFINE_integer("window", 5, "Steps dispatched between two device syncs.")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "N for the NxNxN bf16 matmul ceiling; 0 skips.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def measure_matmul_tflops(n: int, repeats: int = 10) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def benchmark(config, steps: int, warmup: int, window: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from pretrain import input as input_lib, perf, sharding, train  # pylint: disable=g-import-not-at-top

  if not config.data.path:
    config.data.source = "synthetic"       # the step alone: any valid batch will do
  mesh = sharding.make_mesh(config.mesh.shape)
  train.validate(config, mesh, jax.process_count())
  setup = train.make_setup(config, mesh)
  state = setup.init(config.seed)
  step_fn = train.make_train_step(setup, config.train.grad_accum_steps)
  batch = input_lib.to_global(next(train.make_source(config, split="train")), mesh)

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    per_step = []
    for _ in range(max(1, steps // window)):
      start = time.perf_counter()
      for _ in range(window):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      per_step.append((time.perf_counter() - start) / window)

  step_s = statistics.median(per_step)
  b, s = config.train.global_batch_size, config.data.max_seq_length
  flops = perf.flops_per_sequence(setup.model_config, s, config.data.max_predictions_per_seq)
  n_dev = jax.device_count()
  result = dict(
      device=jax.devices()[0].device_kind, num_devices=n_dev, platform=jax.default_backend(),
      variant=config.variant, global_batch=b, seq_len=s,
      masked_positions=config.data.max_predictions_per_seq, dtype=config.model.dtype,
      hidden_dropout=config.model.hidden_dropout, attention_dropout=config.model.attention_dropout,
      attention_impl=config.model.attention_impl, grad_accum_steps=config.train.grad_accum_steps,
      mesh=dict(mesh.shape), compile_s=compile_s, step_ms=step_s * 1e3,
      step_ms_min=min(per_step) * 1e3, step_ms_max=max(per_step) * 1e3,
      seq_per_s=b / step_s, tokens_per_s=b * s / step_s,
      gflops_per_seq=flops / 1e9, tflops_per_device=b * flops / step_s / 1e12 / n_dev,
      loss=float(metrics["loss"]), jax_version=jax.__version__)
  peak = perf.peak_tflops(result["device"])
  if peak:
    result.update(peak_tflops=peak, mfu=result["tflops_per_device"] / peak)
  memory = compiled.memory_analysis()
  if memory is not None:
    result.update(
        argument_gib=memory.argument_size_in_bytes / 2**30,
        output_gib=memory.output_size_in_bytes / 2**30,
        temp_gib=memory.temp_size_in_bytes / 2**30)
  return result


def main(argv):
  del argv
  result = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _WINDOW.value)
  if _MATMUL.value:
    result["matmul_tflops"] = measure_matmul_tflops(_MATMUL.value)
    result["mfu_vs_matmul"] = result["tflops_per_device"] / result["matmul_tflops"]
  width = max(map(len, result))
  for key, value in result.items():
    shown = f"{value:,.4g}" if isinstance(value, float) else value
    print(f"{key:<{width}}  {shown}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
