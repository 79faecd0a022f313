r"""Times the jitted pretraining step after compilation and reports seq/s, tokens/s, TFLOP/s and MFU.

  python -m tools.benchmark --config=configs/pretrain.py:base \
      --config.train.global_batch_size=256 --config.data.max_seq_length=128 [--peer=torch]

Useful FLOPs per sequence (`pretrain.perf.flops_per_sequence`):
  6 x non-embedding encoder params x seq + 12 x layers x hidden x seq^2
  + 6 x (hidden^2 + hidden x vocab) x masked positions.
MFU is reported against the device's datasheet bf16 peak and against a bf16 matmul rate measured
here in the same run (`--matmul_size`), which is the ceiling a real step can approach.

The step runs on one synthetic batch already on the devices, so the figures are the step alone; the
input pipeline is not timed here. After compilation and `--warmup` steps, `--steps` steps are timed
in windows of `--window` steps dispatched back to back with one device synchronisation at the end
(as the training loop runs: it syncs only at log steps); the figure is the median window's mean.
`--window=1` syncs after every step instead, which also counts the host's dispatch of each step.

`--peer=torch` also runs transformers' BertForPreTraining on the same batch (tools/bench/torch_peer.py,
in a child process that compiles while ours compiles; the timed sections take turns under a file
lock) and prints ours, the peer's, their ratio and the matmul ceiling side by side.
`--profile_dir=DIR` also traces a few steps (jax.profiler) and prints where the device time goes.
tools/bench/sweep.py runs many configurations (and their peers) this way in one process.

Memory, per device (device 0), in GiB (`device_memory_fields`, `compiled_analysis`):
- `compiled_step_gib`: XLA's own buffer assignment for the step, arguments + outputs - outputs
  aliased onto donated arguments + temporaries (`compiled.memory_analysis()`): what XLA allocates for
  the step (the allocator may round up), known on every backend (the CPU too).
- `device_peak_gib`: the allocator's `peak_bytes_in_use` after the timed steps. jax cannot reset it,
  so it is the peak since the process started: compilation scratch (autotuning), the batch, the
  initial state and every earlier configuration of a sweep (the matmul ceiling runs after).
- `device_row_peak_gib`: that peak less what the device held when this configuration's turn began,
  i.e. what the step itself added (its state and buffers); null unless the process's peak rose during
  this configuration's turn (else its own peak is hidden under an earlier one).
All three device figures are null where `memory_stats()` is None (the CPU), with `device_memory_note`
saying so. The peer reports the same two figures from torch (`peak_mem_gib`, `peak_mem_row_gib`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from pretrain import console
from tools.bench.gpu_turns import gpu_lock, wait_for

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pretrain.py:base", "Pretraining config and variant.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up); the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_WINDOW = flags.DEFINE_integer("window", 5, "Steps dispatched between two device syncs.")
_MATMUL = flags.DEFINE_integer("matmul_size", 8192, "N for the NxNxN bf16 matmul ceiling; 0 skips.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
_PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time this peer on the same batch.")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Trace 3 steps here and summarise them.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ timing


def measure_matmul_tflops(n: int, repeats: int = 10) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(5):            # windows of back-to-back products: no per-call dispatch gap
    start = time.perf_counter()
    for _ in range(repeats):
      out = matmul(a, b)
    out.block_until_ready()
    times.append((time.perf_counter() - start) / repeats)
  return 2 * n ** 3 / statistics.median(times) / 1e12


@dataclasses.dataclass
class Prepared:
  """A configuration lowered (and, after `compile`, compiled) but not yet run."""
  name: str
  config: Any
  setup: Any
  mesh: Any
  batch: dict
  lowered: Any
  compiled: Any = None
  compile_s: float = 0.0


def prepare(config, name: str = "") -> Prepared:
  """Builds the train step of `config` and lowers it on abstract state (no device memory used)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pretrain import sharding, step  # pylint: disable=g-import-not-at-top
  from pretrain.data import loader  # pylint: disable=g-import-not-at-top

  if not config.data.path:
    config.data.source = "synthetic"       # the step alone: any valid batch will do
  mesh = sharding.make_mesh(config.mesh.shape)
  built = step.build(config, mesh)
  batch = loader.to_global(next(loader.make_source(config, split="train")), mesh)
  with jax.set_mesh(mesh):
    lowered = built.train_step.lower(built.setup.abstract_state, batch)
  return Prepared(name, config, built.setup, mesh, batch, lowered)


def compile_prepared(p: Prepared, xla_options: dict | None = None) -> Prepared:
  """Compiles the step, with XLA compile options if given (a sweep row's "xla" dict)."""
  start = time.perf_counter()
  p.compiled = p.lowered.compile(compiler_options=xla_options or None)
  p.compile_s = time.perf_counter() - start
  return p


def time_prepared(p: Prepared, steps: int, warmup: int, lock: str | None = None,
                  initial_state=None, window: int = 5) -> dict:
  """Runs `warmup` steps, then times `steps` steps in windows of `window`; returns the figures.

  `initial_state` (left untouched: the step gets a copy) saves re-initialising when several
  configurations share one parameter layout; by default `setup.init(config.seed)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pretrain import perf  # pylint: disable=g-import-not-at-top

  config = p.config
  with gpu_lock(lock), jax.set_mesh(p.mesh):
    memory_before = device_memory()
    if initial_state is None:
      state = p.setup.init(config.seed)
    else:
      state = jax.tree.map(jnp.copy, initial_state)
    state, metrics = p.compiled(state, p.batch)
    first_loss = float(metrics["loss"])        # the loss at the initial parameters
    for _ in range(warmup):
      state, metrics = p.compiled(state, p.batch)
    jax.block_until_ready(metrics)
    per_step = []
    for _ in range(max(1, steps // window)):
      start = time.perf_counter()
      for _ in range(window):
        state, metrics = p.compiled(state, p.batch)
      jax.block_until_ready(metrics)
      per_step.append((time.perf_counter() - start) / window)
    loss = float(metrics["loss"])
    memory_after = device_memory()
    del state

  step_s = statistics.median(per_step)
  b, s = config.train.global_batch_size, config.data.max_seq_length
  flops = perf.flops_per_sequence(p.setup.model_config, s, config.data.max_predictions_per_seq)
  n_dev = jax.device_count()
  m = config.model
  result = dict(
      name=p.name, device=jax.devices()[0].device_kind, num_devices=n_dev,
      platform=jax.default_backend(), variant=config.variant, global_batch=b, seq_len=s,
      masked_positions=config.data.max_predictions_per_seq, dtype=m.dtype,
      hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
      attention_impl=m.attention_impl, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
      dropout_rng=m.dropout_rng, attention_dropout_impl=m.attention_dropout_impl,
      logits_grad_dtype=m.logits_grad_dtype, mlm_gather=m.mlm_gather,
      residual_norm_impl=m.residual_norm_impl, speed_path=p.setup.speed_path.to_dict(),
      grad_accum_steps=config.train.grad_accum_steps,
      optimizer=config.optim.name, mesh=dict(p.mesh.shape), compile_s=p.compile_s,
      step_ms=step_s * 1e3, step_ms_min=min(per_step) * 1e3, step_ms_max=max(per_step) * 1e3,
      timed_steps=len(per_step) * window, window=window, seq_per_s=b / step_s, tokens_per_s=b * s / step_s,
      gflops_per_seq=flops / 1e9, tflops_per_device=b * flops / step_s / 1e12 / n_dev,
      first_loss=first_loss, loss=loss, jax_version=jax.__version__)
  peak = perf.peak_tflops(result["device"])
  if peak:
    result.update(peak_tflops=peak, mfu=result["tflops_per_device"] / peak)
  result.update(compiled_analysis(p.compiled))
  result.update(device_memory_fields(memory_before, memory_after))
  return result


def device_memory() -> dict | None:
  """Device 0's allocator statistics, or None where the backend keeps none (the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return stats if stats and "peak_bytes_in_use" in stats else None


def device_memory_fields(before: dict | None, after: dict | None) -> dict:
  """The measured device memory of one configuration's turn (see the module's docstring)."""
  if after is None:
    return dict(device_peak_gib=None, device_row_peak_gib=None, device_peak_in_row=None,
                device_in_use_before_gib=None, device_bytes_limit_gib=None,
                device_memory_note="memory_stats() is None on this backend: no device peak")
  peak = after["peak_bytes_in_use"]
  rose = before is not None and peak > before["peak_bytes_in_use"]
  return dict(device_peak_gib=peak / 2**30,
              device_row_peak_gib=(peak - before["bytes_in_use"]) / 2**30 if rose else None,
              device_peak_in_row=rose,
              device_in_use_before_gib=before["bytes_in_use"] / 2**30 if before else None,
              device_bytes_limit_gib=after.get("bytes_limit", 0) / 2**30 or None)


def compiled_analysis(compiled) -> dict:
  """Memory (GiB, per device) and XLA's own FLOP/byte counts of a compiled step."""
  out = {}
  try:
    memory = compiled.memory_analysis()
    if memory is not None:
      argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
      alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
      out.update(argument_gib=argument / 2**30, output_gib=output / 2**30,
                 alias_gib=alias / 2**30, temp_gib=temp / 2**30,
                 compiled_step_gib=(argument + output - alias + temp) / 2**30)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
      out.update(xla_tflops_per_step=float(cost.get("flops", 0.0)) / 1e12,
                 xla_gbytes_accessed=float(cost.get("bytes accessed", 0.0)) / 1e9)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


# ----------------------------------------------------------------------------------- profile


_CATEGORIES = (   # first match wins; names of kernels as the CUDA profiler records them
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|wgmma|sm90_|cublas|triton_gemm|_dot|gemv"),
    ("reduction", r"reduce|softmax|norm"),
    ("copy/transpose", r"copy|transpose|memcpy|memset|concatenate|dynamic.update"),
    ("elementwise/other fusions", r"fusion|loop|input|kernel"),
)


def trace_summary(logdir: str, steps: int, top: int = 40) -> dict:
  """Device time per kernel name from the perfetto trace jax.profiler wrote under `logdir`."""
  paths = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
           if f.endswith("perfetto_trace.json.gz") or f.endswith(".trace.json.gz")]
  if not paths:
    return dict(error=f"no trace file under {logdir}")
  with gzip.open(sorted(paths)[-1], "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items()
                 if re.search(r"gpu|device|stream", n, re.I) and not re.search(r"host|cpu", n, re.I)}
  per_name: dict[str, list[float]] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      per_name.setdefault(e.get("name", "?"), [0.0, 0])
      per_name[e["name"]][0] += float(e["dur"])
      per_name[e["name"]][1] += 1
  total = sum(v[0] for v in per_name.values())
  categories: dict[str, float] = {}
  for name, (dur, _) in per_name.items():
    cat = next((c for c, pat in _CATEGORIES if re.search(pat, name, re.I)), "other")
    categories[cat] = categories.get(cat, 0.0) + dur
  ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(
      device_processes=sorted(names[p] for p in device_pids),
      device_ms_per_step=total / 1e3 / steps,
      categories_ms_per_step={c: d / 1e3 / steps for c, d in
                              sorted(categories.items(), key=lambda kv: -kv[1])},
      top_kernels=[dict(name=n[:160], ms_per_step=d / 1e3 / steps, calls_per_step=c / steps)
                   for n, (d, c) in ranked])


def profile_prepared(p: Prepared, logdir: str, steps: int = 3, lock: str | None = None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  with gpu_lock(lock), jax.set_mesh(p.mesh):
    state = p.setup.init(p.config.seed)
    for _ in range(2):
      state, metrics = p.compiled(state, p.batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = p.compiled(state, p.batch)
      jax.block_until_ready(metrics)
    del state
  return trace_summary(logdir, steps)


# -------------------------------------------------------------------------------------- peer


def peer_overrides(config) -> dict:
  """tools/bench/torch_peer.py settings for the same model size, batch, sequence, masking, dropout."""
  m, d = config.model, config.data
  return dict(variant=config.variant, global_batch_size=config.train.global_batch_size,
              seq_len=d.max_seq_length, max_predictions=d.max_predictions_per_seq,
              hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
              vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
              seed=config.seed)


def peer_args(config) -> list[str]:
  return [f"--{k}={v}" for k, v in peer_overrides(config).items()]


def start_peer(args: list[str], json_path: str, lock: str, ready: str, other_ready: str,
               wait_s: float, log_path: str | None = None) -> subprocess.Popen:
  """Starts tools/bench/torch_peer.py in a child process (it never shares a process with jax)."""
  cmd = [sys.executable, "-m", "tools.bench.torch_peer", *args, f"--window={_WINDOW.value}", f"--json={json_path}",
         f"--lock={lock}", f"--ready={ready}", f"--other_ready={other_ready}",
         f"--wait_s={wait_s}"]
  out = open(log_path, "a", encoding="utf-8") if log_path else None   # pylint: disable=consider-using-with
  return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None)


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# -------------------------------------------------------------------------------------- main


def show(result: dict):
  width = max(map(len, result))
  for key, value in result.items():
    shown = f"{value:,.4g}" if isinstance(value, float) else value
    print(f"{key:<{width}}  {shown}")


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = os.path.abspath(os.path.dirname(_JSON.value) if _JSON.value else "/tmp/bench")
  os.makedirs(workdir, exist_ok=True)
  peer = None
  if _PEER.value == "torch":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")   # room for the peer
    paths = {k: os.path.join(workdir, f"peer.{k}") for k in ("json", "lock", "ready", "ours")}
    for path in paths.values():
      if os.path.exists(path):
        os.remove(path)
    peer = start_peer(peer_args(config), paths["json"], paths["lock"], paths["ready"],
                      paths["ours"], wait_s=300)
  lock = paths["lock"] if peer else None
  prepared = compile_prepared(prepare(config, config.variant))
  if peer:
    open(paths["ours"], "w", encoding="utf-8").close()
    wait_for(paths["ready"], 300)
  result = time_prepared(prepared, _STEPS.value, _WARMUP.value, lock, window=_WINDOW.value)
  if _MATMUL.value:
    with gpu_lock(lock):
      result["matmul_tflops"] = measure_matmul_tflops(_MATMUL.value)
    result["mfu_vs_matmul"] = result["tflops_per_device"] / result["matmul_tflops"]
  if _PROFILE.value:
    result["profile"] = profile_prepared(prepared, _PROFILE.value, lock=lock)
  if peer:
    peer.wait()
    runs = [r for r in read_jsonl(paths["json"]) if "seq_per_s" in r or "error" in r]
    if runs:
      result["peer"] = runs[0]
      if "seq_per_s" in runs[0]:
        result["peer_seq_per_s"] = runs[0]["seq_per_s"]
        result["ours_over_peer"] = result["seq_per_s"] / runs[0]["seq_per_s"]
        result["peer_peak_mem_gib"] = runs[0].get("peak_mem_gib")
        result["peer_peak_mem_row_gib"] = runs[0].get("peak_mem_row_gib")
  show({k: v for k, v in result.items() if k not in ("profile", "peer")})
  if "profile" in result:
    print(json.dumps(result["profile"], indent=1))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  console.exit_on_help(sys.argv, __doc__)
  app.run(main)
