"""`train.run` in a subprocess, with faults injected, for the reliability tests.

A subprocess gives each run a clean process to kill (-9) and lets the runs share a persistent
compilation cache with XLA's CPU optimisations off, so a run of the tiny model takes seconds
rather than the half minute a fresh in-process compile takes on 2 cores. The child runs
`tiny_config(**overrides)` on 2 CPU devices and writes, next to `out`, either the final
parameters (`out.npz`) and {"step": N}, or {"error": type, "message": text} (exit status 3).

Faults it can inject: `poison` (0-based batch indices whose mask weights become NaN: batch i is
consumed by step i + 1) and `fill_disk` ({"step": N, "mount": DIR}: before saving step N it waits
for the save in flight, then fills DIR's file system).
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

_CHILD = r"""
import json, shutil, sys
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["tests"])
import jax, numpy as np
from helpers import tiny_config
from pretrain import train
from pretrain.checkpoint import Checkpointer
from pretrain.data import loader

poison = set(spec.get("poison", ()))
if poison:
  make_source = loader.make_source
  def poisoned_source(config, *, split):
    source = make_source(config, split=split)
    if split == "train":
      batch = source.batch
      def poisoned(index):
        out = batch(index)
        if index in poison:
          out = dict(out, masked_lm_weights=np.full_like(out["masked_lm_weights"], np.nan))
        return out
      source.batch = poisoned
    return source
  loader.make_source = poisoned_source

fill = spec.get("fill_disk")
if fill:
  save = Checkpointer.save
  def save_on_a_filling_disk(self, step, *args, **kwargs):
    if step == fill["step"]:
      self.wait()
      free = shutil.disk_usage(fill["mount"]).free
      with open(fill["mount"] + "/filler", "wb") as f:
        f.write(b"\0" * max(free - 64 * 1024, 0))
    return save(self, step, *args, **kwargs)
  Checkpointer.save = save_on_a_filling_disk

try:
  state = train.run(tiny_config(**spec["overrides"]), spec["workdir"])
except ValueError as e:
  with open(spec["out"], "w") as f:
    json.dump({"error": type(e).__name__, "message": str(e)}, f)
  sys.exit(3)
leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
np.savez(spec["out"] + ".npz", **{
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves})
with open(spec["out"], "w") as f:
  json.dump({"step": int(state.step)}, f)
"""


def child_env(tmp_path_factory) -> dict:
  """2 CPU devices, fast XLA compiles and a compilation cache shared by every run of the session."""
  cache_dir = tmp_path_factory.getbasetemp() / "reliability-jax-cache"
  cache_dir.mkdir(exist_ok=True)
  return dict(
      os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
      XLA_FLAGS=("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true"),
      JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def argv(workdir, out, overrides: dict, poison=(), fill_disk=None) -> list[str]:
  spec = dict(tests=str(TESTS), workdir=str(workdir), out=str(out), overrides=overrides,
              poison=list(poison), fill_disk=fill_disk)
  return [sys.executable, "-c", _CHILD, json.dumps(spec)]


def start(env, workdir, out, overrides: dict, log_path, **faults) -> subprocess.Popen:
  """The run as a background process (stdout and stderr to `log_path`)."""
  with open(log_path, "ab") as log:
    return subprocess.Popen(argv(workdir, out, overrides, **faults), cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def run(env, workdir, out, overrides: dict, timeout=300, **faults) -> dict:
  """Runs to the end: the child's result ({"step"} or {"error", "message"}) with its
  "returncode" and "stderr"."""
  result = subprocess.run(argv(workdir, out, overrides, **faults), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode in (0, 3), result.stderr[-5000:]
  with open(out, encoding="utf-8") as f:
    outcome = json.load(f)
  return dict(outcome, returncode=result.returncode, stderr=result.stderr)


def params(out) -> dict[str, np.ndarray]:
  with np.load(str(out) + ".npz") as data:
    return {k: data[k] for k in data.files}


def assert_params_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
