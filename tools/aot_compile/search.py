"""The largest per-chip batch that compiles and fits a topology: doubling, then bisection, each
probe a full compile (report.compile_report), guided by a straight line through the fitting totals.
"""

from __future__ import annotations

import math

from tools.aot_compile.report import compile_report, one_line
from tools.aot_compile.topology import Topology, topology_devices


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
    log(one_line(report))
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
