"""One run per workdir (docs/reliability.md, "The run's state"): a second run on a live workdir
refuses, naming the holder's host and pid, and writes nothing; a lock left by a run killed on this
host is taken over with a warning; one written on another host is not; the object-store form
(fsspec's memory:// standing in for gs://) is create-if-absent; the lock goes on any way out.

The live holder is a separate process that takes the lock and sleeps.
"""

import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers import tiny_config
from pretrain import train
from pretrain import workdir_lock

REPO = Path(__file__).resolve().parents[1]


_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pretrain import workdir_lock
    lock = workdir_lock.acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(300)
""")


@pytest.fixture
def holder(tmp_path):
  """Starts a process that takes a workdir's lock and keeps it; yields (workdir, process)."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(repo=str(REPO)), str(workdir)],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  yield workdir, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_a_live_lock_refuses_naming_host_and_pid(holder):
  workdir, proc = holder
  with pytest.raises(workdir_lock.WorkdirBusy) as raised:
    workdir_lock.acquire(str(workdir))
  message = str(raised.value)
  assert message.startswith(f"{workdir} is in use by another run (host {socket.gethostname()}, "
                            f"pid {proc.pid}, started ")
  assert message.endswith("): wait for it to finish or use another --workdir")


def test_train_run_on_a_locked_workdir_touches_nothing(holder):
  workdir, proc = holder
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {proc.pid}"):
    train.run(tiny_config(), str(workdir))
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]


def test_second_command_on_a_live_workdir_refuses(holder, child_env):
  """`python -m pretrain` on a workdir another run holds: exit status != 0, and the last line
  names the holder (with the command line's one-line errors it is the only line)."""
  workdir, proc = holder
  result = subprocess.run(
      [sys.executable, "-m", "pretrain", "--config=configs/pretrain.py:demo",
       f"--workdir={workdir}", "--config.data.source=synthetic"],
      cwd=REPO, env=child_env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert (f"{workdir} is in use by another run (host {socket.gethostname()}, pid {proc.pid}, "
          "started ") in last, result.stderr[-3000:]
  assert last.endswith("): wait for it to finish or use another --workdir")
  assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]


def test_a_dead_holders_lock_is_taken_over(holder, warnings_seen):
  workdir, proc = holder
  proc.kill()                            # kill -9: no clean-up, the lock file stays
  proc.wait()
  assert (workdir / workdir_lock.LOCK_FILE).exists()
  lock = workdir_lock.acquire(str(workdir))
  record = json.loads((workdir / workdir_lock.LOCK_FILE).read_text())
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  assert [w for w in warnings_seen() if w.startswith(
      f"taking over the lock of {workdir} from a run that is gone (host {socket.gethostname()}, "
      f"pid {proc.pid}, started ")]
  lock.release()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"host": "tpu-vm-7", "pid": 4242, "started": "2026-01-02T03:04:05+00:00"}))
  with pytest.raises(workdir_lock.WorkdirBusy) as raised:
    workdir_lock.acquire(str(workdir))
  assert str(raised.value) == (
      f"{workdir} is locked by a run on another host (host tpu-vm-7, pid 4242, started "
      f"2026-01-02T03:04:05+00:00), which this host cannot check: if that run has ended, delete "
      f"{workdir}/{workdir_lock.LOCK_FILE}; otherwise use another --workdir")


def test_object_store_lock_is_create_if_absent():
  """fsspec's memory:// stands in for gs:// (gcsfs maps mode="create" to ifGenerationMatch=0)."""
  workdir = f"memory://locks-{os.getpid()}/run"
  first = workdir_lock.acquire(workdir)
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()}"):
    workdir_lock.acquire(workdir)       # this process is alive: not stale
  first.release()
  workdir_lock.acquire(workdir).release()


def test_lock_released_on_exception(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError):
    with workdir_lock.held(str(workdir)):
      assert (workdir / workdir_lock.LOCK_FILE).exists()
      raise RuntimeError("boom")
  assert not (workdir / workdir_lock.LOCK_FILE).exists()
