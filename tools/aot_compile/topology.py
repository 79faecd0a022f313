"""TPU topologies for the fit check: user-facing slice names -> Topology, HBM per chip, and the
compile-only devices the TPU compiler (libtpu) describes for a slice.

Names as Cloud TPU spells them: v4-N and v5p-N count TensorCores (2 per chip, one JAX device per
chip: megacore), v5e-N (= v5litepod-N) and v6e-N count chips; or the compiler's own form
GEN:AxB[xC] (e.g. v5e:4x4, v4:2x2x4).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

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
