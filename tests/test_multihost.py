"""Two processes on this machine as one JAX cluster: `python -m pretrain` with jax.distributed.

Each process has 4 CPU devices; the mesh (-1,1,1) spans all 8, so every step's gradients cross the
processes (gloo collectives). SIGTERM to one process stops both at the same step with one
checkpoint; a restart resumes from it, and the logged metrics equal those of one process with 8
devices running straight through. All runs share one config, so the restart and the reference
reuse compilations through a shared cache where they can.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pretrain import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pretrain.py") + ":demo"
TIMEOUT = 150
NUM_STEPS = 32   # far more steps than pass between the first log line and the SIGTERM

TINY = [
    "--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.intermediate_size=64", "--config.model.vocab_size=256",
    "--config.model.max_position_embeddings=32", "--config.model.dtype=float32",
    "--config.data.source=synthetic", "--config.data.max_seq_length=32",
    "--config.data.max_predictions_per_seq=5", "--config.train.global_batch_size=16",
    "--config.train.eval_steps=1", "--config.train.log_every_steps=1",
    "--config.train.eval_every_steps=1000", "--config.optim.warmup_steps=2",
    "--config.ckpt.save_interval_steps=1000", "--config.ckpt.async_save=false",
    "--config.mesh.shape=(-1,1,1)",
]
SPEED_KEYS = {"seq_per_s", "tokens_per_s", "tflops_per_device", "mfu"}
_CLUSTER_VARS = {*distributed.ENV_VARS.values(), "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache, num_devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={num_devices} "
                        "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"),
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for var in list(env):  # a cluster setting leaking in from outside would change the runs
    if var.startswith("SLURM_") or var in _CLUSTER_VARS:
      del env[var]
  return env


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _argv(workdir, *extra):
  return [sys.executable, "-m", "pretrain", f"--config={CONFIG}", f"--workdir={workdir}", *TINY,
          *extra]


class Procs:
  """Processes started together; any failure kills them all and shows each one's output tail."""

  def __init__(self, commands, env, logdir, name):
    """`env`: one environment for all, or a list of one per command."""
    self.logs = [os.path.join(logdir, f"{name}.{i}.log") for i in range(len(commands))]
    self.procs = []
    envs = env if isinstance(env, list) else [env] * len(commands)
    for command, env, log in zip(commands, envs, self.logs):
      with open(log, "w", encoding="utf-8") as out:
        self.procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                           stderr=subprocess.STDOUT))

  def tails(self, n=4000):
    parts = []
    for i, log in enumerate(self.logs):
      with open(log, encoding="utf-8", errors="replace") as f:
        parts.append(f"--- process {i} ({log}) ---\n{f.read()[-n:]}")
    return "\n".join(parts)

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
    for proc in self.procs:
      proc.wait()

  def wait(self, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    try:
      while any(p.poll() is None for p in self.procs):
        if any(p.poll() not in (None, 0) for p in self.procs):
          break                        # one failed: the others would wait for it forever
        if time.monotonic() > deadline:
          raise AssertionError(f"timed out after {timeout} s\n{self.tails()}")
        time.sleep(0.1)
      codes = [p.poll() for p in self.procs]
      assert codes == [0] * len(codes), f"exit codes {codes}\n{self.tails()}"
    finally:
      self.kill()


def _two_processes(workdir, cache, logdir, name, *extra):
  port = _free_port()
  commands = [_argv(workdir, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", *extra) for i in range(2)]
  return Procs(commands, _env(cache, 4), logdir, name)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _by_step(metrics):
  """{(step, key): value} without the throughput figures, which differ run to run."""
  return {(m["step"], k): v for m in metrics for k, v in m.items()
          if k != "step" and k.split("/")[-1] not in SPEED_KEYS}


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _wait_for_logged_step(run, workdir, timeout=TIMEOUT):
  deadline = time.monotonic() + timeout
  while True:
    assert all(p.poll() is None for p in run.procs), f"a process exited early\n{run.tails()}"
    assert time.monotonic() < deadline, f"no train step logged after {timeout} s\n{run.tails()}"
    try:
      if any("train/loss" in m for m in _metrics(workdir)):
        return
    except (FileNotFoundError, json.JSONDecodeError):   # not written yet, or a line half-written
      pass
    time.sleep(0.05)


def test_two_processes_preempted_and_resumed_equal_one_process(cache, tmp_path):
  """SIGTERM reaches only process 1; both stop after the same step and save it; a restart of both
  resumes from it and finishes; every logged metric equals those of one process on 8 devices."""
  single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
  steps = [f"--config.train.num_train_steps={NUM_STEPS}"]
  # The single-process reference and the first multi-process run share the two cores.
  single = Procs([_argv(single_dir, *steps)], _env(cache, 8), tmp_path, "single")
  try:
    first = _two_processes(multi_dir, cache, tmp_path, "first", *steps)
    try:
      _wait_for_logged_step(first, multi_dir)
      first.procs[1].send_signal(signal.SIGTERM)
      first.wait()
    finally:
      first.kill()
    logs = [_read(log) for log in first.logs]
    assert "process 1 of 2, 4 local / 8 global devices" in logs[1], first.tails()
    assert "SIGTERM received" in logs[1], first.tails()
    assert "a stop signal on another process received" in logs[0], first.tails()
    stopped = max(m["step"] for m in _metrics(multi_dir) if "train/loss" in m)
    assert stopped < NUM_STEPS, f"the run ended before the signal arrived\n{first.tails()}"
    assert _checkpoint_steps(multi_dir) == [stopped]      # both processes saved the same step
    assert f"saving a checkpoint at step {stopped} and stopping" in logs[0]
    assert f"saving a checkpoint at step {stopped} and stopping" in logs[1]

    second = _two_processes(multi_dir, cache, tmp_path, "second", *steps)
    second.wait()
    assert f"resumed from {multi_dir / 'checkpoints'} at step {stopped}" in _read(
        second.logs[1]), second.tails()
    assert _checkpoint_steps(multi_dir) == [stopped, NUM_STEPS]
    single.wait()
  finally:
    single.kill()

  reference, got = _by_step(_metrics(single_dir)), _by_step(_metrics(multi_dir))
  assert {s for s, k in reference if k.startswith("train/")} == set(range(1, NUM_STEPS + 1))
  assert set(got) == set(reference), sorted(set(got) ^ set(reference))
  for key, value in sorted(reference.items()):
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


@pytest.fixture
def no_cluster_env(monkeypatch):
  """This (test) process as if started outside any cluster."""
  for var in list(os.environ):
    if var.startswith("SLURM_") or var in _CLUSTER_VARS:
      monkeypatch.delenv(var)
  return monkeypatch


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="localhost:1234", process_id=0), "--num_processes"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "--process_id"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), r"\[0, 2\)"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "port"),
])
def test_incomplete_settings_name_the_flag(kwargs, match, no_cluster_env):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**kwargs)


def test_single_process_does_nothing(no_cluster_env):
  monkeypatch = no_cluster_env
  assert not distributed.initialize()
  assert not distributed.initialize(num_processes=1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    distributed.initialize()


_DRIVER = """
import sys
import jax
from jax.experimental import multihost_utils
import numpy as np
from pretrain import distributed
assert distributed.initialize(), "not initialised"
total = multihost_utils.process_allgather(np.int32(jax.process_index() + 1)).sum()
# One write: an unbuffered print writes each argument apart, and Gloo's own log lines (stderr, the
# same file) can land between them.
print(f"RESULT {jax.process_index()} {jax.process_count()} {jax.device_count()} {int(total)}")
"""


@pytest.mark.parametrize("style", ["jax_env", "slurm"])
def test_cluster_from_environment(style, cache, tmp_path):
  """No flags: the JAX_* variables, or a SLURM step's variables, make a 2-process cluster."""
  port = _free_port()
  envs = []
  for i in range(2):
    env = _env(cache, 2)
    if style == "jax_env":
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i))
    else:  # what `srun --ntasks=2` sets; the port would come from the job id, unless overridden
      env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost",
                 SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                 JAX_COORDINATOR_PORT=str(port))
    envs.append(env)
  procs = Procs([[sys.executable, "-c", _DRIVER]] * 2, envs, tmp_path, style)
  procs.wait(timeout=60)
  for i, log in enumerate(procs.logs):
    assert f"RESULT {i} 2 4 3" in _read(log), procs.tails()
