"""Running `gcloud` and `gsutil` for the launcher: the argv of each TPU command, a runner that
prints instead under --dry-run and retries unreachable workers, and polling until a TPU is ready.

Commands are argv lists, never run through a local shell. `gcloud` and `gsutil` are found on PATH,
or named by $GCLOUD and $GSUTIL.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Sequence

from tools.tpu import LauncherError

QUOTA_ERROR = re.compile(r"RESOURCE_EXHAUSTED|no more capacity|[Ii]nsufficient capacity|"
                         r"QUOTA_EXCEEDED|[Qq]uota\b.*(exceeded|limit)|[Ii]nsufficient quota|"
                         r"ZONE_RESOURCE_POOL_EXHAUSTED")
TRANSIENT_PATTERNS = ("unreachable", "Connection refused", "Connection timed out",
                      "Connection reset", "Connection closed", "kex_exchange_identification",
                      "Broken pipe", "UNAVAILABLE", "Temporary failure")


# ------------------------------------------------------------------------------------------- runner
@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str
  stderr: str


def is_transient(result: Result) -> bool:
  """ssh's own failure status (255) or an error that a retry may get past."""
  return result.returncode == 255 or any(p in result.stderr for p in TRANSIENT_PATTERNS)


def is_quota(stderr: str) -> bool:
  return QUOTA_ERROR.search(stderr) is not None


def stderr_tail(text: str, lines: int = 5) -> str:
  """The last `lines` lines of `text`, indented, for error messages."""
  return "\n".join("  " + line for line in text.strip().splitlines()[-lines:])


class Runner:
  """Runs argv lists (never through a local shell), prints them instead under --dry-run, retries
  transient failures `retries` times with exponential backoff from `retry_delay` seconds."""

  def __init__(self, dry_run: bool = False, retries: int = 3, retry_delay: float = 5.0):
    self.dry_run, self.retries, self.retry_delay = dry_run, retries, retry_delay

  def _executable(self, name: str) -> str:
    env = {"gcloud": "GCLOUD", "gsutil": "GSUTIL"}.get(name)
    wanted = os.environ.get(env, name) if env else name
    found = shutil.which(wanted)
    if found is None:
      hint = f" (set ${env} to its path, or install the Google Cloud SDK)" if env else ""
      raise LauncherError(f"{wanted!r} was not found on PATH{hint}")
    return found

  def _once(self, argv: list[str], capture: bool) -> Result:
    try:
      proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE)
    except OSError as e:
      raise LauncherError(f"cannot start {argv[0]}: {e}") from None
    if capture:
      out, err = proc.communicate()
      sys.stderr.write(err.decode(errors="replace"))
      return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    chunks = []  # stream stderr through (gcloud's prompts, ssh errors) and keep it to classify
    while chunk := os.read(proc.stderr.fileno(), 4096):
      chunks.append(chunk)
      sys.stderr.write(chunk.decode(errors="replace"))
      sys.stderr.flush()
    return Result(proc.wait(), "", b"".join(chunks).decode(errors="replace"))

  def __call__(self, argv: list[str], *, capture: bool = False, retry: bool = False,
               check: bool = True) -> Result:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return Result(0, "", "")
    full = [self._executable(argv[0])] + argv[1:]
    attempts = 1 + (self.retries if retry else 0)
    for attempt in range(1, attempts + 1):
      result = self._once(full, capture)
      if result.returncode == 0 or not (retry and is_transient(result)):
        break
      if attempt == attempts:
        raise LauncherError(
            f"gave up after {attempts} tries of `{shlex.join(argv)}` (exit {result.returncode}); "
            f"the workers stayed unreachable; last error:\n{stderr_tail(result.stderr)}\n"
            f"check them with `python -m tools.tpu status {_name_of(argv)}`, or raise --retries")
      delay = self.retry_delay * 2 ** (attempt - 1)
      print(f"tpu: transient failure (exit {result.returncode}); retrying in {delay:g}s "
            f"[{attempt + 1}/{attempts}]", file=sys.stderr, flush=True)
      time.sleep(delay)
    if check and result.returncode != 0:
      raise LauncherError(f"`{shlex.join(argv)}` failed with exit {result.returncode}:\n"
                          f"{stderr_tail(result.stderr)}")
    return result


def _name_of(argv: list[str]) -> str:
  """The TPU name in a gcloud argv, for hints in messages."""
  if "scp" in argv:
    return next((a.split(":")[0] for a in argv if a.endswith(":~/")), "NAME")
  verbs = ("ssh", "describe", "create", "delete")
  i = next((i for i, a in enumerate(argv) if a in verbs), len(argv) - 2)
  return argv[i + 1].split(":")[0] if i + 1 < len(argv) else "NAME"


# ------------------------------------------------------------------------------------- gcloud argv
@dataclasses.dataclass(frozen=True)
class Target:
  """Which TPU VM (or queued resource of the same name) a command acts on."""
  name: str
  zone: str
  project: str | None

  def where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def vm(self, verb: str, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, *self.where(), *args]

  def queued(self, verb: str, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, self.name, *self.where(), *args]

  def ssh(self, script: str, worker: str = "all") -> list[str]:
    return self.vm("ssh", f"--worker={worker}", f"--command={script}")


def wait_until(runner: Runner, argv: list[str], ready: str, failed: Sequence[str],
               what: str, hint: str, poll_interval: float, timeout: float) -> None:
  """Polls `argv` (a describe printing one state) until it prints `ready`, fails or times out."""
  deadline, last = time.monotonic() + timeout, None
  while True:
    state = runner(argv, capture=True, retry=True).stdout.strip()
    if runner.dry_run:
      return
    if state != last:
      print(f"tpu: {what} is {state or '(no state yet)'}", file=sys.stderr, flush=True)
      last = state
    if state == ready:
      return
    if state in failed:
      raise LauncherError(f"{what} is {state}; {hint}")
    if time.monotonic() >= deadline:
      raise LauncherError(f"{what} is still {state or 'not ready'} after {timeout:g}s "
                          f"(--timeout); {hint}")
    time.sleep(poll_interval)
