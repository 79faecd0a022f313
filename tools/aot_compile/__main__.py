r"""Ahead-of-time fit check: compiles the real train step for a TPU topology, with no TPU attached.

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

import functools
import json
import sys
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from pretrain import console
from tools.aot_compile.report import compile_report, format_report
from tools.aot_compile.search import find_max_batch
from tools.aot_compile.topology import TopologyError, libtpu_available, parse_topology


# The command line's flags; this module runs only as a program (`python -m tools.aot_compile`).
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


def _search_json(tried: list[dict], best: dict | None, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(best=best, tried=tried), f, indent=2)


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


if __name__ == "__main__":
  console.exit_on_help(sys.argv, __doc__)
  app.run(main)
