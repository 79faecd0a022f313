"""End to end through the command line: `python -m pretrain` in a subprocess on a few CPU devices.

A short run leaves checkpoints, TensorBoard events, metrics.jsonl and config.json; SIGTERM stops a
run cleanly with a checkpoint at the step it reached, and a rerun resumes from there; rerunning a
finished run changes nothing. The model is tiny and XLA's CPU backend optimisations are off, so
each run takes seconds; a compilation cache shared by the runs of this module saves recompiling.
"""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pretrain.py") + ":demo"
NUM_DEVICES = 2
SEQ_LEN = 32

SMALL = [
    "--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.intermediate_size=64", "--config.model.vocab_size=256",
    "--config.data.source=synthetic",
    "--config.model.max_position_embeddings=32", f"--config.data.max_seq_length={SEQ_LEN}",
    "--config.data.max_predictions_per_seq=5", "--config.train.global_batch_size=8",
    "--config.train.eval_steps=1", "--config.optim.warmup_steps=2",
]
TRAIN_KEYS = {"loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "learning_rate",
              "grad_norm", "seq_per_s", "tokens_per_s"}
EVAL_KEYS = {"loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(
      os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={NUM_DEVICES} "
                 "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"),
      JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _argv(workdir, *overrides):
  return [sys.executable, "-m", "pretrain", f"--config={CONFIG}", f"--workdir={workdir}", *SMALL,
          *overrides]


def _run(env, workdir, *overrides, timeout=180):
  result = subprocess.run(_argv(workdir, *overrides), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _split(metrics, prefix):
  """{step: {key: value}} of the entries with this prefix ("train" or "eval")."""
  out = {}
  for entry in metrics:
    values = {k[len(prefix) + 1:]: v for k, v in entry.items() if k.startswith(prefix + "/")}
    if values:
      assert entry["step"] not in out, f"two {prefix} entries for step {entry['step']}"
      out[entry["step"]] = values
  return out


def _checkpoint_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _data_position(workdir, step):
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata"),
            encoding="utf-8") as f:
    return json.load(f)["next_batch"]


def _tensorboard_scalars(workdir):
  """{(step, tag): value} from every event file (TFRecord framing, tensorboardX's Event proto)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "tensorboard")
  scalars = {}
  for name in os.listdir(directory):
    assert name.startswith("events.out.tfevents."), name
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


# ---------------------------------------------------------------------------------------------------
# A short run, then the same command again.


@pytest.fixture(scope="module")
def short_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("short") / "workdir"
  overrides = ["--config.train.num_train_steps=6", "--config.train.log_every_steps=2",
               "--config.train.eval_every_steps=3", "--config.ckpt.save_interval_steps=3"]
  result = _run(env, workdir, *overrides)
  return workdir, overrides, result


def test_short_run_checkpoints(short_run):
  workdir, _, _ = short_run
  assert _checkpoint_steps(workdir) == [3, 6]
  for step in (3, 6):
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(step), "state"))
    assert _data_position(workdir, step) == step


def test_short_run_metrics(short_run):
  workdir, _, _ = short_run
  metrics = _metrics(workdir)
  train, evals = _split(metrics, "train"), _split(metrics, "eval")
  assert sorted(train) == [2, 4, 6]
  assert sorted(evals) == [3, 6]
  for step, values in train.items():
    assert TRAIN_KEYS <= set(values), (step, values)
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["loss"] == pytest.approx(values["mlm_loss"] + values["nsp_loss"], rel=1e-5)
    assert 0.0 <= values["mlm_accuracy"] <= 1.0 and 0.0 <= values["nsp_accuracy"] <= 1.0
    assert values["grad_norm"] > 0 and values["learning_rate"] > 0
    assert values["seq_per_s"] > 0
    assert values["tokens_per_s"] == pytest.approx(values["seq_per_s"] * SEQ_LEN, rel=1e-6)
  # Each entry averages the rates of the steps since the last one (the rate of step i is
  # schedule(i), i from 0): warmup 0, peak/2, then a linear decay from the peak at 2 to 0 at 6.
  peak = 5e-4     # the demo variant's peak
  assert train[2]["learning_rate"] == pytest.approx((0.0 + peak / 2) / 2, rel=1e-5)
  assert train[4]["learning_rate"] == pytest.approx((peak + 0.75 * peak) / 2, rel=1e-5)
  assert train[6]["learning_rate"] == pytest.approx((0.5 * peak + 0.25 * peak) / 2, rel=1e-5)
  for step, values in evals.items():
    assert EVAL_KEYS <= set(values), (step, values)
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["loss"] == pytest.approx(values["mlm_loss"] + values["nsp_loss"], rel=1e-5)


def test_short_run_tensorboard(short_run):
  workdir, _, _ = short_run
  files = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(f.startswith("events.out.tfevents.") for f in files), files
  scalars = _tensorboard_scalars(workdir)
  for entry in _metrics(workdir):
    for tag, value in entry.items():
      if tag != "step":
        assert scalars[(entry["step"], tag)] == pytest.approx(value, rel=1e-6), tag


def test_short_run_config_json(short_run):
  workdir, _, _ = short_run
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["variant"] == "demo"
  assert config["model"]["hidden_size"] == 32
  assert config["train"]["num_train_steps"] == 6
  assert config["ckpt"]["save_interval_steps"] == 3


def test_short_run_summary(short_run):
  """The end of the output: steps and time, final losses, where the checkpoints are, what next."""
  workdir, _, result = short_run
  summary = result.stdout[result.stdout.index("finished: "):]
  assert summary.startswith("finished: 6 steps of 6 in "), result.stdout[-3000:]
  assert "train (step 6): loss " in summary and "held-out (step 6): MLM loss " in summary
  assert f"checkpoints: {workdir / 'checkpoints'} (steps 3, 6)" in summary
  assert "python -m finetune --config=configs/glue.py:sst2" in summary
  assert f"--config.init_checkpoint={workdir}" in summary


def test_rerun_of_finished_run_does_nothing(env, short_run):
  workdir, overrides, _ = short_run
  before = _metrics(workdir)
  result = _run(env, workdir, *overrides)
  assert result.stderr.strip() == (
      f"{workdir} already finished: its checkpoint is at step 6 and train.num_train_steps=6; "
      "nothing to do (raise train.num_train_steps to train on, or give another --workdir)"), \
      result.stderr[-3000:]
  assert _metrics(workdir) == before
  assert _checkpoint_steps(workdir) == [3, 6]
  assert _data_position(workdir, 6) == 6


# ---------------------------------------------------------------------------------------------------
# SIGTERM, then resume.


def _wait_for_train_steps(proc, workdir, count, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, f"the run exited early with {proc.returncode}"
    try:
      train = _split(_metrics(workdir), "train")
    except (FileNotFoundError, json.JSONDecodeError):   # not written yet, or a line half-written
      train = {}
    if len(train) >= count:
      return train
    time.sleep(0.2)
  raise AssertionError(f"no {count} logged train steps after {timeout} s")


def test_sigterm_saves_and_resumes(env, tmp_path):
  workdir = tmp_path / "workdir"
  log = tmp_path / "first.log"
  long_run = ["--config.train.num_train_steps=100000", "--config.train.log_every_steps=1",
              "--config.train.eval_every_steps=100000", "--config.ckpt.save_interval_steps=100000"]
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(_argv(workdir, *long_run), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
      _wait_for_train_steps(proc, workdir, count=2, timeout=150)
      proc.send_signal(signal.SIGTERM)
      returncode = proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  output = log.read_text(encoding="utf-8")
  assert returncode == 0, output[-5000:]
  assert "SIGTERM received" in output, output[-3000:]
  assert "stopped: " in output and "run the same command again" in output, output[-3000:]

  train = _split(_metrics(workdir), "train")
  stopped = max(train)
  assert sorted(train) == list(range(1, stopped + 1))
  # The only checkpoint is the one written on SIGTERM, at the last step trained (and logged).
  assert _checkpoint_steps(workdir) == [stopped]
  assert _data_position(workdir, stopped) == stopped
  assert not _split(_metrics(workdir), "eval")

  # Rerun with the same workdir and a few more steps: it continues from `stopped`, not from 0.
  lines_before = len(_metrics(workdir))
  result = _run(env, workdir, f"--config.train.num_train_steps={stopped + 4}",
                "--config.train.log_every_steps=1", "--config.train.eval_every_steps=100000",
                "--config.ckpt.save_interval_steps=100000")
  assert f"at step {stopped}" in result.stderr, result.stderr[-3000:]
  new = _metrics(workdir)[lines_before:]
  assert sorted(_split(new, "train")) == [stopped + 1, stopped + 2, stopped + 3, stopped + 4]
  assert sorted(_split(new, "eval")) == [stopped + 4]          # the final evaluation
  assert _checkpoint_steps(workdir) == [stopped, stopped + 4]
  assert _data_position(workdir, stopped + 4) == stopped + 4
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["train"]["num_train_steps"] == stopped + 4
