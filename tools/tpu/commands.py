"""The launcher's subcommands: create, setup, run, exec, logs, status, stop and delete.

Each takes the parsed flags, the Target (TPU name, zone, project), the Runner and the Defaults, and
raises LauncherError for what the user can act on. `setup` builds this project's wheel here (or
takes --wheel, or a gs:// one) and installs it on every worker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time

from tools.tpu import LauncherError
from tools.tpu.defaults import Defaults, require
from tools.tpu.gcloud import Runner, Target, is_quota, stderr_tail, wait_until
from tools.tpu.remote import (LOG_DIR, exec_script, install_script, run_script, shell_text,
                              status_script, stop_script, tail_script)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VM_FAILED = ("FAILED", "PREEMPTED", "TERMINATED", "STOPPED", "STOPPING")
QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED")


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
          f"(project {target.project or 'from gcloud config'}):\n"
          f"{stderr_tail(result.stderr, 3)}\n"
          f"try: {', or '.join(tips)}; quotas: console.cloud.google.com/iam-admin/quotas")
    raise LauncherError(f"`{shlex.join(argv)}` failed with exit {result.returncode}:\n"
                        f"{stderr_tail(result.stderr)}")
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


# ------------------------------------------------------------------------------------------ setup
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


# -------------------------------------------------------------------------------- run and watch
def _local_path_warnings(command: list[str]) -> list[str]:
  """Warnings for a workdir or shard directory that is not on gs://: each worker would need (or
  write) its own copy, which a new VM loses; on gs:// each worker streams only its own records."""
  try:
    words = shlex.split(command[0]) if len(command) == 1 else command
  except ValueError:
    return []
  found = {}
  for word in words:
    flag, _, value = word.partition("=")
    if flag in ("--workdir", "--config.data.path") and value:
      found[flag] = value
  out = []
  if "--workdir" in found and not found["--workdir"].startswith("gs://"):
    out.append(f"--workdir={found['--workdir']} is not gs://: each worker writes its own copy and "
               "a new VM loses it")
  if "--config.data.path" in found and not found["--config.data.path"].startswith("gs://"):
    out.append(f"--config.data.path={found['--config.data.path']} is not gs://: every worker needs "
               "its own copy of the shards; on gs:// each worker reads only its own records")
  return out


def cmd_run(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if not args.command:
    raise LauncherError("no command to run: put it after `--`, e.g. `python -m tools.tpu run "
                        "NAME -- python3 -m pretrain --config=configs/pretrain.py:base "
                        "--workdir=gs://... --config.data.path=gs://...`")
  for warning in _local_path_warnings(args.command):
    print(f"tpu: warning: {warning}", file=sys.stderr)
  run_name = args.run_name or time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
  print(f"tpu: run {run_name}: {shell_text(args.command)}", file=sys.stderr, flush=True)
  runner(target.ssh(run_script(run_name, args.command)), retry=True)
  print(f"tpu: run {run_name} on every worker of {target.name}; logs in {LOG_DIR}/{run_name}.log "
        f"on each worker; follow: python -m tools.tpu logs {target.name} --run_name={run_name} "
        "--follow", file=sys.stderr, flush=True)


def cmd_exec(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if not args.command:
    raise LauncherError("no command to run: put it after `--`, e.g. `python -m tools.tpu exec "
                        "NAME -- 'df -h ~'`")
  runner(target.ssh(exec_script(args.command), args.worker), retry=True)


def cmd_logs(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  script = tail_script(args.run_name, args.lines, args.follow, args.worker)
  runner(target.ssh(script, args.worker), retry=True)


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
    runner(target.ssh(status_script()), retry=True)


def cmd_stop(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  runner(target.ssh(stop_script()), retry=True)


def cmd_delete(args, target: Target, runner: Runner, defaults: Defaults) -> None:
  if args.queued:
    runner(target.queued("delete", "--force", "--quiet"))
  else:
    runner(target.vm("delete", "--quiet"))
