"""tools/tpu/ (`python -m tools.tpu`) against a stand-in `gcloud`: the argv of every call, polling,
errors, retries.

The stand-in is a small Python script put first on PATH (as `gcloud` and `gsutil`). It appends each
call's argv as a JSON line to calls.jsonl and answers from responses.json: the first rule whose
`match` is a substring of the joined argv gives the next of its `answers` (the last one repeats),
each an exit code with stdout and stderr. Nothing here reaches Google Cloud or builds a real wheel.
"""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from tools.tpu import cli, commands, remote
from tools.tpu import defaults as defaults_lib

STUB = """#!{python}
import json, os, sys
folder = os.environ["FAKE_GCLOUD_DIR"]
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
with open(os.path.join(folder, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\\n")
rules_path, state_path = (os.path.join(folder, n) for n in ("responses.json", "state.json"))
rules = json.load(open(rules_path)) if os.path.exists(rules_path) else []
state = json.load(open(state_path)) if os.path.exists(state_path) else {{}}
for i, rule in enumerate(rules):
  if rule["match"] in " ".join(argv):
    n = state.get(str(i), 0)
    state[str(i)] = n + 1
    json.dump(state, open(state_path, "w"))
    answer = rule["answers"][min(n, len(rule["answers"]) - 1)]
    sys.stdout.write(answer.get("stdout", ""))
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer.get("rc", 0))
"""

DEFAULTS = """project = "my-proj"
zone = "europe-west4-a"
accelerator_type = "v4-32"
runtime_version = "tpu-ubuntu2204-base"
bucket = "my-bucket"
"""
Z, P = "--zone=europe-west4-a", "--project=my-proj"
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
PRETRAIN = ["python3", "-m", "pretrain", "--config=configs/pretrain.py:base",
            "--workdir=gs://my-bucket/run", "--config.data.path=gs://my-bucket/data",
            "--config.train.global_batch_size=1024"]
UNREACHABLE = {"rc": 255, "stderr": "ssh: connect to host 10.0.0.3 port 22: Connection refused\n"}


class FakeGcloud:
  """The stand-in's folder: script the answers, read back the calls."""

  def __init__(self, folder):
    self.folder = folder
    self.bin = folder / "bin"
    self.bin.mkdir()
    for name in ("gcloud", "gsutil", "mygcloud"):
      (self.bin / name).write_text(STUB.format(python=sys.executable))
      (self.bin / name).chmod(0o755)
    self.defaults = folder / "tpu.toml"
    self.defaults.write_text(DEFAULTS)

  def respond(self, *rules):
    """rules: (match, [answer, ...]) with answers as dicts of rc/stdout/stderr."""
    (self.folder / "responses.json").write_text(
        json.dumps([{"match": m, "answers": a} for m, a in rules]))

  def calls(self):
    path = self.folder / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  def main(self, *argv):
    """tools.tpu.cli's main with the test defaults file and no waiting between polls or retries."""
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    extra = ["--defaults", str(self.defaults), "--retry_delay=0"]
    extra += ["--poll_interval=0"] if args[0] == "create" else []
    return cli.main(args[:split] + extra + args[split:])


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
  fake = FakeGcloud(tmp_path)
  monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for name in ("GCLOUD", "GSUTIL", defaults_lib.DEFAULTS_ENV):
    monkeypatch.delenv(name, raising=False)
  return fake


def ssh(name, script, worker="all", where=(Z, P)):
  return VM + ["ssh", name, *where, f"--worker={worker}", f"--command={script}"]


def test_vm_life_cycle(gcloud, tmp_path, capfd):
  gcloud.respond(("describe", [{"stdout": "CREATING\n"}, {"stdout": "READY\n"}]))
  wheel = tmp_path / "bert_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"zip")
  assert gcloud.main("create", "tpu1") == 0
  err = capfd.readouterr().err
  assert "TPU VM tpu1 (v4-32, europe-west4-a) is CREATING" in err and "is READY" in err
  assert gcloud.main("setup", "tpu1", f"--wheel={wheel}") == 0
  assert gcloud.main("exec", "tpu1", "--", "df -h ~") == 0
  assert gcloud.main("run", "tpu1", "--run_name=r1", "--", *PRETRAIN) == 0
  err = capfd.readouterr().err
  assert "logs in ~/bert-logs/r1.log on each worker" in err and "warning" not in err
  assert gcloud.main("logs", "tpu1", "--run_name=r1") == 0
  assert gcloud.main("status", "tpu1") == 0
  assert gcloud.main("stop", "tpu1") == 0
  assert gcloud.main("delete", "tpu1") == 0
  describe = VM + ["describe", "tpu1", Z, P, "--format=value(state)"]
  assert gcloud.calls() == [
      VM + ["create", "tpu1", Z, P, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"],
      describe, describe,
      VM + ["scp", str(wheel), "tpu1:~/", Z, P, "--worker=all"],
      ssh("tpu1", remote.install_script(wheel.name)),
      ssh("tpu1", "cd ~/bert-jax 2>/dev/null || cd ~; df -h ~"),
      ssh("tpu1", remote.run_script("r1", PRETRAIN)),
      ssh("tpu1", "tail -n 100 ~/bert-logs/r1.log", worker="0"),
      describe,
      ssh("tpu1",
          "echo \"$(hostname): $(pgrep -fa '[p]ython3? -m pretrain' || echo not running)\""),
      ssh("tpu1", "if pkill -TERM -f '[p]ython3? -m pretrain'; then echo \"$(hostname): sent "
                  "SIGTERM\"; else echo \"$(hostname): not running\"; fi"),
      VM + ["delete", "tpu1", Z, P, "--quiet"],
  ]


def test_queued_life_cycle(gcloud):
  gcloud.respond(("queued-resources describe", [{"stdout": "WAITING_FOR_RESOURCES\n"},
                                                {"stdout": "PROVISIONING\n"},
                                                {"stdout": "ACTIVE\n"}]))
  url = "gs://my-bucket/wheels/bert_jax-0.1.0-py3-none-any.whl"
  assert gcloud.main("create", "pod", "--queued", "--spot", "--accelerator_type=v4-64") == 0
  assert gcloud.main("setup", "pod", f"--from_gcs={url}", "--python=python3.12") == 0
  assert gcloud.main("run", "pod", "--run_name=r2", "--", *PRETRAIN) == 0
  assert gcloud.main("logs", "pod", "--worker=all", "--follow", "--lines=20") == 0
  assert gcloud.main("delete", "pod", "--queued") == 0
  describe = QR + ["describe", "pod", Z, P, "--format=value(state.state)"]
  wheel = "bert_jax-0.1.0-py3-none-any.whl"
  assert gcloud.calls() == [
      QR + ["create", "pod", Z, P, "--node-id=pod", "--accelerator-type=v4-64",
            "--runtime-version=tpu-ubuntu2204-base", "--spot"],
      describe, describe, describe,
      ssh("pod", remote.install_script(wheel, f"gsutil cp {url} {wheel}; ", "python3.12")),
      ssh("pod", remote.run_script("r2", PRETRAIN)),
      ssh("pod", "tail -n 20 -F ~/bert-logs/latest.log | sed -u \"s/^/$(hostname): /\""),
      QR + ["delete", "pod", Z, P, "--force", "--quiet"],
  ]


def test_remote_scripts_say_what_they_run():
  script = remote.run_script("r1", PRETRAIN)
  encoded = re.search(r"echo (\S+) \| base64 -d > ~/bert-logs/r1\.sh", script).group(1)
  assert base64.b64decode(encoded).decode() == (
      "cd ~/bert-jax 2>/dev/null || cd ~\n"
      "if [ -d ~/bert-jax/venv ]; then . ~/bert-jax/venv/bin/activate; fi\n"
      "exec " + shlex.join(PRETRAIN) + "\n")
  assert "setsid nohup bash ~/bert-logs/r1.sh > ~/bert-logs/r1.log 2>&1 < /dev/null &" in script
  assert "python3 -m pretrain" not in script  # else the remote shell would match its own guard
  install = remote.install_script("w.whl", python="python3.12")
  assert "apt-get install -y -qq python3.12 python3.12-venv" in install
  assert "python3.12 -m venv ~/bert-jax/venv; . ~/bert-jax/venv/bin/activate" in install
  assert "python -m pip install --quiet './w.whl[tpu,gcs]';" in install
  assert "--no-deps --force-reinstall ./w.whl" in install
  for text in (script, install, remote.install_script("w.whl", "gsutil cp gs://b/w.whl w.whl; ")):
    subprocess.run(["bash", "-n", "-c", text], check=True)  # valid shell


def test_one_argument_is_shell_text(gcloud, capfd):
  command = "python3 -m pretrain --workdir=/tmp/w --config.data.path=$HOME/data"
  assert gcloud.main("run", "t", "--run_name=r", "--", command) == 0
  script = gcloud.calls()[0][-1]
  encoded = re.search(r"echo (\S+) \| base64 -d", script).group(1)
  body = base64.b64decode(encoded).decode()
  assert body.endswith(f"\nexec {command}\n")
  err = capfd.readouterr().err
  assert "--workdir=/tmp/w is not gs://" in err
  assert ("--config.data.path=$HOME/data is not gs://: every worker needs its own copy of the "
          "shards; on gs:// each worker reads only its own records") in err
  assert gcloud.main("exec", "t", "--worker=1", "--", "ls", "~/a b") == 0
  assert gcloud.calls()[1] == ssh("t", "cd ~/bert-jax 2>/dev/null || cd ~; ls '~/a b'", worker="1")


def test_run_script_detaches_guards_and_stops(tmp_path, monkeypatch):
  """The run/status/stop scripts for real in bash, with a stand-in for `python3 -m pretrain`."""
  token = uuid.uuid4().hex[:12]
  monkeypatch.setattr(remote, "PROCESS_PATTERN", f"[z]zfakebert --token={token}")
  (tmp_path / "bin").mkdir()
  fake = tmp_path / "bin" / "zzfakebert"
  fake.write_text("#!/bin/bash\necho \"started $* in $PWD\"\n"
                  "trap 'echo stopping; exit 0' TERM\nwhile true; do sleep 0.1; done\n")
  fake.chmod(0o755)
  env = dict(os.environ, HOME=str(tmp_path), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")

  def worker(script):
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=10, check=True).stdout
  command = ["zzfakebert", f"--token={token}", "two words"]
  pattern = shlex.quote(remote.PROCESS_PATTERN)
  try:
    assert "started, log ~/bert-logs/r1.log" in worker(remote.run_script("r1", command))
    assert "already going" in worker(remote.run_script("r2", command))
    for _ in range(50):
      if "started" in (tmp_path / "bert-logs" / "latest.log").read_text():
        break
      time.sleep(0.1)
    assert "sent SIGTERM" in worker(f"if pkill -TERM -f {pattern}; then echo \"$(hostname): sent "
                                    f"SIGTERM\"; else echo not running; fi")
    for _ in range(50):
      if "stopping" in (tmp_path / "bert-logs" / "r1.log").read_text():
        break
      time.sleep(0.1)
    log = (tmp_path / "bert-logs" / "r1.log").read_text()
    assert f"started --token={token} two words in {tmp_path}" in log and "stopping" in log
    assert not (tmp_path / "bert-logs" / "r2.log").exists()
  finally:  # whatever happened, leave no stand-in running: only processes with this run's token
    pids = subprocess.run(["pgrep", "-f", remote.PROCESS_PATTERN], capture_output=True, text=True)
    for pid in pids.stdout.split():
      subprocess.run(["kill", pid], check=False)


def test_capacity_error_is_named_and_not_waited_on(gcloud, capfd):
  gcloud.respond(("tpu-vm create", [{"rc": 1, "stderr":
      "ERROR: (gcloud.compute.tpus.tpu-vm.create) {\"code\": 8, \"message\": \"There is no more "
      "capacity in the zone \\\"europe-west4-a\\\"; you can try in another zone\"}\n"}]))
  assert gcloud.main("create", "tpu1") == 1
  err = capfd.readouterr().err
  assert "error: no quota or capacity for v4-32 in zone europe-west4-a" in err
  assert "--queued" in err and "--spot" in err and "--zone=ZONE" in err
  assert len(gcloud.calls()) == 1  # no describe, no retry of a create


def test_quota_error(gcloud, capfd):
  gcloud.respond(("queued-resources create", [{"rc": 1, "stderr": "ERROR: RESOURCE_EXHAUSTED: "
                                               "Quota 'TPUV4PodPerProjectPerZone' exceeded\n"}]))
  assert gcloud.main("create", "pod", "--queued") == 1
  err = capfd.readouterr().err
  assert "no quota or capacity for v4-32 in zone europe-west4-a" in err
  assert "Quota 'TPUV4PodPerProjectPerZone' exceeded" in err
  assert "try: --spot" in err and "--queued (" not in err  # suggests only what is not in use


@pytest.mark.parametrize("state, words", [("FAILED", "queued-resources describe pod"),
                                          ("SUSPENDED", "tools.tpu delete pod --queued")])
def test_queued_resource_that_fails(gcloud, capfd, state, words):
  gcloud.respond(("queued-resources describe", [{"stdout": "PROVISIONING\n"},
                                                {"stdout": state + "\n"}]))
  assert gcloud.main("create", "pod", "--queued") == 1
  err = capfd.readouterr().err
  assert f"error: queued resource pod (v4-32, europe-west4-a) is {state}" in err and words in err


def test_wait_times_out(gcloud, capfd):
  gcloud.respond(("describe", [{"stdout": "CREATING\n"}]))
  assert gcloud.main("create", "tpu1", "--timeout=0") == 1
  assert "is still CREATING after 0s (--timeout)" in capfd.readouterr().err


def test_unreachable_worker_is_retried(gcloud, capfd):
  gcloud.respond(("tpu-vm ssh", [UNREACHABLE, UNREACHABLE, {"stdout": "w: started\n"}]))
  assert gcloud.main("run", "tpu1", "--run_name=r1", "--", *PRETRAIN) == 0
  assert gcloud.calls() == [ssh("tpu1", remote.run_script("r1", PRETRAIN))] * 3
  out, err = capfd.readouterr()
  assert "w: started" in out and err.count("transient failure (exit 255)") == 2


def test_unreachable_worker_gives_up(gcloud, capfd):
  gcloud.respond(("tpu-vm ssh", [UNREACHABLE]))
  assert gcloud.main("stop", "tpu1", "--retries=2") == 1
  assert len(gcloud.calls()) == 3
  err = capfd.readouterr().err
  assert "error: gave up after 3 tries" in err and "Connection refused" in err
  assert "python -m tools.tpu status tpu1" in err


def test_other_failures_are_not_retried(gcloud, capfd):
  gcloud.respond(("tpu-vm ssh", [{"rc": 1, "stderr": "ERROR: NOT_FOUND: tpu1\n"}]))
  assert gcloud.main("logs", "tpu1") == 1
  assert len(gcloud.calls()) == 1 and "NOT_FOUND: tpu1" in capfd.readouterr().err


def test_dry_run_prints_and_calls_nothing(gcloud, capfd):
  for argv in (["create", "pod", "--queued", "--best_effort"], ["setup", "pod"],
               ["setup", "pod", "--from_gcs"], ["run", "pod", "--", *PRETRAIN],
               ["logs", "pod"], ["status", "pod", "--queued"], ["stop", "pod"],
               ["delete", "pod"]):
    assert gcloud.main(*argv[:2], "--dry-run", *argv[2:]) == 0, argv
  assert gcloud.calls() == []
  lines = [shlex.split(l) for l in capfd.readouterr().out.splitlines()]
  assert lines[0] == QR + ["create", "pod", Z, P, "--node-id=pod", "--accelerator-type=v4-32",
                           "--runtime-version=tpu-ubuntu2204-base", "--best-effort"]
  assert lines[1] == QR + ["describe", "pod", Z, P, "--format=value(state.state)"]
  assert lines[2][1:5] == ["-m", "pip", "wheel", "--no-deps"]  # the build, printed, not run
  assert lines[3][:5] == VM + ["scp"]
  assert lines[6] == ["gsutil", "cp", lines[6][2],
                      "gs://my-bucket/wheels/bert_jax-VERSION-py3-none-any.whl"]
  assert lines[-1] == VM + ["delete", "pod", Z, P, "--quiet"]
  assert len(lines) == 14


def test_builds_the_wheel_when_none_is_given(gcloud, monkeypatch):
  """The build path with a stubbed builder: a tiny script that writes a wheel where pip would."""
  def fake_build(source_dir, out_dir):
    assert os.path.exists(os.path.join(source_dir, "setup.py"))
    assert not os.path.exists(os.path.join(source_dir, ".venv"))
    return [sys.executable, "-c", "import os, sys; os.makedirs(sys.argv[1]); open(os.path.join("
            "sys.argv[1], 'bert_jax-0.1.0-py3-none-any.whl'), 'w').close()", out_dir]
  monkeypatch.setattr(commands, "_wheel_build_argv", fake_build)
  monkeypatch.setattr(tempfile, "tempdir", str(gcloud.folder))  # the build folder goes there
  assert gcloud.main("setup", "tpu1", "--from_gcs") == 0
  (cp, install), name = gcloud.calls(), "bert_jax-0.1.0-py3-none-any.whl"
  assert cp[:2] == ["gsutil", "cp"] and cp[2].endswith("/dist/" + name) and os.path.isfile(cp[2])
  assert cp[2].startswith(str(gcloud.folder))
  url = "gs://my-bucket/wheels/" + name
  assert cp[3] == url
  assert install == ssh("tpu1", remote.install_script(name, f"gsutil cp {url} {name}; "))


def test_defaults_precedence(gcloud, tmp_path, monkeypatch):
  def write(path, zone):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'zone = "{zone}"\nspot = true\n')
    return str(path)
  assert defaults_lib.load_defaults() == defaults_lib.Defaults()  # nothing anywhere: built in
  assert defaults_lib.Defaults().zone == "us-central2-b"
  write(tmp_path / "home" / ".config" / "bert-jax" / "tpu.toml", "home-zone")
  assert defaults_lib.load_defaults().zone == "home-zone"
  monkeypatch.setenv(defaults_lib.DEFAULTS_ENV, write(tmp_path / "env.toml", "env-zone"))
  assert defaults_lib.load_defaults().zone == "env-zone"
  flag = write(tmp_path / "flag.toml", "flag-zone")
  defaults = defaults_lib.load_defaults(flag)
  assert (defaults.zone, defaults.spot, defaults.accelerator_type) == ("flag-zone", True, "v4-8")
  assert cli.main(["create", "t", "--defaults", flag, "--dry-run", "--no-wait"]) == 0
  assert gcloud.calls() == []


def test_defaults_precedence_on_the_command_line(gcloud, capfd):
  assert gcloud.main("create", "t", "--dry-run", "--no-wait", "--zone=z9", "--spot",
                     "--accelerator_type=v5p-8", "--project=p") == 0
  assert shlex.split(capfd.readouterr().out) == VM + [
      "create", "t", "--zone=z9", "--project=p", "--accelerator-type=v5p-8",
      "--version=tpu-ubuntu2204-base", "--spot"]


@pytest.mark.parametrize("text, message", [
    ('zone = "z"\nacelerator_type = "v4-8"\n', "unknown key 'acelerator_type'; known keys:"),
    ("spot = \"yes\"\n", "key 'spot' = 'yes' must be a non-empty bool"),
    ("zone = 3\n", "key 'zone' = 3 must be a non-empty str"),
    ("zone = \n", "is not valid TOML"),
])
def test_bad_defaults_file(gcloud, tmp_path, capfd, text, message):
  path = tmp_path / "bad.toml"
  path.write_text(text)
  assert cli.main(["status", "t", f"--defaults={path}"]) == 1
  err = capfd.readouterr().err
  assert f"error: defaults file {path}" in err and message in err
  assert gcloud.calls() == []


def test_missing_values_name_the_key_and_file(gcloud, tmp_path, capfd, monkeypatch):
  path = tmp_path / "noproject.toml"
  path.write_text('zone = "us-central2-b"\n')
  assert cli.main(["create", "pod", "--queued", f"--defaults={path}"]) == 1
  assert f"project is not set: pass --project or add `project = ...` to {path}" in (
      capfd.readouterr().err)
  assert cli.main(["setup", "pod", f"--defaults={path}", "--from_gcs"]) == 1
  assert "bucket is not set" in capfd.readouterr().err
  monkeypatch.setenv(defaults_lib.DEFAULTS_ENV, str(tmp_path / "nowhere.toml"))
  assert cli.main(["stop", "pod"]) == 1
  assert f"nowhere.toml (from ${defaults_lib.DEFAULTS_ENV}) does not exist" in (
      capfd.readouterr().err)
  assert gcloud.calls() == []


def test_gcloud_binary_from_env_and_missing(gcloud, monkeypatch, capfd):
  monkeypatch.setenv("GCLOUD", "mygcloud")
  assert gcloud.main("delete", "t") == 0
  assert gcloud.calls() == [["mygcloud"] + VM[1:] + ["delete", "t", Z, P, "--quiet"]]
  monkeypatch.setenv("GCLOUD", "no-such-gcloud")
  assert gcloud.main("delete", "t") == 1
  assert "'no-such-gcloud' was not found on PATH (set $GCLOUD" in capfd.readouterr().err


def test_usage_errors(gcloud, capfd):
  assert gcloud.main("run", "t") == 1
  assert "no command to run: put it after `--`" in capfd.readouterr().err
  assert gcloud.main("create", "t", "--reserved") == 1
  assert "--reserved and --best_effort need --queued" in capfd.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["logs", "t", "--worker=two"])
  assert gcloud.calls() == []
