"""A run never loses its last good state (docs/reliability.md, "The run's state"): faults injected
one by one, each test asserting the line the user sees and that what was good survived.

- Divergence: a learning rate of 1e4 goes NaN; the run stops with one line naming the step and the
  last finite checkpoint, and `max_to_keep=2` rotation kept only finite, restorable steps. A
  poisoned batch under `train.skip_nonfinite_steps` is skipped inside the step instead.
- A damaged newest checkpoint (a flipped byte in the array data, a truncated file; with and without
  checksums) falls back to the previous step with one warning, without Orbax's "Event loop is
  closed" noise (that the resumed run ends like a straight run: tests/test_reliability_kill.py).
  Another model's checkpoint is refused naming the differing shape; no intact checkpoint at all is
  one error.
- A full disk during a save (a small tmpfs; needs root) leaves the previous checkpoint intact.
- Two runs on one workdir: tests/test_workdir_lock.py. Kill -9 at random steps:
  tests/test_reliability_kill.py.

Whole runs are `train.run` of `tiny_config` in a subprocess (reliability_helpers.py: a shared
compilation cache keeps each to seconds) and are checked from here through their outcome, stderr
and checkpoints; the unit tests drive `Checkpointer` on a small pytree.
"""

import errno
import json
import logging
import math
from pathlib import Path
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from equivalence_helpers import to_host
from helpers import tiny_config
import reliability_helpers
from pretrain import checkpoint_integrity
from pretrain import guard as guard_lib
from pretrain import sharding
from pretrain import step as step_lib
from pretrain import summary
from pretrain import train
from pretrain import workdir_lock
from pretrain.checkpoint import CheckpointError, Checkpointer, all_finite

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- helpers


def _tree(seed: int):
  """A small state with incompressible float data (so a flipped byte lands in array data)."""
  rng = np.random.RandomState(seed)
  return {"w": jnp.asarray(rng.randn(64, 256).astype(np.float32)),
          "m": jnp.asarray(rng.randn(4096).astype(np.float32)), "step": jnp.asarray(seed)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _largest_data_file(step_dir: Path) -> Path:
  """The biggest file of the step's array data (OCDBT chunks under state/)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
  return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path: Path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x40
  path.write_bytes(bytes(data))


def _truncate(path: Path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 3)


def _steps(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture
def runs(child_env, tmp_path):
  """runs(workdir, overrides, **faults): train.run in a subprocess (reliability_helpers)."""
  count = iter(range(100))

  def run(workdir, overrides, **faults):
    return reliability_helpers.run(child_env, workdir, tmp_path / f"outcome{next(count)}.json",
                                   overrides, **faults)

  return run


def _restore(workdir: Path, config, step: int):
  """(state, data_state) of a run's checkpoint, on this process's devices."""
  setup = step_lib.make_setup(config, sharding.make_mesh(config.mesh.shape))
  ckpt = Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=100)
  try:
    return ckpt.restore(setup.abstract_state, step)
  finally:
    ckpt.close()


def _restore_latest(workdir: Path, config):
  """(state, step) of the newest intact checkpoint of a run."""
  setup = step_lib.make_setup(config, sharding.make_mesh(config.mesh.shape))
  ckpt = Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=100)
  try:
    state, _, step = ckpt.restore_latest(setup.abstract_state)
    return state, step
  finally:
    ckpt.close()


def _noise(stderr: str) -> list[str]:
  """The lines of a child's stderr other than its progress bar."""
  return [line for line in stderr.splitlines()
          if line.strip() and not line.strip("\r").startswith("pretrain")]


def _saved(directory: Path, steps=(1, 2, 3), async_save=True) -> Checkpointer:
  ckpt = Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5, async_save=async_save)
  for step in steps:
    ckpt.save(step, _tree(step), {"next_batch": step})
  ckpt.close()
  return Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5)


# ------------------------------------------------------------------ checkpoint integrity (units)


def test_checksums_written_after_each_save_and_verified(tmp_path):
  ckpt = _saved(tmp_path / "ckpt")
  for step in (1, 2, 3):
    listing = json.loads((tmp_path / "ckpt" / str(step) / "checksums.json").read_text())
    assert listing["algorithm"] == "sha256"
    assert any(name.startswith("state/") for name in listing["files"])
    assert checkpoint_integrity.verify(str(tmp_path / "ckpt" / str(step))) is None
  state, data, step = ckpt.restore_latest(_abstract(_tree(3)))
  assert step == 3 and data == {"next_batch": 3}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_tree(3)["w"]))
  ckpt.close()


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_damaged_newest_falls_back_to_previous_step(tmp_path, damage, warnings_seen, capfd):
  directory = tmp_path / "ckpt"
  ckpt = _saved(directory)
  victim = _largest_data_file(directory / "3")
  (_flip_byte if damage == "flipped_byte" else _truncate)(victim)
  relative = victim.relative_to(directory / "3").as_posix()

  state, data, step = ckpt.restore_latest(_abstract(_tree(3)))
  assert step == 2 and data == {"next_batch": 2}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, _tree(2))
  why = ("does not match the SHA-256 recorded when it was saved" if damage == "flipped_byte"
         else "bytes, ")
  lines = [w for w in warnings_seen() if "damaged" in w]
  assert len(lines) == 1, warnings_seen()
  assert lines[0].startswith(f"checkpoint step 3 in {directory} is damaged ({relative} ")
  assert why in lines[0]
  assert f"resuming from step 2; step 3 moved to {directory}.damaged/3" in lines[0]
  assert _steps(directory) == [1, 2] and _steps(Path(f"{directory}.damaged")) == [3]
  assert ckpt.latest_step == 2          # so the run can save step 3 again
  ckpt.close()
  assert "Event loop is closed" not in capfd.readouterr().err


def test_damage_without_checksums_is_caught_by_orbax_without_noise(tmp_path, warnings_seen,
                                                                  capfd):
  """A step killed between Orbax's commit and its checksums (or written before they existed):
  Orbax's own read error is the verdict, and its in-flight reads' noise is dropped."""
  directory = tmp_path / "ckpt"
  ckpt = _saved(directory)
  (directory / "3" / "checksums.json").unlink()
  _truncate(_largest_data_file(directory / "3"))
  _, _, step = ckpt.restore_latest(_abstract(_tree(3)))
  assert step == 2
  lines = [w for w in warnings_seen() if "damaged" in w]
  assert len(lines) == 1 and "Orbax cannot read it" in lines[0], lines
  ckpt.close()
  time.sleep(1.0)                       # TensorStore's late reads report while we wait
  assert "Event loop is closed" not in capfd.readouterr().err


def test_non_finite_values_in_a_checkpoint_count_as_damage(tmp_path):
  directory = tmp_path / "ckpt"
  ckpt = Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5, async_save=False)
  ckpt.save(1, _tree(1), {"next_batch": 1})
  poisoned = dict(_tree(2), m=_tree(2)["m"].at[7].set(jnp.nan))   # e.g. an older, diverged run
  ckpt.save(2, poisoned, {"next_batch": 2})
  ckpt.close()
  ckpt = Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5)
  state, _, step = ckpt.restore_latest(_abstract(_tree(1)))
  assert step == 1 and all_finite(state)
  ckpt.close()


def test_finished_means_an_intact_final_checkpoint(tmp_path):
  """A rerun whose final checkpoint is damaged is not 'already finished': it trains on (from the
  step before it, test_reliability_state.py's fallback) instead of keeping damaged weights."""
  step_dir = tmp_path / "checkpoints" / "6"
  (step_dir / "state").mkdir(parents=True)
  (step_dir / "state" / "data").write_bytes(b"weights")
  checkpoint_integrity.write_checksums(str(step_dir))
  config = ml_collections.ConfigDict({"train": {"num_train_steps": 6}})
  assert summary.finished_line(str(tmp_path), config).startswith(f"{tmp_path} already finished")
  (step_dir / "state" / "data").write_bytes(b"wrights")
  assert summary.finished_line(str(tmp_path), config) is None


def test_no_intact_checkpoint_is_one_error(tmp_path):
  directory = tmp_path / "ckpt"
  ckpt = _saved(directory, steps=(1, 2))
  for step in (1, 2):
    _flip_byte(_largest_data_file(directory / str(step)))
  with pytest.raises(CheckpointError) as raised:
    ckpt.restore_latest(_abstract(_tree(2)))
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"no intact checkpoint in {directory} (step 2: ")
  assert "; step 1: " in message and message.endswith(
      "start over with a new --workdir, or put back a copy of a checkpoint")
  assert _steps(directory) == [1, 2]           # nothing moved when nothing could be resumed
  ckpt.close()


def test_another_models_checkpoint_names_the_shape(tmp_path):
  directory = tmp_path / "ckpt"
  ckpt = _saved(directory, steps=(1,))
  other = dict(_tree(1), w=jnp.zeros((64, 128), jnp.float32))
  with pytest.raises(CheckpointError) as raised:
    ckpt.restore_latest(_abstract(other))
  assert str(raised.value) == (
      f"the checkpoint in {directory} at step 1 was written for another model or optimizer: "
      "w has shape (64, 256), the config gives (64, 128); resume with the config it was written "
      "with or use a new workdir")
  assert _steps(directory) == [1]              # refused, not treated as damage
  ckpt.close()


def test_shape_mismatch_lists_parameters_first():
  saved = {"opt_state/0/mu/a": (2,), "params/a": (2,), "params/b": (3,)}
  wanted = {"opt_state": {"0": {"mu": {"a": jnp.zeros(4)}}},
            "params": {"a": jnp.zeros(4), "c": jnp.zeros(3)}}
  assert checkpoint_integrity.shape_mismatch(saved, wanted) == (
      "params/a has shape (2,), the config gives (4,) (and 3 more differences)")
  assert checkpoint_integrity.shape_mismatch({"params/a": (4,)}, {"params": {"a": jnp.zeros(4)}}
                                             ) is None


# ------------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs (mounting needs root; skipped, with the reason, where it is refused)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip(f"a full disk is simulated on a small tmpfs, and mounting one was refused "
                f"({result.stderr.strip() or result.returncode}): run as root to include it")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_bytes: int = 4096):
  """Takes all but `leave_bytes` of the file system's free space."""
  free = shutil.disk_usage(mount).free
  with open(mount / "filler", "wb") as f:
    f.write(b"\0" * max(free - leave_bytes, 0))


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_full_disk_during_save_keeps_previous_checkpoint(small_disk, async_save, caplog):
  directory = small_disk / "ckpt"
  ckpt = Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5, async_save=async_save)
  ckpt.save(1, _tree(1), {"next_batch": 1})
  ckpt.wait()
  _fill(small_disk)
  caplog.set_level(logging.INFO, logger="absl")
  with pytest.raises(CheckpointError) as raised:
    ckpt.save(2, _tree(2), {"next_batch": 2})
    ckpt.close()                           # an async save fails in the background: seen here
  assert str(raised.value) == (
      f"saving the checkpoint of step 2 to {directory} failed (no space left on device); the last "
      "complete checkpoint is step 1, intact: free some space and run again to resume")
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # no Orbax tracebacks
  assert not list(directory.glob("2.orbax-checkpoint-tmp*"))            # its space given back
  ckpt.close()
  (small_disk / "filler").unlink()
  reopened = Checkpointer(str(directory), save_interval_steps=1, max_to_keep=5)
  state, data, step = reopened.restore_latest(_abstract(_tree(1)))
  assert step == 1 and data == {"next_batch": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_tree(1)["w"]))
  reopened.close()


def test_full_disk_stops_the_run_with_one_line(small_disk, runs):
  """A run whose disk fills up after its checkpoint of step 4: one line naming the save that
  failed and the step kept; the lock goes with the run; step 4 restores."""
  workdir = small_disk / "run"
  outcome = runs(workdir, {"train.num_train_steps": 8, "ckpt.async_save": True},
                 fill_disk={"step": 8, "mount": str(small_disk)})
  assert outcome["message"] == (
      f"saving the checkpoint of step 8 to {workdir}/checkpoints failed (no space left on device);"
      " the last complete checkpoint is step 4, intact: free some space and run again to resume")
  assert outcome["error"] == "CheckpointError"
  assert _noise(outcome["stderr"]) == []        # no Orbax/asyncio tracebacks, no warnings
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
  (small_disk / "filler").unlink()
  state, step = _restore_latest(workdir, tiny_config())
  assert step == 4 and int(state.step) == 4


# ------------------------------------------------------------------------------- divergence


def test_first_nonfinite_and_aggregate():
  history = [dict(loss=1.0, grad_norm=2.0, learning_rate=0.1),
             dict(loss=1.0, grad_norm=math.inf, learning_rate=0.2),
             dict(loss=math.nan, grad_norm=1.0, learning_rate=0.3)]
  assert guard_lib.first_nonfinite(history, first_step=11) == (12, "gradient norm", math.inf, 0.2)
  assert guard_lib.first_nonfinite(history[:1], first_step=11) is None
  skipped = [dict(h, skipped_steps=float(i == 1)) for i, h in enumerate(history[:2])]
  assert guard_lib.first_nonfinite(skipped, first_step=1) is None
  assert guard_lib.aggregate(skipped) == dict(loss=1.0, grad_norm=2.0, learning_rate=0.1,
                                              skipped_steps=1.0)


def test_divergence_stops_the_run_and_rotation_keeps_finite_checkpoints(tmp_path, runs):
  """lr 1e4 (the issue's case): loss and gradient norm explode and go NaN at step 7. The run
  stops there; with a save every step and max_to_keep=2, the two kept are finite and restore."""
  workdir = tmp_path / "run"
  overrides = {"train.num_train_steps": 12, "optim.peak_learning_rate": 1e4,
               "train.log_every_steps": 4, "ckpt.save_interval_steps": 1, "ckpt.max_to_keep": 2,
               "ckpt.async_save": True, "train.eval_every_steps": 1000}
  outcome = runs(workdir, overrides)
  assert outcome["error"] == "NonFiniteError"
  assert outcome["message"] == (
      f"gradient norm is nan at step 7 (learning rate 6e+03); the last finite checkpoint is step "
      f"6 in {workdir}/checkpoints: lower optim.peak_learning_rate and resume")
  assert _steps(workdir / "checkpoints") == [5, 6]
  assert _noise(outcome["stderr"]) == []
  config = tiny_config(**overrides)
  for step in (5, 6):
    state, _ = _restore(workdir, config, step)
    assert int(state.step) == step and all_finite(state)
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_poisoned_batch_stops_the_run_before_the_save(tmp_path, runs):
  """NaN at step 3 (not a log step): found at the save of step 4, which is not written."""
  workdir = tmp_path / "run"
  outcome = runs(workdir, {"train.num_train_steps": 8, "train.log_every_steps": 8}, poison=[2])
  assert outcome["message"].startswith("loss is nan at step 3 (learning rate ")
  assert outcome["message"].endswith(
      "; no checkpoint was saved before it: lower optim.peak_learning_rate and run again")
  assert _steps(workdir / "checkpoints") == []
  assert _noise(outcome["stderr"]) == []


def test_skip_nonfinite_steps(tmp_path, runs):
  """With train.skip_nonfinite_steps the poisoned step 3 is skipped inside the jitted step: the
  state after it equals the state before it (parameters and optimizer state, checkpoints 2 and 3),
  the step counter advances, the log counts it and the run goes on."""
  workdir = tmp_path / "run"
  overrides = {"train.num_train_steps": 4, "train.log_every_steps": 4,
               "ckpt.save_interval_steps": 1, "train.skip_nonfinite_steps": True}
  outcome = runs(workdir, overrides, poison=[2])
  assert outcome["returncode"] == 0 and outcome["step"] == 4
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_row = [r for r in rows if "train/loss" in r][0]
  assert train_row["step"] == 4 and train_row["train/skipped_steps"] == 1.0
  assert math.isfinite(train_row["train/loss"])         # the mean over the applied steps
  config = tiny_config(**overrides)
  before, after, last = (to_host(_restore(workdir, config, s)[0]) for s in (2, 3, 4))
  assert (int(before.step), int(after.step)) == (2, 3)
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  assert all_finite(last) and not np.array_equal(             # step 4 was applied
      last.params["mlm"]["transform"]["kernel"], after.params["mlm"]["transform"]["kernel"])


def test_resume_with_another_architecture_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config()
  setup = step_lib.make_setup(config, sharding.make_mesh(config.mesh.shape))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), setup.abstract_state)
  ckpt = Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=1,
                      async_save=False)
  ckpt.save(8, zeros, {"next_batch": 8})
  ckpt.close()
  wider = tiny_config(**{"model.intermediate_size": 128})
  with pytest.raises(CheckpointError) as raised:
    train.run(wider, str(workdir))
  assert str(raised.value) == (
      f"the checkpoint in {workdir}/checkpoints at step 8 was written for another model or "
      "optimizer: params/bert/layers/0/intermediate/bias has shape (64,), the config gives "
      "(128,) (and 17 more differences); resume with the config it was written with or use a "
      "new workdir")
  assert _steps(workdir / "checkpoints") == [8]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_enospc_reason_is_short():
  from pretrain.checkpoint import _short_reason  # pylint: disable=g-import-not-at-top
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" ... Failed to write 111087 bytes to '
                     "file 11: No space left on device [os_error_code='28']")
  assert _short_reason(error) == "no space left on device"
  assert _short_reason(OSError(errno.EACCES, "Permission denied")) == "permission denied"
