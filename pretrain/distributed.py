"""Multi-host start-up: `jax.distributed.initialize` where the environment asks for it.

Call `initialize` once, before anything touches a device. Where the settings come from, first match:

1. explicit arguments (the `--coordinator_address`, `--num_processes`, `--process_id` flags);
2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
   (and JAX_LOCAL_DEVICE_IDS, read by JAX itself);
3. a SLURM job step with more than one task (SLURM_NTASKS > 1): JAX's SLURM detector derives the
   coordinator from SLURM_STEP_NODELIST and the process from SLURM_PROCID;
4. a Cloud TPU VM (libtpu installed and a TPU device node present): JAX detects the pod's hosts.

Anything else is a single process, and nothing is initialised. Explicit settings must be complete:
a process count without a coordinator (or the reverse) is an error naming the missing flag.
"""

from __future__ import annotations

from collections.abc import Sequence
import glob
import importlib.util
import os

from absl import logging
import jax

# Environment variables for the explicit settings, next to the flag each one stands in for.
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None
               ) -> bool:
  """Starts JAX's distributed runtime if this is one of several processes; returns whether it did."""
  if jax.distributed.is_initialized():
    return True
  slurm = _slurm_tasks() > 1
  settings = _explicit_settings(coordinator_address, num_processes, process_id, partial_ok=slurm)
  if settings is not None:
    if settings["num_processes"] == 1:
      return False
    if None in settings.values():  # inside a SLURM step: JAX detects the rest
      return _start(**settings, local_device_ids=local_device_ids, how="SLURM + explicit settings",
                    cluster_detection_method="slurm")
    return _start(**settings, local_device_ids=local_device_ids, how="explicit settings")
  if slurm:
    return _start(local_device_ids=local_device_ids, how="SLURM", cluster_detection_method="slurm")
  if _on_cloud_tpu_vm():
    # On a TPU VM jax finds the pod's hosts itself (a single host is a pod of one).
    return _start(local_device_ids=local_device_ids, how="Cloud TPU auto-detection")
  return False


def _explicit_settings(coordinator_address, num_processes, process_id, partial_ok=False
                       ) -> dict | None:
  """The settings from arguments, else from JAX_* variables; None if neither gives any.

  With `partial_ok` (inside a SLURM step) missing values are left None for JAX to detect.
  """
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id)
  source = {k: f"--{k}" for k in given}
  for key, var in ENV_VARS.items():
    if given[key] is None and os.environ.get(var):
      given[key], source[key] = os.environ[var], f"${var}"
  if all(v is None for v in given.values()):
    return None
  for key in ("num_processes", "process_id"):
    if given[key] is not None:
      try:
        given[key] = int(given[key])
      except ValueError:
        raise ValueError(f"{source[key]}={given[key]!r} is not an integer") from None
  n, pid = given["num_processes"], given["process_id"]
  if n is not None and n < 1:
    raise ValueError(f"{source['num_processes']}={n} must be at least 1")
  if n == 1 and given["coordinator_address"] is None:
    if pid not in (None, 0):
      raise ValueError(f"{source['process_id']}={pid} but {source['num_processes']}=1: the only "
                       "process has id 0")
    return {**given, "process_id": 0}
  missing = [k for k, v in given.items() if v is None]
  if missing and partial_ok:
    return given
  if missing:
    have = ", ".join(f"{source[k]}={v}" for k, v in given.items() if v is not None)
    need = " and ".join(f"--{k} (or ${ENV_VARS[k]})" for k in missing)
    raise ValueError(f"incomplete multi-process settings: {have} also needs {need}; every process "
                     "gets the same --coordinator_address (host:port of process 0) and "
                     "--num_processes, and its own --process_id in [0, num_processes)")
  if not 0 <= pid < n:
    raise ValueError(f"{source['process_id']}={pid} must be in [0, {n}) for "
                     f"{source['num_processes']}={n}")
  if ":" not in given["coordinator_address"]:
    raise ValueError(f"{source['coordinator_address']}={given['coordinator_address']!r} needs a "
                     "port: host:port of process 0, e.g. 10.0.0.1:1234")
  return given


def _slurm_tasks() -> int:
  if "SLURM_PROCID" not in os.environ or "SLURM_STEP_NODELIST" not in os.environ:
    return 1  # not inside `srun`
  try:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
  except ValueError:
    return 1


def _on_cloud_tpu_vm() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _start(*, how: str, local_device_ids=None, **kwargs) -> bool:
  _enable_cpu_collectives()
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  logging.info("initialising jax.distributed from %s: %s", how,
               {k: v for k, v in kwargs.items() if v is not None} or "auto-detected")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    raise ValueError(f"jax.distributed.initialize from {how} failed ({e}); pass "
                     "--coordinator_address, --num_processes and --process_id explicitly, or "
                     "--num_processes=1 for a single process") from e
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _enable_cpu_collectives():
  """Cross-process collectives on CPU need an implementation (gloo); the default on newer jax."""
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a jax without the option: nothing to choose
    pass
