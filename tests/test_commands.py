"""The installed commands (setup.py's console_scripts): each resolves to a callable, is installed in
the environment's bin folder, and is its `python -m` form (the same --help, the same exit status);
`bert-pretrain`/`bert-finetune` take --help (exit 0) and --help_config from any directory.

Every case is a command that stops at flag parsing: a few seconds each.
"""

import ast
import importlib
import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SQUAD = os.path.join(REPO, "configs", "squad.py")
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py")

# What each command is; a command added to setup.py must be added here (test_commands_are_known).
MODULE_OF = {
    "bert-data": "tools.data", "bert-pretrain": "pretrain", "bert-finetune": "finetune",
    "bert-convert": "tools.convert_checkpoint", "bert-tpu": "tools.tpu",
    "bert-benchmark": "tools.benchmark", "bert-fit": "tools.aot_compile",
    "bert-convergence": "tools.convergence",
}


def _console_scripts() -> dict[str, str]:
  """{command: "module:function"} from setup.py's entry_points."""
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  setup = next(node for node in ast.walk(tree)
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
  entry_points = next(ast.literal_eval(k.value) for k in setup.keywords if k.arg == "entry_points")
  return dict(tuple(part.strip() for part in spec.split("=")) for spec in
              entry_points["console_scripts"])


SCRIPTS = _console_scripts()


def _run(argv, cwd=REPO):
  return subprocess.run(argv, cwd=cwd, env=dict(os.environ), capture_output=True, text=True,
                        timeout=120)


def test_commands_are_known():
  assert sorted(SCRIPTS) == sorted(MODULE_OF)


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_resolves_to_a_callable(command):
  module, _, function = SCRIPTS[command].partition(":")
  assert callable(getattr(importlib.import_module(module), function))


def test_commands_are_installed():
  """`make test` reinstalls the package when setup.py changes; by hand: pip install -e ."""
  installed = {e.name: e.value for e in importlib.metadata.distribution("bert-jax").entry_points
               if e.group == "console_scripts"}
  assert installed == SCRIPTS, "reinstall: .venv/bin/pip install --no-deps -e ."
  for command in SCRIPTS:
    assert os.access(os.path.join(BIN, command), os.X_OK), command


@pytest.mark.parametrize("command", sorted(MODULE_OF))
def test_command_is_its_python_m_form(command):
  installed = _run([os.path.join(BIN, command), "--help"])
  module = _run([sys.executable, "-m", MODULE_OF[command], "--help"])
  assert (installed.returncode, installed.stdout, installed.stderr) == \
         (module.returncode, module.stdout, module.stderr)
  assert installed.returncode == 0, installed.stderr[-3000:]
  if command in ("bert-pretrain", "bert-finetune"):
    assert "--help_config" in installed.stdout and "--workdir" in installed.stdout
  if command == "bert-convergence":
    assert "--max_seconds" in installed.stdout and "--target_mlm_accuracy" in installed.stdout
  if command in ("bert-benchmark", "bert-fit"):
    assert "--config" in installed.stdout and "\\\n" in installed.stdout   # usage lines kept whole


def test_help_config_lists_the_keys_from_any_directory(tmp_path):
  result = _run([os.path.join(BIN, "bert-finetune"), f"--config={SQUAD}:v2.0", "--help_config",
                 "--config.optim.peak_learning_rate=5e-5"], cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == (f"# {SQUAD}:v2.0: every key, its value and what it sets; change one with "
                      "--config.KEY=VALUE")
  line = next(line for line in lines if line.startswith("optim.peak_learning_rate = "))
  assert line.split()[2] == "5e-05"
  assert line.endswith("# the top of the schedule (the head's, with layer_decay < 1)")
  assert "data.doc_stride = 128" in result.stdout
  assert list(tmp_path.iterdir()) == []                  # no workdir needed, nothing written


@pytest.mark.parametrize("args,line", [
    ([f"--config={PRETRAIN}:demo", "--help_config", "--config.train.num_train_step=3"],
     "error: unknown config key train.num_train_step; did you mean train.num_train_steps?"),
    ([f"--config={PRETRAIN}:demo"], "error: --workdir is required"),
], ids=["help-config-unknown-key", "missing-workdir"])
def test_mistakes_are_one_line(args, line):
  result = _run([os.path.join(BIN, "bert-pretrain"), *args])
  assert (result.returncode, result.stderr) == (2, line + "\n")
