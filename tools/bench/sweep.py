"""Many train-step configurations and their PyTorch peers, measured side by side in one run.

  python -m tools.bench.sweep --plan=table --out=DIR [--only=NAME,...] [--no_peer]

For a device lease: everything is lowered first, compiled concurrently (`--compile_threads`) while
the peer (tools/bench/torch_peer.py, a child process) compiles its models; then every configuration is
timed one at a time (the peer takes turns under a file lock), most important first, each result
appended to DIR/results.jsonl as soon as it exists, so a run cut short still leaves its figures.
Then the matmul ceiling, the profiles of `--profile` configurations (DIR/profiles.json), their
optimised HLO (DIR/hlo_NAME.txt.gz), and a table: ours / peer / ratio / MFU, and each multi-device
row's seq/s as a share of N x the one-device row of the same per-device batch (run the plan once
under CUDA_VISIBLE_DEVICES=0 into the same DIR first: rows whose mesh needs another number of
devices are skipped). A row's "xla" dict is passed to XLA as compile options (plans.py).
`--dry_run` lists the plan's rows and checks their XLA option names against this jaxlib, then exits.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import math
import os
import shutil
import time
import traceback

from absl import app
from absl import flags

from tools import benchmark
from tools.bench import gpu_turns
from tools.bench.plans import PEERS, PLANS, PROFILES, SAME_LOSS

_PLAN = flags.DEFINE_enum("plan", "table", list(PLANS), "Which plan (tools/bench/plans.py).")
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
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the plan's rows and check their XLA option "
                             "names on this machine's jaxlib; compile and time nothing.")


def _same_shape(a: dict, b: dict) -> bool:
  """Same model, batch, sequence, masked positions and dropout: the peer's row."""
  keys = ("variant", "train.global_batch_size", "data.max_seq_length",
          "data.max_predictions_per_seq", "model.hidden_dropout", "model.attention_dropout")
  return all(a.get(k) == b.get(k) for k in keys)


def make_config(overrides: dict):
  from configs.pretrain import get_config  # pylint: disable=g-import-not-at-top
  overrides = dict(overrides)
  overrides.pop("xla", None)                       # compile options, not config keys
  config = get_config(overrides.pop("variant"))
  config.data.source = "synthetic"
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def mesh_devices(config) -> int | None:
  """How many devices the row's mesh needs; None when one axis is -1 (it takes them all)."""
  shape = tuple(config.mesh.shape)
  return None if -1 in shape else math.prod(shape)


def dry_run(plan_name: str, plan: dict):
  """Prints the rows; an XLA option this jaxlib does not know is an error naming it."""
  import jax  # pylint: disable=g-import-not-at-top
  for name, overrides in plan.items():
    config = make_config(overrides)
    rest = {k: v for k, v in overrides.items() if k not in ("variant", "xla")}
    print(f"{name:30} devices {mesh_devices(config) or 'all'}  {config.variant} {rest}  "
          f"xla {overrides.get('xla') or '-'}")
  print(f"peers {PEERS.get(plan_name, [])}  profiles {PROFILES.get(plan_name, [])}  "
        f"same loss {SAME_LOSS.get(plan_name, [])}")
  lowered = jax.jit(lambda x: x + 1).lower(1.0)
  for name, overrides in plan.items():
    for option, value in overrides.get("xla", {}).items():
      try:
        lowered.compile(compiler_options={option: value})
      except Exception as e:  # pylint: disable=broad-except
        raise SystemExit(f"plan {plan_name!r} row {name!r}: XLA option {option}={value!r} refused "
                         f"by jaxlib {jax.__version__}: {e}") from e
  print(f"every XLA option is known to jaxlib {jax.__version__} ({jax.default_backend()})")


def log(out: str, record: dict):
  print(json.dumps(record), flush=True)
  with open(os.path.join(out, "results.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  plan = {k: v for k, v in PLANS[_PLAN.value].items() if not _ONLY.value or k in _ONLY.value}
  if _DRY_RUN.value:
    dry_run(_PLAN.value, plan)
    return
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
      config = make_config(overrides)
      if mesh_devices(config) not in (None, jax.device_count()):
        log(out, dict(event="skipped", name=name, reason=f"mesh {tuple(config.mesh.shape)} needs "
                      f"{mesh_devices(config)} devices, this process has {jax.device_count()}"))
        continue
      prepared[name] = benchmark.prepare(config, name)
    except Exception as e:  # pylint: disable=broad-except
      log(out, dict(name=name, stage="lower", error=f"{type(e).__name__}: {e}"[:3000]))
  log(out, dict(event="lowered", seconds=time.time() - t0))
  with concurrent.futures.ThreadPoolExecutor(_THREADS.value) as pool:   # XLA compiles in parallel
    futures = {pool.submit(benchmark.compile_prepared, p, plan[n].get("xla")): n
               for n, p in prepared.items()}
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
      layout = (p.config.variant, p.config.model.scan_layers,   # same params, same optimizer,
                tuple(p.mesh.shape.items()))                    # same shardings
      if layout not in initial_states:
        with jax.set_mesh(p.mesh):
          initial_states[layout] = p.setup.init(p.config.seed)
      results[name] = benchmark.time_prepared(p, _STEPS.value, _WARMUP.value, lock,
                                              initial_states[layout], benchmark._WINDOW.value)  # pylint: disable=protected-access
      results[name]["peer_still_compiling"] = not peer_ready
      results[name]["xla_options"] = plan[name].get("xla", {})
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
  scaling(out)


def scaling(out: str):
  """Each multi-device row's seq/s against N x the one-device rows without XLA options."""
  records = [r for r in benchmark.read_jsonl(os.path.join(out, "results.jsonl"))
             if "seq_per_s" in r and not r.get("peer")]
  one = {}
  for r in records:
    if r["num_devices"] == 1 and not r.get("xla_options"):
      one.setdefault((r["variant"], r["seq_len"], r["global_batch"], r["scan_layers"]), r)
  for r in records:
    n = r["num_devices"]
    if n == 1:
      continue
    shares = []
    for scan in (False, True):    # against the unscanned (default) one-device row, and the scanned
      base = one.get((r["variant"], r["seq_len"], r["global_batch"] // n, scan))
      if base:
        shares.append(f"{r['seq_per_s'] / (n * base['seq_per_s']):6.1%} of {n} x {base['name']}")
    if shares:
      print(f"scaling {r['name']:30} {r['seq_per_s']:8.0f} seq/s  " + "  ".join(shares))


def table(out: str):
  """ours / peer / ratio / MFU, from results.jsonl."""
  records = benchmark.read_jsonl(os.path.join(out, "results.jsonl"))
  matmul = next((r["matmul_tflops"] for r in records if "matmul_tflops" in r), None)
  peers = {(r["variant"], r["global_batch"], r["seq_len"], r["hidden_dropout"],
            r["attention_dropout"]): r for r in records if r.get("peer") == "torch"
           and "seq_per_s" in r}
  print(f"\ndevice: {next((r['device'] for r in records if 'device' in r), '?')}, "
        f"bf16 matmul {matmul and round(matmul)} TFLOP/s")
  gib = lambda x, w: f"{x:{w}.2f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
  print(f"{'name':34} {'ms':>7} {'seq/s':>8} {'GiB':>6} {'XLA GiB':>7} {'MFU':>6} {'MFU/mm':>6} "
        f"{'peer':>7} {'peer GiB':>8} {'ratio':>6}")
  for r in records:
    if "seq_per_s" not in r or r.get("peer"):
      continue
    key = (r["variant"], r["global_batch"], r["seq_len"], r["hidden_dropout"],
           r["attention_dropout"])
    peer = peers.get(key, {}).get("seq_per_s")
    mm = r["tflops_per_device"] / matmul if matmul else float("nan")
    print(f"{r['name']:34} {r['step_ms']:7.2f} {r['seq_per_s']:8.0f} "
          f"{gib(r.get('device_row_peak_gib'), 6)} {gib(r.get('compiled_step_gib'), 7)} "
          f"{r.get('mfu', 0):6.1%} {mm:6.1%} {peer or float('nan'):7.0f} "
          f"{gib(peers.get(key, {}).get('peak_mem_row_gib'), 8)} "
          f"{r['seq_per_s'] / peer if peer else float('nan'):6.2f}")
  print("GiB: device peak of the row's own state and step (device 0; - where not measured: the CPU, "
        "or the process's peak came earlier); XLA GiB: the compiled step's buffers; peer GiB: torch's "
        "peak over its timed steps less its other configurations' tensors (tools/benchmark.py)")
  for key, r in peers.items():
    print(f"peer {key}: {r['seq_per_s']:.0f} seq/s, {r['step_ms']:.2f} ms, compile {r['compile_s']:.0f} s, "
          f"peak {gib(r.get('peak_mem_gib'), 0)} GiB (process), {gib(r.get('peak_mem_row_gib'), 0)} GiB (row)")


if __name__ == "__main__":
  from pretrain import console  # pylint: disable=g-import-not-at-top
  console.default_jax_platforms()        # before JAX is imported: no TPU probing without a TPU
  app.run(main)
