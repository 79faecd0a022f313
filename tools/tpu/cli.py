"""Cloud TPU VM launcher: create a TPU VM (or pod slice), install this project, run, watch, delete.

  python -m tools.tpu create NAME [--queued] [--spot | --reserved | --best_effort]
      [--accelerator_type=v4-32] [--runtime_version=tpu-ubuntu2204-base] [--no-wait]
  python -m tools.tpu setup NAME [--wheel=PATH] [--from_gcs[=gs://BUCKET/DIR/ | gs://.../X.whl]]
  python -m tools.tpu run NAME [--run_name=RUN] -- python3 -m pretrain \\
      --config=configs/pretrain.py:base --workdir=gs://BUCKET/run \\
      --config.data.path=gs://BUCKET/data --config.x=y
  python -m tools.tpu exec NAME [--worker=all|N] -- 'df -h ~'
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
installed `configs/`, so `--config=configs/pretrain.py:VARIANT` works there. Shards and workdir
stay in the bucket (gs:// paths; a local one is warned about): each worker streams only its own
records, nothing is copied to the workers. `stop` sends SIGTERM, on which pretraining saves a
checkpoint and exits; running the same `run` command again resumes.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from tools.tpu import LauncherError
from tools.tpu.commands import (cmd_create, cmd_delete, cmd_exec, cmd_logs, cmd_run, cmd_setup,
                                cmd_status, cmd_stop)
from tools.tpu.defaults import DEFAULTS_ENV, USER_DEFAULTS, load_defaults
from tools.tpu.gcloud import Runner, Target


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
