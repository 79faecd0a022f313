"""The one place that decides which implementation every speed switch of the model runs.

The `model` config names what the user wants (`attention_dropout_impl="fused"`, ...); `resolve`
turns that, the backend and the mesh into what will run (`SpeedPath`): a Pallas kernel where a
GPU can run it, its jax.numpy twin elsewhere (same masks, so the same function up to rounding), or
an error that names both keys when two switches cannot hold together. Pretraining, fine-tuning,
the benchmark and the AOT check build their models from this path; the training loops log it once
and write it to the workdir's config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from pretrain.model import attention_kernel, residual_norm
from pretrain.model.config import BertConfig


class SpeedPathError(ValueError):
  """Two speed switches that cannot hold together; the message names both keys."""


@dataclasses.dataclass(frozen=True)
class SpeedPath:
  """What runs. Every module of the model reads its switch from here, never from the config."""
  attention: str             # no dropout on the probabilities: auto | xla | cudnn | kernel | twin
  attention_dropout: str     # with dropout: reference | lean | kernel | twin
  residual_norm: str         # LayerNorm(residual + dropout(branch + bias)): kernel | xla
  dropout_rng: str           # hash | threefry | rbg | unsafe_rbg
  scan_layers: bool
  remat_policy: str
  logits_grad_dtype: str
  mlm_gather: str
  backend: str = ""
  notes: tuple[str, ...] = ()   # why a switch runs otherwise than its name says

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "notes": list(self.notes)}

  def describe(self) -> str:
    """One line for the log."""
    fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
              if f.name not in ("notes", "backend")]
    notes = f" ({'; '.join(self.notes)})" if self.notes else ""
    return f"speed path on {self.backend}: " + " ".join(fields) + notes


def _conflict(key_a: str, value_a: Any, key_b: str, value_b: Any, why: str) -> SpeedPathError:
  return SpeedPathError(f"model.{key_a}={value_a!r} cannot run with model.{key_b}={value_b!r}: "
                        f"{why}")


def backend_of(mesh: Mesh | None) -> str:
  """The platform of the mesh's devices (an AOT target may be a TPU seen from a CPU host)."""
  if mesh is None:
    return jax.default_backend()
  return mesh.devices.flat[0].platform


def resolve(config: BertConfig, *, mesh: Mesh | None = None, backend: str | None = None,
            seq_len: int | None = None) -> SpeedPath:
  """The implementation of every speed switch of `config` on `backend` (default: the mesh's).

  `seq_len`, when known, lets the attention kernel's shape limits be checked here; without it
  they are assumed met. Raises SpeedPathError for switches that contradict each other.
  """
  backend = backend or backend_of(mesh)
  notes = []
  hashed = config.dropout_rng == "hash"
  if config.attention_dropout > 0 and config.attention_dropout_impl == "fused" and not hashed:
    raise _conflict("attention_dropout_impl", "fused", "dropout_rng", config.dropout_rng,
                    "the fused attention hashes its masks; set model.dropout_rng='hash' or "
                    "model.attention_dropout_impl='reference'")
  if config.hidden_dropout > 0 and config.residual_norm_impl == "fused" and not hashed:
    raise _conflict("residual_norm_impl", "fused", "dropout_rng", config.dropout_rng,
                    "the fused residual-norm hashes its masks; set model.dropout_rng='hash' or "
                    "model.residual_norm_impl='xla'")
  if config.attention_impl == "cudnn" and backend != "gpu":
    raise SpeedPathError(f"model.attention_impl='cudnn' needs a GPU, and this run's backend is "
                         f"{backend}; use 'auto' or 'xla'")

  gpu_kernels = backend == "gpu" and attention_kernel.plgpu is not None
  attention_fits = attention_kernel.kernel_supports(seq_len or 16, config.head_dim)

  def attention_choice(wanted: str) -> str:
    if wanted != "fused":
      return wanted
    if gpu_kernels and attention_fits:
      return "kernel"
    notes.append("fused attention: the jax.numpy twin " + (
        f"(the kernel needs seq % 16 == 0 and a power-of-two head_dim >= 16; got seq {seq_len},"
        f" head_dim {config.head_dim})" if gpu_kernels else f"(no Pallas GPU kernel on {backend})"))
    return "twin"

  attention = attention_choice(config.attention_impl)
  attention_dropout = attention_choice(config.attention_dropout_impl)
  norm = "xla"
  if config.residual_norm_impl == "fused":
    if backend == "gpu" and residual_norm.plgpu is not None and \
        residual_norm.kernel_supports(config.hidden_size):
      norm = "kernel"
    else:
      notes.append(f"fused residual-norm: XLA's chain (no Pallas GPU kernel on {backend} "
                   f"for hidden {config.hidden_size})")
  return SpeedPath(
      attention=attention, attention_dropout=attention_dropout, residual_norm=norm,
      dropout_rng=config.dropout_rng, scan_layers=config.scan_layers,
      remat_policy=config.remat_policy, logits_grad_dtype=config.logits_grad_dtype,
      mlm_gather=config.mlm_gather, backend=backend, notes=tuple(dict.fromkeys(notes)))
