"""Cloud TPU VM launcher: create a TPU VM (or pod slice), install this project, run, watch, delete.

  python -m tools.tpu create NAME [--queued] [--spot | --reserved | --best_effort]
      [--accelerator_type=v4-32] [--runtime_version=tpu-ubuntu2204-base] [--no-wait]
  python -m tools.tpu setup NAME [--wheel=PATH] [--from_gcs[=gs://BUCKET/DIR/ | gs://.../X.whl]]
  python -m tools.tpu run NAME [--run_name=RUN] -- python3 -m pretrain \\
      --config=configs/pretrain.py:base --workdir=gs://BUCKET/run --config.x=y
  python -m tools.tpu exec NAME [--worker=all|N] -- 'gsutil -m cp -r gs://BUCKET/data ~/bert-jax/'
  python -m tools.tpu logs NAME [--run_name=RUN] [--worker=all|N] [--follow]
  python -m tools.tpu status NAME [--queued]
  python -m tools.tpu stop NAME
  python -m tools.tpu delete NAME [--queued]

Every subcommand takes --project, --zone, --defaults=PATH and --dry-run (print each command,
shell-quoted, and run nothing). Defaults come from a TOML file: --defaults, else $BERT_TPU_DEFAULTS,
else ~/.config/bert-jax/tpu.toml, else built in; flags override them (tools/tpu_defaults.toml is an
example). `gcloud` and `gsutil` are found on PATH, or named by $GCLOUD and $GSUTIL. After `--`,
one argument is shell text run as it stands on the workers; several are quoted word by word.

`setup` installs into the virtual environment ~/bert-jax/venv (Python 3.11). A run starts on every
worker at once, detached (setsid nohup), in that environment, its output in ~/bert-logs/RUN.log on
each worker (~/bert-logs/latest.log points at the newest), from ~/bert-jax where `setup` links the
installed `configs/`, so `--config=configs/pretrain.py:VARIANT` works there. `stop` sends SIGTERM,
on which pretraining saves a checkpoint and exits; running the same `run` command again resumes.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DEFAULTS = os.path.join("~", ".config", "bert-jax", "tpu.toml")
DEFAULTS_ENV = "BERT_TPU_DEFAULTS"
LOG_DIR = "~/bert-logs"
REMOTE_DIR = "~/bert-jax"
VENV = REMOTE_DIR + "/venv"
# Matches `python -m pretrain` and `python3 -m pretrain`; the bracket keeps pgrep/pkill from
# matching the remote shell that carries the pattern itself.
PROCESS_PATTERN = "[p]ython3? -m pretrain"

QUOTA_ERROR = re.compile(r"RESOURCE_EXHAUSTED|no more capacity|[Ii]nsufficient capacity|"
                         r"QUOTA_EXCEEDED|[Qq]uota\b.*(exceeded|limit)|[Ii]nsufficient quota|"
                         r"ZONE_RESOURCE_POOL_EXHAUSTED")
TRANSIENT_PATTERNS = ("unreachable", "Connection refused", "Connection timed out",
                      "Connection reset", "Connection closed", "kex_exchange_identification",
                      "Broken pipe", "UNAVAILABLE", "Temporary failure")
VM_FAILED = ("FAILED", "PREEMPTED", "TERMINATED", "STOPPED", "STOPPING")
QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED")


class LauncherError(Exception):
  """A failure the user can act on; `main` prints it and exits with status 1."""


# ----------------------------------------------------------------------------------------- defaults
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


def _tail(text: str, lines: int = 5) -> str:
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
            f"the workers stayed unreachable; last error:\n{_tail(result.stderr)}\n"
            f"check them with `python -m tools.tpu status {_name_of(argv)}`, or raise --retries")
      delay = self.retry_delay * 2 ** (attempt - 1)
      print(f"tpu: transient failure (exit {result.returncode}); retrying in {delay:g}s "
            f"[{attempt + 1}/{attempts}]", file=sys.stderr, flush=True)
      time.sleep(delay)
    if check and result.returncode != 0:
      raise LauncherError(f"`{shlex.join(argv)}` failed with exit {result.returncode}:\n"
                          f"{_tail(result.stderr)}")
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


# ----------------------------------------------------------------------------------- subcommands
def cmd_create(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  accel = args.accelerator_type or defaults.accelerator_type
  version = args.runtime_version or defaults.runtime_version
  spot = defaults.spot if args.spot is None else args.spot
  if (args.reserved or args.best_effort) and not args.queued:
    raise LauncherError("--reserved and --best_effort need --queued (queued resources)")
  if sum((bool(spot), args.reserved, args.best_effort)) > 1:
    raise LauncherError("choose one of --spot, --reserved and --best_effort"
                        + (f" (spot = true comes from {defaults.source}; pass --no-spot)"
                           if spot and args.spot is None else ""))
  if args.queued:
    require(target.project, "project", "--project", defaults)
    mode = (["--spot"] if spot else ["--reserved"] if args.reserved else
            ["--best-effort"] if args.best_effort else [])
    argv = target.queued("create", f"--node-id={target.name}", f"--accelerator-type={accel}",
                         f"--runtime-version={version}", *mode)
  else:
    argv = target.vm("create", f"--accelerator-type={accel}", f"--version={version}",
                     *(["--spot"] if spot else []))
  result = runner(argv, check=False)
  if result.returncode != 0:
    if is_quota(result.stderr):
      tips = ([] if args.queued else ["--queued (waits in line until capacity frees up)"]) + (
          [] if spot else ["--spot (uses the separate spot quota)"]) + [
          f"another zone that offers {accel} (--zone=ZONE; see `gcloud compute tpus "
          "accelerator-types list --zone=ZONE`)"]
      raise LauncherError(
          f"no quota or capacity for {accel} in zone {target.zone} "
          f"(project {target.project or 'from gcloud config'}):\n{_tail(result.stderr, 3)}\n"
          f"try: {', or '.join(tips)}; quotas: console.cloud.google.com/iam-admin/quotas")
    raise LauncherError(f"`{shlex.join(argv)}` failed with exit {result.returncode}:\n"
                        f"{_tail(result.stderr)}")
  if not args.wait:
    return
  delete = f"python -m tools.tpu delete {target.name}" + (" --queued" if args.queued else "")
  if args.queued:
    wait_until(runner, target.queued("describe", "--format=value(state.state)"), "ACTIVE",
               QUEUED_FAILED, f"queued resource {target.name} ({accel}, {target.zone})",
               f"see `gcloud compute tpus queued-resources describe {target.name} "
               f"--zone={target.zone}`; remove it with `{delete}`",
               args.poll_interval, 24 * 3600 if args.timeout is None else args.timeout)
  else:
    wait_until(runner, target.vm("describe", "--format=value(state)"), "READY", VM_FAILED,
               f"TPU VM {target.name} ({accel}, {target.zone})", f"remove it with `{delete}`",
               args.poll_interval, 1800 if args.timeout is None else args.timeout)
  if not runner.dry_run:
    print(f"tpu: {target.name} is ready; next: python -m tools.tpu setup {target.name}", flush=True)


_NOT_IN_WHEEL = shutil.ignore_patterns(".git", ".venv", ".whl", "workdir", "build", "dist",
                                       "*.egg-info", "__pycache__", ".pytest_cache", "tests")


def _wheel_build_argv(source_dir: str, out_dir: str) -> list[str]:
  return [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out_dir, source_dir]


def build_wheel(runner: Runner) -> str:
  """Builds this project's wheel (no dependencies) from a copy of the tree in a fresh temporary
  folder, so no build/ or stale files are left in (or taken from) the checkout; returns its path."""
  if runner.dry_run:
    tmp = os.path.join(tempfile.gettempdir(), "bert-jax-wheel-XXXX")
    runner(_wheel_build_argv(os.path.join(tmp, "src"), os.path.join(tmp, "dist")))
    return os.path.join(tmp, "dist", "bert_jax-VERSION-py3-none-any.whl")
  tmp = tempfile.mkdtemp(prefix="bert-jax-wheel-")
  source, out_dir = os.path.join(tmp, "src"), os.path.join(tmp, "dist")
  shutil.copytree(REPO, source, ignore=_NOT_IN_WHEEL)
  print(f"tpu: building the wheel of {REPO} in {tmp}", file=sys.stderr, flush=True)
  runner(_wheel_build_argv(source, out_dir))
  shutil.rmtree(source, ignore_errors=True)
  wheels = sorted(f for f in os.listdir(out_dir) if f.endswith(".whl")) if os.path.isdir(
      out_dir) else []
  if len(wheels) != 1:
    raise LauncherError(f"expected one wheel in {out_dir} after `pip wheel`, found {wheels}")
  return os.path.join(out_dir, wheels[0])


def install_script(wheel_name: str, fetch: str = "", python: str = "python3.11") -> str:
  """Remote shell: a virtual environment ~/bert-jax/venv on `python` (jax >= 0.7 needs Python
  >= 3.11; the TPU images' Ubuntu 22.04 has 3.10, so apt installs it), the wheel with the tpu and
  gcs extras (gcsfs: gs:// through fsspec and Orbax) and google-cloud-storage (tensorboardX's gs://
  writer), then the wheel itself forced (the same version may have changed), and the installed
  configs/ linked into ~/bert-jax so that `--config=configs/...` works from there."""
  wheel, py = shlex.quote(wheel_name), shlex.quote(python)
  return (f"set -e; cd ~; {fetch}"
          f"if ! command -v {py} >/dev/null; then sudo apt-get update -qq && sudo "
          f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {py} {py}-venv; fi; "
          f"[ -x {VENV}/bin/python ] || {py} -m venv {VENV}; . {VENV}/bin/activate; "
          f"python -m pip install --quiet {shlex.quote('./' + wheel_name + '[tpu,gcs]')} "
          "google-cloud-storage; "
          f"python -m pip install --quiet --no-deps --force-reinstall ./{wheel}; "
          f"mkdir -p {LOG_DIR} {REMOTE_DIR}; ln -sfn \"$(python -c 'import configs, os; "
          f"print(os.path.dirname(configs.__file__))')\" {REMOTE_DIR}/configs; "
          f"echo \"$(hostname): installed in {VENV} ($(python -V))\"")


def cmd_setup(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  source = args.from_gcs
  if source == "bucket":  # --from_gcs given without a value
    source = require(defaults.bucket, "bucket", "--from_gcs=gs://BUCKET/DIR/", defaults)
    source = source.rstrip("/") + "/wheels/"
  if source is not None and not source.startswith("gs://"):
    raise LauncherError(f"--from_gcs={source} must be a gs:// URL (a .whl, or a folder ending /)")
  if source is not None and source.endswith(".whl"):
    url = source  # already in the bucket
  else:
    wheel = args.wheel or build_wheel(runner)
    if not runner.dry_run and not os.path.isfile(wheel):
      raise LauncherError(f"--wheel={wheel} is not a file")
    if source is None:
      scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", wheel, f"{target.name}:~/",
             *target.where(), "--worker=all"]
      runner(scp, retry=True)
      script = install_script(os.path.basename(wheel), python=args.python)
      runner(target.ssh(script), retry=True)
      return
    url = source.rstrip("/") + "/" + os.path.basename(wheel)
    runner(["gsutil", "cp", wheel, url])
  name = url.rsplit("/", 1)[1]
  fetch = f"gsutil cp {shlex.quote(url)} {name}; "
  runner(target.ssh(install_script(name, fetch, args.python)), retry=True)


def shell_text(command: Sequence[str]) -> str:
  """One argument is shell text as it stands (so `~` and `$HOME` expand on the worker); several
  are quoted word by word."""
  return command[0] if len(command) == 1 else shlex.join(command)


def run_script(run_name: str, command: Sequence[str]) -> str:
  """Remote shell: unless a run is already going (so a retry is safe), write the command to
  ~/bert-logs/RUN.sh and start it detached from the ssh session, output to ~/bert-logs/RUN.log.

  The command travels base64-encoded: were `python3 -m pretrain` spelled out in this script, the
  remote shell running it would match the `pgrep -f` guard itself."""
  log, script = f"{LOG_DIR}/{run_name}.log", f"{LOG_DIR}/{run_name}.sh"
  body = (f"cd {REMOTE_DIR} 2>/dev/null || cd ~\n"
          f"if [ -d {VENV} ]; then . {VENV}/bin/activate; fi\nexec {shell_text(command)}\n")
  encoded = base64.b64encode(body.encode()).decode()
  return (f"mkdir -p {LOG_DIR}; if pgrep -f {shlex.quote(PROCESS_PATTERN)} >/dev/null; then "
          f"echo \"$(hostname): a run is already going, not starting another (tools.tpu stop)\"; "
          f"else echo {encoded} | base64 -d > {script}; "
          f"setsid nohup bash {script} > {log} 2>&1 < /dev/null & "
          f"ln -sfn {run_name}.log {LOG_DIR}/latest.log; echo \"$(hostname): started, log {log}\"; "
          "fi")


def cmd_run(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if not args.command:
    raise LauncherError("no command to run: put it after `--`, e.g. `python -m tools.tpu run "
                        "NAME -- python3 -m pretrain --config=configs/pretrain.py:base "
                        "--workdir=gs://...`")
  try:
    words = shlex.split(args.command[0]) if len(args.command) == 1 else args.command
  except ValueError:
    words = []
  workdir = [a.split("=", 1)[1] for a in words if a.startswith("--workdir=")]
  if workdir and not workdir[0].startswith("gs://"):
    print(f"tpu: warning: --workdir={workdir[0]} is not gs://: each worker writes its own copy and "
          "a new VM loses it", file=sys.stderr)
  run_name = args.run_name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
  print(f"tpu: run {run_name}: {shell_text(args.command)}", file=sys.stderr, flush=True)
  runner(target.ssh(run_script(run_name, args.command)), retry=True)
  print(f"tpu: run {run_name} on every worker of {target.name}; logs in {LOG_DIR}/{run_name}.log "
        f"on each worker; follow: python -m tools.tpu logs {target.name} --run_name={run_name} "
        "--follow", file=sys.stderr, flush=True)


def cmd_exec(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if not args.command:
    raise LauncherError("no command to run: put it after `--`, e.g. `python -m tools.tpu exec "
                        "NAME -- 'gsutil -m cp -r gs://BUCKET/bert/data ~/bert-jax/'`")
  runner(target.ssh(f"cd {REMOTE_DIR} 2>/dev/null || cd ~; {shell_text(args.command)}",
                    args.worker), retry=True)


def cmd_logs(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  log = f"{LOG_DIR}/{args.run_name or 'latest'}.log"
  tail = f"tail -n {args.lines}{' -F' if args.follow else ''} {log}"
  if args.worker == "all":  # prefix each line with its worker's host name
    tail += " | sed -u \"s/^/$(hostname): /\""
  runner(target.ssh(tail, args.worker), retry=True)


def cmd_status(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if args.queued:
    state = runner(target.queued("describe", "--format=value(state.state)"), capture=True,
                   retry=True).stdout.strip()
    ready = "ACTIVE"
  else:
    state = runner(target.vm("describe", "--format=value(state)"), capture=True,
                   retry=True).stdout.strip()
    ready = "READY"
  if not runner.dry_run:
    print(f"tpu: {target.name} ({target.zone}): {state or '?'}", flush=True)
  if state == ready or runner.dry_run:
    pattern = shlex.quote(PROCESS_PATTERN)
    runner(target.ssh(f"echo \"$(hostname): $(pgrep -fa {pattern} || echo not running)\""),
           retry=True)


def cmd_stop(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  pattern = shlex.quote(PROCESS_PATTERN)
  runner(target.ssh(f"if pkill -TERM -f {pattern}; then echo \"$(hostname): sent SIGTERM\"; "
                    "else echo \"$(hostname): not running\"; fi"), retry=True)


def cmd_delete(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if args.queued:
    runner(target.queued("delete", "--force", "--quiet"))
  else:
    runner(target.vm("delete", "--quiet"))


# -------------------------------------------------------------------------------------------- CLI
def _worker(value: str) -> str:
  if not re.fullmatch(r"all|\d+(,\d+)*", value):
    raise argparse.ArgumentTypeError(f"--worker={value}: use all, N or N,M,...")
  return value


def _run_name(value: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
    raise argparse.ArgumentTypeError(f"--run_name={value}: use letters, digits, '.', '_' and '-'")
  return value


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU VM name (also the queued resource's name)")
  common.add_argument("--defaults", help=f"defaults TOML (else ${DEFAULTS_ENV}, {USER_DEFAULTS})")
  common.add_argument("--project")
  common.add_argument("--zone")
  common.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print each command instead of running it")
  common.add_argument("--retries", type=int, default=3, help="retries of unreachable workers")
  common.add_argument("--retry_delay", type=float, default=5.0, help="first backoff, seconds")
  parser = argparse.ArgumentParser(prog="python -m tools.tpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="subcommand", required=True)

  create = sub.add_parser("create", parents=[common], help="create a TPU VM and wait until ready")
  create.add_argument("--accelerator_type", "--accelerator-type")
  create.add_argument("--runtime_version", "--runtime-version", "--version")
  create.add_argument("--queued", action="store_true", help="a queued resource, not a plain VM")
  create.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None)
  create.add_argument("--reserved", action="store_true", help="queued: use a reservation")
  create.add_argument("--best_effort", "--best-effort", action="store_true", help="queued only")
  create.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True)
  create.add_argument("--poll_interval", type=float, default=30.0, help="seconds between polls")
  create.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait (default 1800; queued 86400)")

  setup = sub.add_parser("setup", parents=[common], help="install this project on every worker")
  setup.add_argument("--python", default="python3.11",
                     help="the workers' Python for ~/bert-jax/venv (>= 3.11; default python3.11)")
  setup.add_argument("--wheel", help="a built wheel to install (default: build one with pip)")
  setup.add_argument("--from_gcs", nargs="?", const="bucket", default=None,
                     help="install from gs://.../X.whl, or upload to gs://DIR/ first "
                          "(no value: gs://BUCKET/wheels/ from the defaults file)")

  run = sub.add_parser("run", parents=[common], help="start COMMAND (after --) on every worker")
  run.add_argument("--run_name", type=_run_name, help="default: run-YYYYmmdd-HHMMSS (UTC)")

  exec_ = sub.add_parser("exec", parents=[common],
                         help="run COMMAND (after --) on the workers and wait for it")
  exec_.add_argument("--worker", type=_worker, default="all", help="all, N or N,M (default all)")

  logs = sub.add_parser("logs", parents=[common], help="tail a run's log")
  logs.add_argument("--run_name", type=_run_name, help="default: the latest run")
  logs.add_argument("--worker", type=_worker, default="0", help="all, N or N,M (default 0)")
  logs.add_argument("--follow", "-f", action="store_true")
  logs.add_argument("--lines", type=int, default=100)

  for verb, text in (("status", "state and whether pretraining runs on each worker"),
                     ("delete", "delete the TPU VM or queued resource")):
    p = sub.add_parser(verb, parents=[common], help=text)
    p.add_argument("--queued", action="store_true", help="NAME is a queued resource")
  sub.add_parser("stop", parents=[common], help="SIGTERM the run on every worker (it checkpoints)")
  return parser


COMMANDS = {"create": cmd_create, "setup": cmd_setup, "run": cmd_run, "exec": cmd_exec,
            "logs": cmd_logs,
            "status": cmd_status, "stop": cmd_stop, "delete": cmd_delete}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = []
  if "--" in argv:  # everything after the first `--` is the remote command of `run`
    argv, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  args = build_parser().parse_args(argv)
  args.command = command
  if command and args.subcommand not in ("run", "exec"):
    print(f"error: only run and exec take a command after --, not {args.subcommand}",
          file=sys.stderr)
    return 2
  try:
    defaults = load_defaults(args.defaults)
    target = Target(args.name, args.zone or defaults.zone, args.project or defaults.project)
    runner = Runner(args.dry_run, max(0, args.retries), args.retry_delay)
    COMMANDS[args.subcommand](args, target, runner, defaults)
  except LauncherError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
