"""Ahead-of-time fit check: compiles the real train step for a TPU topology, with no TPU attached.

  python -m tools.aot_compile --config=configs/pretrain.py:base --topology=v5e-16 \
      [--config.train.global_batch_size=256 --config.data.max_seq_length=512 \
       --config.mesh.shape="(-1,1,1)"] [--find_max_batch] [--json=out.json]

The TPU compiler in the `libtpu` package (`pip install -e ".[tpu]"`, or `pip install libtpu`)
describes the topology (`jax.experimental.topologies.get_topology_desc`) with compile-only devices;
the step is lowered from abstract shapes (`Setup.abstract_state` and ShapeDtypeStructs for the
batch), so nothing is allocated and no data is read (`data.source` is forced to "synthetic"). The
report gives the per-chip argument / output / alias / temporary / generated-code bytes of the
compiled step (`compiled.memory_analysis()`), their total, the chip's HBM and a FITS / DOES NOT FIT
verdict. A step the TPU compiler itself refuses for lack of HBM ("Ran out of memory in memory space
hbm") is reported as DOES NOT FIT with the compiler's figures.

Topologies: user-facing names as Cloud TPU spells them, v4-N and v5p-N counting TensorCores (2 per
chip, one JAX device per chip: megacore), v5e-N (= v5litepod-N) and v6e-N counting chips; or the
compiler's own form GEN:AxB[xC] (e.g. v5e:4x4, v4:2x2x4).

`--find_max_batch` searches the largest per-chip batch that compiles and fits: doubling from
`--start_per_chip_batch`, then bisection, in steps of `--batch_multiple` sequences per chip (and so
that the global batch divides by data x fsdp x grad_accum_steps).

JAX_PLATFORMS defaults to "cpu" here: the compile-only TPU devices need no TPU backend, and on a TPU
VM the tool leaves the chips to whatever else runs there (ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets it load
libtpu beside a process that holds them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes /tmp/libtpu_lockfile so that one process owns the chips; compile-only devices own
# nothing, so several compiles (parallel tests, a training run on a TPU VM) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Flags (see _define_flags), set when run as a program.
_CONFIG = _TOPOLOGY = _FIND_MAX = _START = _MULTIPLE = _MAX_PER_CHIP = _USABLE = _JSON = None

GIB = 2 ** 30

# generation -> (HBM per chip in GiB, TensorCores counted per chip in the user-facing name,
#                mesh dimensions, compiler chip config, device_kind as jax reports it)
CHIPS: dict[str, dict[str, Any]] = {
    "v4": dict(hbm_gib=32, cores_per_chip=2, ndim=3, chip_config_name="megacore"),
    "v5p": dict(hbm_gib=95, cores_per_chip=2, ndim=3, chip_config_name="megacore"),
    "v5e": dict(hbm_gib=16, cores_per_chip=1, ndim=2, chip_config_name="default"),
    "v6e": dict(hbm_gib=32, cores_per_chip=1, ndim=2, chip_config_name="default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v5": "v5p"}
# Slice sizes Cloud TPU sells (chips). v5e / v6e: 2D; v4 / v5p: 3D cubes of 4x4x4 blocks.
_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_EXAMPLES = ("v4-8, v4-16, v4-32, ... (TensorCores, 2 per chip); v5p-8, v5p-16, ...; "
             "v5e-1, v5e-4, v5e-8, v5e-16, v5e-32, v5e-64, v5e-128, v5e-256 (chips; also "
             "v5litepod-N); v6e-1 ... v6e-256; or GEN:AxB[xC], e.g. v5e:4x4, v4:2x2x4")


class TopologyError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                  # as the user gave it
  generation: str            # v4, v5p, v5e, v6e
  dims: tuple[int, ...]      # chips per mesh dimension
  compiler_name: str         # what get_topology_desc wants, e.g. v5e:4x4

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def hbm_gib(self) -> float:
    return CHIPS[self.generation]["hbm_gib"]


def _3d_shape(chips: int) -> tuple[int, int, int]:
  """v4 / v5p slice shape: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the smallest)."""
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def parse_topology(name: str) -> Topology:
  """User-facing slice name -> Topology; a TopologyError lists what is accepted."""
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+)[:=]([0-9]+(?:x[0-9]+)*)", text)
  if m:
    gen = _ALIASES.get(m.group(1), m.group(1))
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if gen not in CHIPS or len(dims) != CHIPS[gen]["ndim"] or min(dims) < 1:
      raise TopologyError(f"unknown TPU topology {name!r}; valid: {_EXAMPLES}")
    return Topology(name, gen, dims, f"{gen}:{'x'.join(map(str, dims))}")
  m = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", text)
  gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if gen not in CHIPS:
    raise TopologyError(f"unknown TPU topology {name!r}; valid: {_EXAMPLES}")
  count, info = int(m.group(2)), CHIPS[gen]
  if info["ndim"] == 2:
    if count not in _2D_SHAPES:
      raise TopologyError(f"unknown TPU topology {name!r}: {gen} slices have "
                          f"{sorted(_2D_SHAPES)} chips; valid: {_EXAMPLES}")
    dims = _2D_SHAPES[count]
  else:
    chips, rest = divmod(count, info["cores_per_chip"])
    if rest or chips < 4 or chips & (chips - 1):
      raise TopologyError(f"unknown TPU topology {name!r}: {gen}-N counts TensorCores (2 per "
                          f"chip); N must be 8, 16, 32, ... ; valid: {_EXAMPLES}")
    dims = _3d_shape(chips)
  return Topology(name, gen, dims, f"{gen}:{'x'.join(map(str, dims))}")


def libtpu_available() -> tuple[bool, str]:
  """Whether the TPU compiler (the libtpu package) can be loaded, and why not."""
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return False, f"libtpu is not installed ({e}); pip install -e '.[tpu]' (or libtpu)"
  return True, ""


def topology_devices(topology: Topology) -> list:
  """Compile-only TPU devices for the slice (one per chip)."""
  ok, why = libtpu_available()
  if not ok:
    raise RuntimeError(why)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  info = CHIPS[topology.generation]
  if info["ndim"] == 2:
    x, y = topology.dims
    host = (x, y, 1) if x * y <= 8 else (2, 2, 1)     # v5e/v6e hosts: up to 8 chips (2x4)
    if x * y < 4:
      host = (x, y, 1)
  else:
    host = (2, 2, 1)                                  # v4 / v5p hosts: 4 chips
  desc = topologies.get_topology_desc(
      topology_name=topology.compiler_name, platform="tpu",
      chip_config_name=info["chip_config_name"], chips_per_host_bounds=host, num_slices=1,
      wrap=(False, False, False))
  devices = list(desc.devices)
  if len(devices) != topology.num_chips:
    raise RuntimeError(f"{topology.compiler_name}: the TPU compiler made {len(devices)} devices "
                       f"for {topology.num_chips} chips")
  return devices


# How the TPU compiler refuses a program that does not fit, in the versions seen so far:
#   "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
#    (360.35G) exceeds available HBM (15.75G)."                                (libtpu 0.0.42)
#   "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm."         (older libtpu)
_OOM = re.compile(r"Ran out of memory (?:in memory space hbm|on HBM)", re.I)
_OOM_FIGURES = (
    re.compile(r"required for [^(]*\(([0-9.]+)([KMGT]?)B?\) exceeds available HBM "
               r"\(([0-9.]+)([KMGT]?)B?\)", re.I),
    re.compile(r"Used ([0-9.]+)([KMGT]?)B? of ([0-9.]+)([KMGT]?)B? hbm", re.I),
)


def _bytes(value: str, unit: str) -> float:
  return float(value) * 1024 ** "BKMGT".index(unit.upper() or "B")


def compile_report(config, topology: Topology, devices: list | None = None,
                   usable_fraction: float = 0.95) -> dict[str, Any]:
  """Lowers and compiles the train step for `config` on `topology`; the per-chip memory report."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from pretrain import input as input_lib, sharding, train  # pylint: disable=g-import-not-at-top

  devices = topology_devices(topology) if devices is None else devices
  config.data.source = "synthetic"      # nothing reads a corpus
  config.data.path = ""
  mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
  processes = len({d.process_index for d in devices})
  train.validate(config, mesh, processes)
  setup = train.make_setup(config, mesh)
  k = config.train.grad_accum_steps
  b, s = config.train.global_batch_size, config.data.max_seq_length
  p = config.data.max_predictions_per_seq
  shapes = {"input_ids": ((b, s), jnp.int32), "input_mask": ((b, s), jnp.int32),
            "segment_ids": ((b, s), jnp.int32), "masked_lm_positions": ((b, p), jnp.int32),
            "masked_lm_ids": ((b, p), jnp.int32), "masked_lm_weights": ((b, p), jnp.float32),
            "next_sentence_labels": ((b,), jnp.int32)}
  shardings = input_lib.batch_shardings(mesh)
  batch = {key: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[key])
           for key, (shape, dtype) in shapes.items()}

  n = len(devices)
  hbm = topology.hbm_gib * GIB
  report: dict[str, Any] = dict(
      topology=topology.name, compiler_topology=topology.compiler_name,
      device_kind=devices[0].device_kind, chips=n, hosts=processes, variant=config.variant,
      mesh=dict(mesh.shape), global_batch=b, per_chip_batch=b / n, seq_len=s,
      grad_accum_steps=k, dtype=config.model.dtype, optimizer=config.optim.name,
      hbm_gib=topology.hbm_gib, usable_fraction=usable_fraction,
      jax_version=jax.__version__)
  usable = hbm * report["usable_fraction"]
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = train.make_train_step(setup, k).lower(setup.abstract_state, batch)
    report["lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      message = str(e)
      if not _OOM.search(message):
        raise
      report["compile_s"] = time.perf_counter() - start
      used = next((m for m in (r.search(message) for r in _OOM_FIGURES) if m), None)
      report.update(verdict="DOES NOT FIT", compiler_oom=True,
                    compiler_message=message.strip().splitlines()[0][:500])
      if used:
        report.update(total_gib=_bytes(*used.group(1, 2)) / GIB,
                      compiler_limit_gib=_bytes(*used.group(3, 4)) / GIB)
      return report
  report["compile_s"] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  figures = {f: getattr(memory, f"{f}_size_in_bytes", 0) or 0
             for f in ("argument", "output", "alias", "temp", "generated_code")}
  total = (figures["argument"] + figures["output"] - figures["alias"] + figures["temp"] +
           figures["generated_code"])
  report.update({f"{f}_gib": v / GIB for f, v in figures.items()})
  report.update(total_gib=total / GIB, compiler_oom=False,
                verdict="FITS" if total <= usable else "DOES NOT FIT")
  return report


def _per_chip_unit(config, n: int, multiple: int) -> int:
  """Smallest per-chip step with global = per_chip x n divisible by data x fsdp x grad_accum."""
  from pretrain import sharding  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shape = list(config.mesh.shape)
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = n // known
  mesh_shape = dict(zip(sharding.MESH_AXES, shape))
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  need = dp * config.train.grad_accum_steps
  unit = need // math.gcd(need, n)                    # per_chip x n % need == 0
  return int(np.lcm(unit, max(1, multiple)))


def find_max_batch(config, topology: Topology, *, start: int = 8, multiple: int = 8,
                   max_per_chip: int = 4096, usable_fraction: float = 0.95,
                   known_fit: int | None = None, known_no_fit: int | None = None,
                   on_probe=None, log=print) -> tuple[dict | None, list[dict]]:
  """Largest per-chip batch that fits: doubling, then bisection, in steps of `unit` per chip.

  `known_fit` / `known_no_fit` continue an earlier search's bracket (per-chip batches already
  compiled: one that fits, one that does not) without compiling them again; the answer is then
  `known_fit` itself when nothing above it fits (its report says it was not compiled here).
  `on_probe(tried)` runs after every compile (the CLI rewrites its JSON there, so a search stopped
  half way keeps its probes).

  Each probe is a full TPU compile (minutes for base/large on a small CPU), so a probe is placed
  where a straight line through the fitting probes' totals (memory = fixed + per-sequence x batch)
  reaches the usable HBM, when that lies inside the doubling / bisection bracket; otherwise it is
  the plain doubling step or midpoint. The answer is the same, bracketed by a fitting batch and
  one `unit` more that does not fit (or `max_per_chip`).
  """
  devices = topology_devices(topology)
  n = len(devices)
  unit = _per_chip_unit(config, n, multiple)
  limit = topology.hbm_gib * usable_fraction
  tried: list[dict] = []

  def attempt(per_chip: int) -> dict:
    trial = config.copy_and_resolve_references()
    trial.train.global_batch_size = per_chip * n
    report = compile_report(trial, topology, devices, usable_fraction)
    log(_one_line(report))
    tried.append(report)
    if on_probe is not None:
      on_probe(tried)
    return report

  def predicted() -> int | None:
    fits = sorted({int(r["per_chip_batch"]): r["total_gib"] for r in tried
                   if r["verdict"] == "FITS"}.items())
    if not fits:
      return None
    if len(fits) == 1:                # temp counts some batch-independent buffers: an underestimate
      (b, total), = fits
      fixed = total - tried[[int(r["per_chip_batch"]) for r in tried].index(b)]["temp_gib"]
      slope = (total - fixed) / b if b else 0.0
    else:
      (b0, t0), (b, total) = fits[-2], fits[-1]
      slope = (total - t0) / (b - b0)
    if slope <= 0:
      return None
    return int((b + (limit - total) / slope) // unit * unit)

  lo, hi, best = 0, None, None
  per_chip = max(unit, start // unit * unit)
  if known_fit is not None:
    if known_fit % unit:
      raise ValueError(f"known_fit={known_fit} is not a multiple of the search's step {unit}")
    lo = known_fit
    best = dict(per_chip_batch=known_fit, global_batch=known_fit * n, verdict="FITS",
                topology=topology.name, note="known to fit from an earlier compile; not "
                "compiled in this search")
    per_chip = max(per_chip, known_fit + unit)
  if known_no_fit is not None:
    if known_fit is None or known_no_fit <= known_fit:
      raise ValueError(f"known_no_fit={known_no_fit} needs a smaller known_fit (got "
                       f"{known_fit})")
    hi = known_no_fit
  while hi is None and per_chip <= max_per_chip:               # doubling
    report = attempt(per_chip)
    if report["verdict"] != "FITS":
      hi = per_chip
      break
    lo, best = per_chip, report
    guess = predicted()
    if guess is None:
      per_chip *= 2
    else:                       # the line's guess; one unit more when it says this is the most
      per_chip = guess if guess > lo else lo + unit
    if per_chip > max_per_chip and lo < max_per_chip:
      per_chip = max_per_chip // unit * unit
      if per_chip <= lo:
        break
  if best is None:
    return None, tried                                         # the smallest batch does not fit
  if hi is None:
    return best, tried                                         # fits up to max_per_chip
  while hi - lo > unit:                                        # bisection
    mid = (lo + hi) // 2 // unit * unit
    guess = predicted()
    if guess is not None:
      # the line's guess, and the batch one unit above it, settle the search in two probes
      mid = guess if lo < guess < hi else (guess + unit if lo < guess + unit < hi else mid)
    if not lo < mid < hi:
      mid = (lo + hi) // 2 // unit * unit
    if not lo < mid < hi:
      break
    report = attempt(mid)
    if report["verdict"] == "FITS":
      lo, best = mid, report
    else:
      hi = mid
  return best, tried


def _search_json(tried: list[dict], best: dict | None, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(best=best, tried=tried), f, indent=2)


def _one_line(r: dict) -> str:
  figures = (f"total {r['total_gib']:.2f} GiB" if "total_gib" in r else "compiler OOM")
  return (f"  per-chip batch {r['per_chip_batch']:g} (global {r['global_batch']}): {figures} of "
          f"{r['hbm_gib']} GiB -> {r['verdict']}  [compile {r.get('compile_s', 0):.1f}s]")


def format_report(r: dict) -> str:
  lines = [f"{r['variant']} on {r['topology']} ({r['compiler_topology']}, {r['chips']} x "
           f"{r['device_kind']}, {r['hosts']} host(s)), mesh {r['mesh']}",
           f"global batch {r['global_batch']} ({r['per_chip_batch']:g} per chip), seq "
           f"{r['seq_len']}, grad_accum {r['grad_accum_steps']}, {r['dtype']}, {r['optimizer']}",
           "per-chip memory (GiB):"]
  for field in ("argument", "output", "alias", "temp", "generated_code"):
    if f"{field}_gib" in r:
      lines.append(f"  {field:<16}{r[f'{field}_gib']:>10.3f}")
  limit = r["hbm_gib"] * r["usable_fraction"]
  if r.get("compiler_oom"):
    lines.append(f"  the TPU compiler ran out of HBM: {r['compiler_message']}")
  if r.get("compiler_oom") and "total_gib" in r:
    lines.append(f"  {'required':<16}{r['total_gib']:>10.3f}   (the compiler's figure for HLO "
                 f"temporaries alone; it allows {r['compiler_limit_gib']:.2f})")
  elif "total_gib" in r:
    lines.append(f"  {'total':<16}{r['total_gib']:>10.3f}   (argument + output - alias + temp + "
                 f"code)")
  lines.append(f"  HBM per chip    {r['hbm_gib']:>10.3f}   usable {limit:.2f} "
               f"({r['usable_fraction']:.0%})")
  lines.append(f"verdict: {r['verdict']}   (lower {r.get('lower_s', 0):.1f}s, compile "
               f"{r.get('compile_s', 0):.1f}s)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    topology = parse_topology(_TOPOLOGY.value)
  except TopologyError as e:
    sys.exit(f"error: {e}")
  ok, why = libtpu_available()
  if not ok:
    sys.exit(f"error: {why}")
  config = _CONFIG.value.copy_and_resolve_references()
  if _FIND_MAX.value:
    print(f"searching the largest per-chip batch for {config.variant} at seq "
          f"{config.data.max_seq_length} on {topology.name}:", flush=True)
    log = functools.partial(print, flush=True)    # each probe is minutes: show it at once
    on_probe = None
    if _JSON.value:                   # keep every probe even if the search is stopped half way
      on_probe = functools.partial(_search_json, best=None, path=_JSON.value)
    try:
      best, tried = find_max_batch(
          config, topology, start=_START.value, multiple=_MULTIPLE.value,
          max_per_chip=_MAX_PER_CHIP.value, usable_fraction=_USABLE.value,
          known_fit=_KNOWN_FIT.value, known_no_fit=_KNOWN_NO_FIT.value, on_probe=on_probe,
          log=log)
    except ValueError as e:                     # a bracket that does not fit the search's step
      sys.exit(f"error: {e}")
    if best is None:
      print(f"even per-chip batch {tried[0]['per_chip_batch']:g} does not fit")
      result: Any = dict(best=None, tried=tried)
    else:
      print(f"\nlargest per-chip batch that fits: {best['per_chip_batch']:g} (global "
            f"{best['global_batch']})\n")
      print(best["note"] if "note" in best else format_report(best))
      result = dict(best=best, tried=tried)
  else:
    result = compile_report(config, topology, usable_fraction=_USABLE.value)
    print(format_report(result))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


def _define_flags():
  """The command line's flags, defined only when run as a program (tests import this module)."""
  global _CONFIG, _TOPOLOGY, _FIND_MAX, _START, _MULTIPLE, _MAX_PER_CHIP, _USABLE, _JSON
  global _KNOWN_FIT, _KNOWN_NO_FIT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/pretrain.py:base", "Pretraining config and variant.", lock_config=True)
  _TOPOLOGY = flags.DEFINE_string(
      "topology", "v5e-16", "TPU slice: v4-N, v5p-N (N TensorCores), v5e-N / v5litepod-N, v6e-N "
      "(N chips), or GEN:AxB[xC] as the TPU compiler names it.")
  _FIND_MAX = flags.DEFINE_bool(
      "find_max_batch", False, "Search the largest per-chip batch that fits (ignores "
      "train.global_batch_size).")
  _START = flags.DEFINE_integer("start_per_chip_batch", 8, "First per-chip batch of the search.")
  _MULTIPLE = flags.DEFINE_integer("batch_multiple", 8, "Granularity of the search, per chip.")
  _MAX_PER_CHIP = flags.DEFINE_integer("max_per_chip_batch", 4096, "Upper bound of the search.")
  _KNOWN_FIT = flags.DEFINE_integer(
      "known_fit", None, "Continue a bracket: a per-chip batch an earlier compile found to fit "
      "(not compiled again; the search starts above it).")
  _KNOWN_NO_FIT = flags.DEFINE_integer(
      "known_no_fit", None, "Continue a bracket: a per-chip batch an earlier compile found not to "
      "fit (needs --known_fit); the search bisects between the two.")
  _USABLE = flags.DEFINE_float(
      "usable_fraction", 0.95, "Fraction of the chip's HBM a step may use; the TPU runtime keeps "
      "the rest (program, runtime buffers).")
  _JSON = flags.DEFINE_string("json", None, "Also write the report(s) to this JSON file.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
