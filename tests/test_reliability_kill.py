"""Runs that die or find their newest checkpoint damaged end, once resumed, with the parameters of
an uninterrupted run, bit for bit (docs/reliability.md, "The run's state").

- kill -9 at 3 random steps (20 with BERT_JAX_SLOW_TESTS=1, about 3 minutes): each restart takes
  over the dead run's lock and resumes from whatever its last save left, including saves cut off
  mid-way (a save every 2 steps, asynchronous, so kills land during saves too).
- A flipped byte or a truncated file in the newest checkpoint: the resumed run falls back to the
  previous step with one warning line and trains the lost steps again.

Each run is `train.run` of `tiny_config` in a subprocess on 2 CPU devices (reliability_helpers.py),
sharing a compilation cache. The random steps come from a printed seed (BERT_JAX_KILL_SEED).
"""

import json
import os
from pathlib import Path
import random
import shutil
import signal
import time

import pytest

import reliability_helpers as helpers

STEPS = 12


def _overrides(num_train_steps: int) -> dict:
  return {"train.num_train_steps": num_train_steps, "train.log_every_steps": 1,
          "ckpt.save_interval_steps": 2, "ckpt.max_to_keep": 3, "ckpt.async_save": True,
          "train.eval_every_steps": 1000}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return helpers.child_env(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
  """straight(steps): an uninterrupted run's (workdir, final parameters), run once per length."""
  runs = {}

  def get(steps: int = STEPS):
    if steps not in runs:
      root = tmp_path_factory.mktemp(f"straight{steps}")
      outcome = helpers.run(env, root / "run", root / "out.json", _overrides(steps))
      assert outcome["step"] == steps, outcome
      runs[steps] = root / "run", helpers.params(root / "out.json")
    return runs[steps]

  get(STEPS)            # in the fixture's set-up time: every test here needs it
  return get


def _logged_steps(workdir: Path, skip_lines: int) -> list[int]:
  """The train steps logged after the first `skip_lines` lines of metrics.jsonl."""
  try:
    lines = (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[skip_lines:]
  except FileNotFoundError:
    return []
  steps = []
  for line in lines:
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:                  # the line being written
      pass
  return steps


def _line_count(workdir: Path) -> int:
  try:
    return len((workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
  except FileNotFoundError:
    return 0


def _kill_at(env, workdir: Path, out: Path, steps: int, target: int, log: Path, timeout=240
             ) -> int | None:
  """Starts a run of `steps` and kill -9s it once it has logged step `target`; returns the step
  it had reached, or None when it finished first."""
  before = _line_count(workdir)
  proc = helpers.start(env, workdir, out, _overrides(steps), log)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      steps = _logged_steps(workdir, before)
      if steps and max(steps) >= target:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return max(steps)
      if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
        return None
      time.sleep(0.01)
    raise AssertionError(f"step {target} not reached in {timeout} s: "
                         f"{log.read_text(errors='replace')[-4000:]}")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _kill_and_resume(env, straight, tmp_path, steps: int, kills: int):
  """kill -9 at `kills` distinct random steps of a `steps`-step run, then let it finish."""
  seed = int(os.environ.get("BERT_JAX_KILL_SEED", random.randrange(1 << 30)))
  print(f"kill seed {seed} (BERT_JAX_KILL_SEED={seed} repeats this run)")
  targets = sorted(random.Random(seed).sample(range(1, steps), kills))
  workdir, log = tmp_path / "run", tmp_path / "runs.log"
  reached = [_kill_at(env, workdir, tmp_path / "out.json", steps, target, log)
             for target in targets]
  assert any(r is not None for r in reached), reached
  outcome = helpers.run(env, workdir, tmp_path / "out.json", _overrides(steps))
  assert outcome["step"] == steps, outcome
  helpers.assert_params_equal(helpers.params(tmp_path / "out.json"), straight(steps)[1])


def test_kill9_at_random_steps_resumes_bit_identical(env, straight, tmp_path):
  _kill_and_resume(env, straight, tmp_path, steps=STEPS, kills=3)


@pytest.mark.skipif(os.environ.get("BERT_JAX_SLOW_TESTS") != "1",
                    reason="20 kill -9 points take about 3 minutes: set BERT_JAX_SLOW_TESTS=1")
def test_kill9_at_20_random_steps_resumes_bit_identical(env, straight, tmp_path):
  _kill_and_resume(env, straight, tmp_path, steps=40, kills=20)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_damaged_newest_checkpoint_resumes_bit_identical(env, straight, tmp_path, damage):
  """The straight run's workdir with its final checkpoint (step 12) damaged: the rerun falls back
  to step 10, says so in one line, trains steps 11-12 again and ends with the same parameters."""
  workdir = tmp_path / "run"
  straight_dir, straight_params = straight()
  shutil.copytree(straight_dir, workdir)
  step_dir = workdir / "checkpoints" / str(STEPS)
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
  victim = max(files, key=lambda p: p.stat().st_size)
  data = victim.read_bytes()
  if damage == "flipped_byte":
    victim.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1])
                       + data[len(data) // 2 + 1:])
  else:
    victim.write_bytes(data[:len(data) // 3])
  outcome = helpers.run(env, workdir, tmp_path / "out.json", _overrides(STEPS))
  assert outcome["step"] == STEPS, outcome
  helpers.assert_params_equal(helpers.params(tmp_path / "out.json"), straight_params)
  lines = [line for line in outcome["stderr"].splitlines() if "damaged" in line]
  relative = victim.relative_to(step_dir).as_posix()
  assert len(lines) == 1, outcome["stderr"][-3000:]
  assert (f"checkpoint step {STEPS} in {workdir}/checkpoints is damaged ({relative} ") in lines[0]
  assert lines[0].endswith(f"resuming from step {STEPS - 2}; step {STEPS} moved to "
                           f"{workdir}/checkpoints.damaged/{STEPS}")
  assert "Event loop is closed" not in outcome["stderr"]
