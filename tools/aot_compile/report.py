"""The fit report: lowers and compiles the train step for a topology from abstract shapes (nothing
is allocated, no data is read) and gives the per-chip memory of the compiled step against the
chip's HBM with a FITS / DOES NOT FIT verdict; and the report as text.
"""

from __future__ import annotations

import re
import time
from typing import Any

from tools.aot_compile.topology import Topology, topology_devices

GIB = 2 ** 30

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

  from pretrain import sharding, step  # pylint: disable=g-import-not-at-top
  from pretrain.data import loader  # pylint: disable=g-import-not-at-top

  devices = topology_devices(topology) if devices is None else devices
  config.data.source = "synthetic"      # nothing reads a corpus
  config.data.path = ""
  mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
  processes = len({d.process_index for d in devices})
  built = step.build(config, mesh, processes)
  k = config.train.grad_accum_steps
  b, s = config.train.global_batch_size, config.data.max_seq_length
  p = config.data.max_predictions_per_seq
  batch = loader.abstract_batch(b, s, p, mesh)

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
    lowered = built.train_step.lower(built.setup.abstract_state, batch)
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


def one_line(r: dict) -> str:
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
