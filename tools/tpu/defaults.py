"""The launcher's defaults: a TOML file (tools/tpu_defaults.toml is an example) that flags override.

The file is --defaults, else $BERT_TPU_DEFAULTS, else ~/.config/bert-jax/tpu.toml, else the built-in
values; unknown keys and values of the wrong type are errors naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib

from tools.tpu import LauncherError

USER_DEFAULTS = os.path.join("~", ".config", "bert-jax", "tpu.toml")
DEFAULTS_ENV = "BERT_TPU_DEFAULTS"


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Values flags fall back to; `source` names the TOML file they came from ("built-in" if none)."""
  project: str | None = None
  zone: str = "us-central2-b"
  accelerator_type: str = "v4-8"
  runtime_version: str = "tpu-ubuntu2204-base"
  bucket: str | None = None
  spot: bool = False
  source: str = "built-in"


_TOML_TYPES = {"project": str, "zone": str, "accelerator_type": str, "runtime_version": str,
               "bucket": str, "spot": bool}


def defaults_path(flag: str | None) -> tuple[str | None, str]:
  """The defaults file to read and why: --defaults, else $BERT_TPU_DEFAULTS, else the user file."""
  if flag:
    return flag, "--defaults"
  if os.environ.get(DEFAULTS_ENV):
    return os.environ[DEFAULTS_ENV], f"${DEFAULTS_ENV}"
  user = os.path.expanduser(USER_DEFAULTS)
  return (user, USER_DEFAULTS) if os.path.exists(user) else (None, "built-in")


def load_defaults(flag: str | None = None) -> Defaults:
  """Reads the chosen TOML file; unknown keys and wrong types are errors naming the file and key."""
  path, origin = defaults_path(flag)
  if path is None:
    return Defaults()
  try:
    with open(path, "rb") as f:
      table = tomllib.load(f)
  except FileNotFoundError:
    raise LauncherError(f"defaults file {path} (from {origin}) does not exist") from None
  except tomllib.TOMLDecodeError as e:
    raise LauncherError(f"defaults file {path} is not valid TOML: {e}") from None
  for key, value in table.items():
    if key not in _TOML_TYPES:
      raise LauncherError(f"defaults file {path}: unknown key {key!r}; "
                          f"known keys: {', '.join(sorted(_TOML_TYPES))}")
    if not isinstance(value, _TOML_TYPES[key]) or (isinstance(value, str) and not value):
      raise LauncherError(f"defaults file {path}: key {key!r} = {value!r} must be a non-empty "
                          f"{_TOML_TYPES[key].__name__}")
  if "bucket" in table and not table["bucket"].startswith("gs://"):
    table["bucket"] = "gs://" + table["bucket"]
  return Defaults(**table, source=path)


def require(value, key: str, flag: str, defaults: Defaults):
  """`value`, or an error saying which flag or defaults-file key would set it."""
  if value in (None, ""):
    where = (f"add `{key} = ...` to {defaults.source}" if defaults.source != "built-in" else
             f"set `{key}` in a defaults file (--defaults, ${DEFAULTS_ENV} or {USER_DEFAULTS})")
    raise LauncherError(f"{key} is not set: pass {flag} or {where}")
  return value
