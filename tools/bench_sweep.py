"""Many train-step configurations and their PyTorch peers, measured side by side in one run.

  python -m tools.bench_sweep --plan=issue6 --out=DIR [--only=NAME,...] [--no_peer]

For a device lease: everything is lowered first, compiled concurrently (`--compile_threads`) while
the peer (tools/bench_torch.py, a child process) compiles its models; then every configuration is
timed one at a time (the peer takes turns under a file lock), most important first, each result
appended to DIR/results.jsonl as soon as it exists, so a run cut short still leaves its figures.
Then the matmul ceiling, the profiles of `--profile` configurations (DIR/profiles.json), their
optimised HLO (DIR/hlo_NAME.txt.gz), and a table: ours / peer / ratio / MFU.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import shutil
import time
import traceback

from absl import app
from absl import flags

from tools import benchmark
from tools import gpu_turns

_PLAN = flags.DEFINE_string("plan", "issue6", "Which plan (PLANS below).")
_OUT = flags.DEFINE_string("out", "/tmp/bench_sweep", "Output directory.")
_ONLY = flags.DEFINE_list("only", None, "Run only these configuration names.")
_NO_PEER = flags.DEFINE_bool("no_peer", False, "Skip the PyTorch peer.")
_STEPS = benchmark._STEPS     # --steps, --warmup: shared with tools/benchmark.py  pylint: disable=protected-access
_WARMUP = benchmark._WARMUP   # pylint: disable=protected-access
_THREADS = flags.DEFINE_integer("compile_threads", 6, "Concurrent XLA compilations.")
_PROFILE = flags.DEFINE_list("profile", None, "Profile these names (default: the plan's).")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", True, "torch.compile the peer (off: eager).")
_PEER_PROCS = flags.DEFINE_integer("peer_procs", 2, "Peer processes compiling side by side.")
_DEADLINE = flags.DEFINE_float("deadline_s", 1e9, "Skip what is left after this many seconds.")
_WAIT = flags.DEFINE_float("peer_wait_s", 240, "Longest wait for the other side's compilation.")

# The rows' shapes, on the "plain" path: XLA's explicit attention, threefry dropout masks, the
# take_along_axis MLM gather and XLA's LayerNorm chain (every speed switch off but the GELU's erf
# form).
PLAIN = {"model.attention_dropout_impl": "reference", "model.dropout_rng": "threefry",
         "model.mlm_gather": "take", "model.residual_norm_impl": "xla"}
BASE128 = {"variant": "base", "train.global_batch_size": 256, "data.max_seq_length": 128,
           "data.max_predictions_per_seq": 20, **PLAIN}
LARGE128 = {"variant": "large", "train.global_batch_size": 128, "data.max_seq_length": 128,
            "data.max_predictions_per_seq": 20, **PLAIN}
LARGE512 = {"variant": "large", "train.global_batch_size": 32, "data.max_seq_length": 512,
            "data.max_predictions_per_seq": 76, **PLAIN}
TINY32 = {"variant": "tiny", "train.global_batch_size": 8, "data.max_seq_length": 32,
          "data.max_predictions_per_seq": 5, **PLAIN}
NO_DROPOUT = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
FAST_BWD = {"model.logits_grad_dtype": "bfloat16", "model.attention_dropout_impl": "lean"}
FAST = {**FAST_BWD, "model.dropout_rng": "rbg"}
# The model's defaults (the fused attention kernel, hashed hidden dropout, one-hot MLM gather, the
# residual + dropout + LayerNorm kernels), stated over the plain shapes, plus bf16 gradients into
# the MLM decoder's backward GEMMs.
FUSED = {"model.attention_dropout_impl": "fused", "model.dropout_rng": "hash",
         "model.mlm_gather": "one_hot", "model.residual_norm_impl": "fused",
         "model.logits_grad_dtype": "bfloat16"}
# the defaults of 2026-11-26 afternoon: XLA's LayerNorm chain, q/k/v sliced before the kernel
AFTERNOON = {**FUSED, "model.residual_norm_impl": "xla", "hook": "separate_qkv"}

# name -> overrides of configs/pretrain.py:VARIANT; listed in the order they are timed.
PLANS = {
    "issue6": {
        "base128_d11_plain": {**BASE128},
        "base128_d11_fast": {**BASE128, **FAST},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "base128_d00_cudnn_fast": {**BASE128, **NO_DROPOUT, **FAST,
                                   "model.attention_impl": "cudnn"},
        "large128_d11_plain": {**LARGE128},
        "large128_d11_fast": {**LARGE128, **FAST},
        "large512_d11_plain": {**LARGE512},
        "large512_d11_fast": {**LARGE512, **FAST},
        "base128_d11_fastbwd_threefry": {**BASE128, **FAST_BWD},
        "base128_d00_cudnn_scan": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn",
                                   "model.scan_layers": True},
        # What cuDNN's fused attention with dropout would give (experiment only, see _HOOKS).
        "base128_d11_cudnn_dropout_expt": {**BASE128, **FAST, "model.attention_impl": "cudnn",
                                           "hook": "cudnn_private_dropout"},
        "large512_d11_cudnn_dropout_expt": {**LARGE512, **FAST, "model.attention_impl": "cudnn",
                                            "hook": "cudnn_private_dropout"},
    },
    # the rows of docs/benchmarks.md: each row with the fused attention kernel and plain
    "table": {
        "base128_d11_fused": {**BASE128, **FUSED},
        "base128_d11_plain": {**BASE128},
        "base128_d00_cudnn_fused": {**BASE128, **NO_DROPOUT, **FUSED,
                                    "model.attention_impl": "cudnn"},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "large128_d11_fused": {**LARGE128, **FUSED},
        "large128_d11_plain": {**LARGE128},
        "large512_d11_fused": {**LARGE512, **FUSED},
        "large512_d11_plain": {**LARGE512},
        "base128_d11_fused_twin": {**BASE128, **FUSED, "hook": "fused_twin"},
        # 0 / 0 with the attention kernel at rate 0 (model.attention_impl=fused) instead of cuDNN
        "base128_d00_kernel_fused": {**BASE128, **NO_DROPOUT, **FUSED,
                                     "model.attention_impl": "fused"},
    },
    # the table of 2026-11-22 (before the fused kernel): plain and the fast backward (threefry)
    "table_1122": {
        "base128_d11_plain": {**BASE128},
        "base128_d11_fastbwd": {**BASE128, **FAST_BWD},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "large128_d11_plain": {**LARGE128},
        "large128_d11_fastbwd": {**LARGE128, **FAST_BWD},
        "large512_d11_plain": {**LARGE512},
        "large512_d11_fastbwd": {**LARGE512, **FAST_BWD},
    },
    # cuDNN fused attention with dropout through jax's private module: its own process, because
    # XLA 0.11.2 aborts (cuda_dnn.cc "local_device_ordinal") when the dropout graph is put in a
    # command buffer; run it with XLA_FLAGS=--xla_gpu_enable_command_buffer= (baseline included).
    "cudnn_dropout_expt": {
        "base128_d11_fastbwd_nocmdbuf": {**BASE128, **FAST_BWD},
        "base128_d11_cudnn_dropout_expt": {**BASE128, **FAST_BWD, "model.attention_impl": "cudnn",
                                           "hook": "cudnn_private_dropout"},
        "large512_d11_fastbwd_nocmdbuf": {**LARGE512, **FAST_BWD},
        "large512_d11_cudnn_dropout_expt": {**LARGE512, **FAST_BWD, "model.attention_impl": "cudnn",
                                            "hook": "cudnn_private_dropout"},
    },
    # is the MLM gather's scatter what puts activations in a batch-minor layout? (docs/benchmarks.md)
    "gather_check": {
        "base128_d11_plain": {**BASE128},
        "base128_d11_onehot": {**BASE128, "model.mlm_gather": "one_hot"},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "base128_d00_cudnn_onehot": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn",
                                     "model.mlm_gather": "one_hot"},
    },
    # the Pallas attention kernel with hashed dropout (pretrain/attention.py) against the table's
    # paths; "_twin" runs the same model with the kernel's jax.numpy twin (same masks)
    "fused": {
        "base128_d11_fused": {**BASE128, **FUSED},
        "base128_d11_fused_twin": {**BASE128, **FUSED, "hook": "fused_twin"},
        "base128_d11_fastbwd": {**BASE128, **FAST_BWD},
        "base128_d11_plain": {**BASE128},
        "base128_d00_cudnn_plain": {**BASE128, **NO_DROPOUT, "model.attention_impl": "cudnn"},
        "large128_d11_fused": {**LARGE128, **FUSED},
        "large128_d11_fastbwd": {**LARGE128, **FAST_BWD},
        "large128_d11_plain": {**LARGE128},
        "large512_d11_fused": {**LARGE512, **FUSED},
        "large512_d11_fused_twin": {**LARGE512, **FUSED, "hook": "fused_twin"},
        "large512_d11_fastbwd": {**LARGE512, **FAST_BWD},
        "large512_d11_plain": {**LARGE512},
    },
    # 2026-11-26 afternoon, one change at a time from the morning's code (a hook puts back the
    # erfc GELU): hashed hidden dropout, erf GELU, one-hot MLM gather (= that afternoon's defaults)
    "levers": {
        "base128_d11_before": {**BASE128, **AFTERNOON, "model.dropout_rng": "threefry",
                               "model.mlm_gather": "take", "hook": "erfc_gelu+separate_qkv"},
        "base128_d11_hash": {**BASE128, **AFTERNOON, "model.mlm_gather": "take",
                             "hook": "erfc_gelu+separate_qkv"},
        "base128_d11_hash_erf": {**BASE128, **AFTERNOON, "model.mlm_gather": "take"},
        "base128_d11_default": {**BASE128, **AFTERNOON},
        "large512_d11_before": {**LARGE512, **AFTERNOON, "model.dropout_rng": "threefry",
                                "model.mlm_gather": "take", "hook": "erfc_gelu+separate_qkv"},
        "large512_d11_default": {**LARGE512, **AFTERNOON},
    },
    # 2026-11-26 evening, one change at a time from the afternoon's defaults: the packed QKV
    # read by the attention kernel, then the residual + dropout + LayerNorm kernels, first with
    # XLA adding the two gradients of each output ("no_fork"), then adding them itself (= the
    # defaults)
    "kernels": {
        "base128_d11_before": {**BASE128, **AFTERNOON},
        "base128_d11_packed": {**BASE128, **FUSED, "model.residual_norm_impl": "xla"},
        "base128_d11_no_fork": {**BASE128, **FUSED, "hook": "no_fork"},
        "base128_d11_default": {**BASE128, **FUSED},
        "base128_d11_resnorm_only": {**BASE128, **FUSED, "hook": "separate_qkv"},
        "large512_d11_before": {**LARGE512, **AFTERNOON},
        "large512_d11_default": {**LARGE512, **FUSED},
        "large512_d11_no_fork": {**LARGE512, **FUSED, "hook": "no_fork"},
        "large128_d11_before": {**LARGE128, **AFTERNOON},
        "large128_d11_default": {**LARGE128, **FUSED},
        "base128_d00_cudnn_before": {**BASE128, **NO_DROPOUT, **AFTERNOON,
                                     "model.attention_impl": "cudnn"},
        "base128_d00_cudnn_default": {**BASE128, **NO_DROPOUT, **FUSED,
                                      "model.attention_impl": "cudnn"},
        # without dropout: the packed kernel at rate 0 instead of cuDNN on sliced q, k, v
        "base128_d00_kernel": {**BASE128, **NO_DROPOUT, **FUSED, "model.attention_impl": "fused"},
        "base128_d00_auto": {**BASE128, **NO_DROPOUT, **FUSED},
    },
    "smoke": {   # a CPU check of the machinery (tiny model, seconds)
        "tiny_plain": {**TINY32},
        "tiny_fast": {**TINY32, **FAST},
        "tiny_fastbwd": {**TINY32, **FAST_BWD},
        "tiny_fused_twin": {**TINY32, **FUSED, "hook": "fused_twin"},
        "tiny_before": {**TINY32, **FUSED, "hook": "erfc_gelu"},
        "tiny_afternoon": {**TINY32, **AFTERNOON},
        "tiny_no_fork": {**TINY32, **FUSED, "hook": "no_fork"},
    },
}
PEERS = {   # the peer runs once per (model, batch, sequence, dropout)
    "table_1122": ["base128_d11_plain", "base128_d00_cudnn_plain", "large128_d11_plain",
                   "large512_d11_plain"],
    "fused": ["base128_d11_plain", "base128_d00_cudnn_plain", "large128_d11_plain",
              "large512_d11_plain"],
    "table": ["base128_d11_plain", "base128_d00_cudnn_plain", "large128_d11_plain",
              "large512_d11_plain"],
    "smoke": ["tiny_plain"],
    "issue6": ["base128_d11_plain", "base128_d00_cudnn_plain", "large128_d11_plain",
               "large512_d11_plain"],
}
PROFILES = {"gather_check": ["base128_d11_onehot"],
            "table_1122": ["base128_d11_plain", "base128_d00_cudnn_plain", "base128_d11_fastbwd"],
            "fused": ["base128_d11_fused", "base128_d00_cudnn_plain", "large512_d11_fused",
                      "large128_d11_fused"],
            "table": ["large512_d11_fused", "base128_d11_fused"],
            "issue6": ["base128_d00_cudnn_plain", "base128_d11_plain", "base128_d11_fast"],
            "levers": ["base128_d11_default", "large512_d11_default"],
            "kernels": ["base128_d11_default", "large512_d11_default"],
            "smoke": ["tiny_fast"]}
# pairs whose loss at the same initial parameters, batch and key must be equal (same masks)
SAME_LOSS = {"fused": [("base128_d11_fused", "base128_d11_fused_twin"),
                       ("large512_d11_fused", "large512_d11_fused_twin"),
                       ("base128_d11_plain", "base128_d11_fastbwd")],
             "gather_check": [("base128_d11_plain", "base128_d11_onehot"),
                              ("base128_d00_cudnn_plain", "base128_d00_cudnn_onehot")],
             "issue6": [("base128_d00_cudnn_plain", "base128_d00_cudnn_fast"),
                        ("base128_d11_plain", "base128_d11_fastbwd_threefry")],
             "table": [("base128_d11_fused", "base128_d11_fused_twin")],
             "kernels": [("base128_d11_before", "base128_d11_default"),
                         ("large512_d11_before", "large512_d11_default"),
                         ("base128_d00_cudnn_before", "base128_d00_cudnn_default")],
             "table_1122": [("base128_d11_plain", "base128_d11_fastbwd"),
                       ("large128_d11_plain", "large128_d11_fastbwd"),
                       ("large512_d11_plain", "large512_d11_fastbwd")],
             "smoke": [("tiny_plain", "tiny_fastbwd")]}


def _cudnn_private_dropout(self, qkv, lengths, key):
  """Attention-probability dropout inside cuDNN's fused kernel, through jax's private cuDNN module.

  An EXPERIMENT to size what the fused path would give; the model never does this: the module is
  private (`jax._src`), and its dropout seed is a compile-time constant, not our PRNG key (XLA
  advances an offset per execution), so masks cannot be reproduced from the run's seed.
  """
  del key
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  q, k, v = (qkv[:, :, c] for c in range(3))
  return fa.dot_product_attention(
      q, k, v, q_seqlen=lengths, kv_seqlen=lengths, scale=q.shape[-1] ** -0.5,
      mask_type=fa.MaskType.PADDING, dropout_rate=self.dropout_rate, qkv_layout="BTNH")


def _erfc_gelu(name):
  """layers.activation as it was before 2026-11-26: jax.nn.gelu's erfc form for "gelu"."""
  import jax  # pylint: disable=g-import-not-at-top
  from pretrain import layers  # pylint: disable=g-import-not-at-top
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  return layers.activation(name)


def _separate_qkv(qkv, *args, **kwargs):
  """The attention kernel as on 2026-11-26 afternoon: q, k, v sliced (copied) out of the
  projection."""
  from pretrain import attention  # pylint: disable=g-import-not-at-top
  return attention.dropout_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kwargs)


def _hooks():
  """name -> (object, attribute, replacement) patched while a configuration is traced."""
  from pretrain import attention, model, residual_norm  # pylint: disable=g-import-not-at-top
  from pretrain.model import SelfAttention  # pylint: disable=g-import-not-at-top
  kernel_path = attention.qkv_dropout_attention
  twin = lambda *args, **kw: kernel_path(*args, **{**kw, "use_kernel": False})  # noqa: E731
  norm_kernels = residual_norm.fused

  def no_fork(*args, fork=False, **kwargs):
    """The residual-norm kernels with one output: XLA adds its two consumers' gradients."""
    y = norm_kernels(*args, **kwargs)
    return (y, y) if fork else y

  return {"cudnn_private_dropout": (SelfAttention, "_attention_with_dropout",
                                    _cudnn_private_dropout),
          "fused_twin": (attention, "qkv_dropout_attention", twin),
          "erfc_gelu": (model, "activation", _erfc_gelu),
          "separate_qkv": (attention, "qkv_dropout_attention", _separate_qkv),
          "no_fork": (residual_norm, "fused", no_fork)}


def prepare_with_hook(name: str, overrides: dict):
  """benchmark.prepare, with the model patched while tracing by the hooks the overrides name
  ("hook": "a" or "a+b")."""
  overrides = dict(overrides)
  hooks = [_hooks()[h] for h in overrides.pop("hook", "").split("+") if h]
  originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in hooks]
  for obj, attr, fn in hooks:
    setattr(obj, attr, fn)
  try:
    return benchmark.prepare(make_config(overrides), name)
  finally:
    for obj, attr, fn in reversed(originals):
      setattr(obj, attr, fn)


def _same_shape(a: dict, b: dict) -> bool:
  """Same model, batch, sequence, masked positions and dropout: the peer's row."""
  keys = ("variant", "train.global_batch_size", "data.max_seq_length",
          "data.max_predictions_per_seq", "model.hidden_dropout", "model.attention_dropout")
  return all(a.get(k) == b.get(k) for k in keys)


def make_config(overrides: dict):
  from configs.pretrain import get_config  # pylint: disable=g-import-not-at-top
  overrides = dict(overrides)
  overrides.pop("hook", None)
  config = get_config(overrides.pop("variant"))
  config.data.source = "synthetic"
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def log(out: str, record: dict):
  print(json.dumps(record), flush=True)
  with open(os.path.join(out, "results.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  plan = {k: v for k, v in PLANS[_PLAN.value].items() if not _ONLY.value or k in _ONLY.value}
  t0 = time.time()
  sync_dir = os.path.join("/tmp", f"bench_sync_{os.getpid()}")   # lock and ready files
  os.makedirs(sync_dir, exist_ok=True)
  lock, ours_ready = os.path.join(sync_dir, "lock"), os.path.join(sync_dir, "ours")
  peers, peer_ready_files = [], []
  full_plan = PLANS[_PLAN.value]      # peers run for the plan's rows even when --only skips them
  peer_names = [n for n in PEERS.get(_PLAN.value, []) if n in full_plan and not _NO_PEER.value
                and any(_same_shape(full_plan[n], plan[m]) for m in plan)]
  if peer_names:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    n_procs = max(1, min(_PEER_PROCS.value, len(peer_names)))
    for i in range(n_procs):        # each child compiles its share of the peer models in turn
      names = peer_names[i::n_procs]
      runs = [benchmark.peer_overrides(make_config(full_plan[name])) for name in names]
      ready = os.path.join(sync_dir, f"peer{i}")
      peer_ready_files.append(ready)
      peers.append(benchmark.start_peer(
          benchmark.peer_args(make_config(full_plan[names[0]]))
          + [f"--runs={json.dumps(runs)}", f"--steps={_STEPS.value}",
             f"--compile={int(_PEER_COMPILE.value)}"],
          os.path.join(out, "results.jsonl"), lock, ready, ours_ready, wait_s=_WAIT.value,
          log_path=os.path.join(out, "peer_log.txt")))
  if not peers:
    lock = None

  import jax  # pylint: disable=g-import-not-at-top  (after XLA_PYTHON_CLIENT_MEM_FRACTION)
  log(out, dict(event="start", device=jax.devices()[0].device_kind, jax=jax.__version__,
                devices=jax.device_count(), plan=_PLAN.value, names=list(plan)))
  prepared = {}
  for name, overrides in plan.items():            # tracing and lowering: one at a time
    try:
      prepared[name] = prepare_with_hook(name, overrides)
    except Exception as e:  # pylint: disable=broad-except
      log(out, dict(name=name, stage="lower", error=f"{type(e).__name__}: {e}"[:3000]))
  log(out, dict(event="lowered", seconds=time.time() - t0))
  with concurrent.futures.ThreadPoolExecutor(_THREADS.value) as pool:   # XLA compiles in parallel
    futures = {pool.submit(benchmark.compile_prepared, p): n for n, p in prepared.items()}
    for future in concurrent.futures.as_completed(futures):
      name = futures[future]
      try:
        future.result()
        log(out, dict(event="compiled", name=name, compile_s=prepared[name].compile_s))
      except Exception as e:  # pylint: disable=broad-except
        log(out, dict(name=name, stage="compile", error=f"{type(e).__name__}: {e}"[:3000]))
        prepared.pop(name)
  open(ours_ready, "w", encoding="utf-8").close()
  deadline = t0 + _WAIT.value
  peer_ready = all(gpu_turns.wait_for(f, max(1.0, deadline - time.time()))
                   for f in peer_ready_files)
  log(out, dict(event="timing", seconds=time.time() - t0, peer_ready=peer_ready))

  results, initial_states = {}, {}
  for name, p in prepared.items():
    if time.time() - t0 > _DEADLINE.value:
      log(out, dict(name=name, stage="time", error="skipped: --deadline_s reached"))
      continue
    try:
      layout = (p.config.variant, p.config.model.scan_layers)   # same params, same optimizer
      if layout not in initial_states:
        with jax.set_mesh(p.mesh):
          initial_states[layout] = p.setup.init(p.config.seed)
      results[name] = benchmark.time_prepared(p, _STEPS.value, _WARMUP.value, lock,
                                              initial_states[layout], benchmark._WINDOW.value)  # pylint: disable=protected-access
      results[name]["peer_still_compiling"] = not peer_ready
      log(out, results[name])
    except Exception as e:  # pylint: disable=broad-except
      log(out, dict(name=name, stage="time", error=f"{type(e).__name__}: {e}"[:3000]))
  with gpu_turns.gpu_lock(lock):
    log(out, dict(event="matmul", matmul_tflops=benchmark.measure_matmul_tflops(8192)))
  for a, b in SAME_LOSS.get(_PLAN.value, []):
    if a in results and b in results:
      la, lb = results[a]["first_loss"], results[b]["first_loss"]
      log(out, dict(event="same_loss", a=a, b=b, loss_a=la, loss_b=lb, abs_diff=abs(la - lb)))

  profiles = {}
  for i, name in enumerate(_PROFILE.value or PROFILES.get(_PLAN.value, [])):
    if name not in prepared or time.time() - t0 > _DEADLINE.value:
      continue
    try:
      profiles[name] = benchmark.profile_prepared(prepared[name], os.path.join("/tmp/prof", name),
                                                  lock=lock)
      with open(os.path.join(out, "profiles.json"), "w", encoding="utf-8") as f:
        json.dump(profiles, f, indent=1)
      if i < 2:
        with gzip.open(os.path.join(out, f"hlo_{name}.txt.gz"), "wt", encoding="utf-8") as f:
          f.write(prepared[name].compiled.as_text())
      if not os.path.exists(os.path.join(out, "trace.json.gz")):   # one raw trace comes back
        traces = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join("/tmp/prof", name))
                  for f in fs if f.endswith("perfetto_trace.json.gz")]
        if traces and os.path.getsize(traces[0]) < 15 * 2**20:
          shutil.copy(traces[0], os.path.join(out, "trace.json.gz"))
      log(out, dict(event="profiled", name=name, seconds=time.time() - t0,
                    categories=profiles[name].get("categories_ms_per_step"),
                    device_ms_per_step=profiles[name].get("device_ms_per_step")))
    except Exception:  # pylint: disable=broad-except
      log(out, dict(name=name, stage="profile", error=traceback.format_exc()[-3000:]))

  initial_states.clear()
  for peer in peers:
    try:
      peer.wait(timeout=max(5.0, _DEADLINE.value + 30 - (time.time() - t0)))
    except Exception:  # pylint: disable=broad-except
      peer.kill()
  table(out)


def table(out: str):
  """ours / peer / ratio / MFU, from results.jsonl."""
  records = benchmark.read_jsonl(os.path.join(out, "results.jsonl"))
  matmul = next((r["matmul_tflops"] for r in records if "matmul_tflops" in r), None)
  peers = {(r["variant"], r["global_batch"], r["seq_len"], r["hidden_dropout"],
            r["attention_dropout"]): r for r in records if r.get("peer") == "torch"
           and "seq_per_s" in r}
  print(f"\ndevice: {next((r['device'] for r in records if 'device' in r), '?')}, "
        f"bf16 matmul {matmul and round(matmul)} TFLOP/s")
  print(f"{'name':34} {'ms':>7} {'seq/s':>8} {'MFU':>6} {'MFU/mm':>6} {'peer':>7} {'ratio':>6}")
  for r in records:
    if "seq_per_s" not in r or r.get("peer"):
      continue
    key = (r["variant"], r["global_batch"], r["seq_len"], r["hidden_dropout"],
           r["attention_dropout"])
    peer = peers.get(key, {}).get("seq_per_s")
    mm = r["tflops_per_device"] / matmul if matmul else float("nan")
    print(f"{r['name']:34} {r['step_ms']:7.2f} {r['seq_per_s']:8.0f} {r.get('mfu', 0):6.1%} "
          f"{mm:6.1%} {peer or float('nan'):7.0f} {r['seq_per_s'] / peer if peer else float('nan'):6.2f}")
  for key, r in peers.items():
    print(f"peer {key}: {r['seq_per_s']:.0f} seq/s, {r['step_ms']:.2f} ms, compile {r['compile_s']:.0f} s")


if __name__ == "__main__":
  app.run(main)
