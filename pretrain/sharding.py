"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names the axes of every parameter and of the activations it constrains (`embed`, `heads`,
`batch`, ...). Nothing else in the project decides placement: change `LOGICAL_RULES` and the whole
model re-shards.
"""

from collections.abc import Sequence
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). Parameters shard over `fsdp` (ZeRO-3
# style) and `tensor` (Megatron style); activations shard their batch over both batch axes.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("position", None),
    ("qkv", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
)
_RULES = dict(LOGICAL_RULES)


def logical_to_spec(axes: Sequence[str | None]) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names."""
  unknown = [a for a in axes if a is not None and a not in _RULES]
  if unknown:
    raise KeyError(f"logical axis {unknown[0]!r} has no entry in sharding.LOGICAL_RULES")
  return P(*(None if a is None else _RULES[a] for a in axes))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 for 'all remaining devices'."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh.shape={shape} does not divide the {len(devices)} available devices")
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh.shape={shape} needs {math.prod(shape)} devices but {len(devices)} are available; "
        f"use a shape whose product is {len(devices)}, or -1 for one axis")
  # jax.make_mesh orders the devices for the physical topology (ICI rings on TPU). Auto axes: the
  # compiler propagates shardings between our explicit constraints (GSPMD), as pjit always did.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the mesh axes `batch` maps to."""
  axes = _RULES["batch"]
  return math.prod(mesh.shape[a] for a in axes)


def named(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return named(mesh, ("batch",) + (None,) * (ndim - 1))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a `jax.set_mesh` context."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def check_divisible(name: str, shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh):
  """Refuse a parameter that a mesh axis cannot split evenly, naming it."""
  spec = logical_to_spec(axes)
  for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
    if mesh_axes is None:
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    ways = math.prod(mesh.shape[a] for a in mesh_axes)
    if size % ways:
      raise ValueError(
          f"parameter {name} has size {size} on dimension {dim} ({axes[dim]!r} -> mesh axes "
          f"{mesh_axes}), which does not split {ways} ways; change mesh.shape or the model size")
