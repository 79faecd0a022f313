"""The shell text the launcher runs on the TPU workers (through `gcloud ... ssh --command=`).

`setup` installs into the virtual environment ~/bert-jax/venv; a run starts detached (setsid nohup)
in that environment, from ~/bert-jax, its output in ~/bert-logs/RUN.log (~/bert-logs/latest.log
points at the newest); `status` and `stop` find the run with `pgrep`/`pkill -f PROCESS_PATTERN`.
"""

from __future__ import annotations

import base64
import shlex
from typing import Sequence

LOG_DIR = "~/bert-logs"
REMOTE_DIR = "~/bert-jax"
VENV = REMOTE_DIR + "/venv"
# Matches `python -m pretrain` and `python3 -m pretrain`; the bracket keeps pgrep/pkill from
# matching the remote shell that carries the pattern itself.
PROCESS_PATTERN = "[p]ython3? -m pretrain"


def shell_text(command: Sequence[str]) -> str:
  """One argument is shell text as it stands (so `~` and `$HOME` expand on the worker); several
  are quoted word by word."""
  return command[0] if len(command) == 1 else shlex.join(command)


def install_script(wheel_name: str, fetch: str = "", python: str = "python3.11") -> str:
  """Remote shell: a virtual environment ~/bert-jax/venv on `python` (jax >= 0.7 needs Python
  >= 3.11; the TPU images' Ubuntu 22.04 has 3.10, so apt installs it), the wheel with the tpu and
  gcs extras (gcsfs: shards, metrics and TensorBoard on gs://; Orbax writes through TensorStore),
  then the wheel itself forced (the same version may have changed), and the installed configs/
  linked into ~/bert-jax so that `--config=configs/...` works from there."""
  wheel, py = shlex.quote(wheel_name), shlex.quote(python)
  return (f"set -e; cd ~; {fetch}"
          f"if ! command -v {py} >/dev/null; then sudo apt-get update -qq && sudo "
          f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {py} {py}-venv; fi; "
          f"[ -x {VENV}/bin/python ] || {py} -m venv {VENV}; . {VENV}/bin/activate; "
          f"python -m pip install --quiet {shlex.quote('./' + wheel_name + '[tpu,gcs]')}; "
          f"python -m pip install --quiet --no-deps --force-reinstall ./{wheel}; "
          f"mkdir -p {LOG_DIR} {REMOTE_DIR}; ln -sfn \"$(python -c 'import configs, os; "
          f"print(os.path.dirname(configs.__file__))')\" {REMOTE_DIR}/configs; "
          f"echo \"$(hostname): installed in {VENV} ($(python -V))\"")


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


def exec_script(command: Sequence[str]) -> str:
  """Remote shell: `command` from ~/bert-jax (else the home folder), waited for."""
  return f"cd {REMOTE_DIR} 2>/dev/null || cd ~; {shell_text(command)}"


def tail_script(run_name: str | None, lines: int, follow: bool, worker: str) -> str:
  """Remote shell: the last `lines` of a run's log (the latest run's without `run_name`)."""
  log = f"{LOG_DIR}/{run_name or 'latest'}.log"
  tail = f"tail -n {lines}{' -F' if follow else ''} {log}"
  if worker == "all":  # prefix each line with its worker's host name
    tail += " | sed -u \"s/^/$(hostname): /\""
  return tail


def status_script() -> str:
  """Remote shell: the worker's host name and its pretraining process, or `not running`."""
  pattern = shlex.quote(PROCESS_PATTERN)
  return f"echo \"$(hostname): $(pgrep -fa {pattern} || echo not running)\""


def stop_script() -> str:
  """Remote shell: SIGTERM to the pretraining process (it saves a checkpoint and exits)."""
  pattern = shlex.quote(PROCESS_PATTERN)
  return (f"if pkill -TERM -f {pattern}; then echo \"$(hostname): sent SIGTERM\"; "
          "else echo \"$(hostname): not running\"; fi")
