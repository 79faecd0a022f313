"""What `python -m pretrain` says around a run: one line when the workdir's run has already
finished, and a summary at the end (steps, wall time, final losses and held-out MLM accuracy, where
the checkpoints are, the next command).

`run(config, workdir)` wraps `pretrain.train.run`; the library call itself prints nothing of this.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

import fsspec
import jax
import ml_collections

from pretrain import checkpoint_integrity as integrity


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps saved under WORKDIR/checkpoints (finished saves only), without opening them."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  fs, path = fsspec.core.url_to_fs(directory)
  if not fs.exists(path):
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(directory))


def finished_line(workdir: str, config: ml_collections.ConfigDict) -> str | None:
  """One line if the workdir already holds an intact checkpoint at (or past)
  train.num_train_steps. A damaged one does not count: the run falls back to the step before it
  and trains to the end again."""
  steps = checkpoint_steps(workdir)
  target = config.train.num_train_steps
  if not steps or steps[-1] < target:
    return None
  if integrity.verify(os.path.join(workdir, "checkpoints", str(steps[-1]))):
    return None
  return (f"{workdir} already finished: its checkpoint is at step {steps[-1]} and "
          f"train.num_train_steps={target}; nothing to do (raise train.num_train_steps to train "
          "on, or give another --workdir)")


def _last(records: list[dict[str, Any]], key: str) -> tuple[int, float] | None:
  for record in reversed(records):
    if key in record:
      return record["step"], record[key]
  return None


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def summary_lines(workdir: str, config: ml_collections.ConfigDict, step: int, seconds: float,
                  started_at: int) -> list[str]:
  """The end-of-run summary, from the workdir's metrics.jsonl and checkpoints."""
  from pretrain.logs import read_metrics  # pylint: disable=g-import-not-at-top
  target = config.train.num_train_steps
  try:
    records = read_metrics(workdir)
  except FileNotFoundError:
    records = []
  done = step >= target
  trained = f"steps {started_at + 1}-{step}" if started_at else f"{step} steps"
  lines = [f"{'finished' if done else 'stopped'}: {trained} of {target} in {_duration(seconds)}"]
  loss, accuracy = (_last(records, f"train/{k}") for k in ("loss", "mlm_accuracy"))
  if loss and accuracy:
    lines.append(f"  train (step {loss[0]}): loss {loss[1]:.3f}, MLM accuracy {accuracy[1]:.3f}")
  held_out = [_last(records, f"eval/{k}") for k in ("mlm_loss", "mlm_accuracy")]
  if held_out[1]:
    lines.append(f"  held-out (step {held_out[1][0]}): MLM loss {held_out[0][1]:.3f}, "
                 f"MLM accuracy {held_out[1][1]:.3f}")
  steps = checkpoint_steps(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  lines.append(f"  checkpoints: {ckpt_dir} (steps {', '.join(map(str, steps)) or 'none'}); "
               f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
  if not done:
    lines.append("  run the same command again to continue from the last checkpoint")
  else:
    here = _relative(workdir)
    lines.append("next, fine-tune it on a GLUE task (data.dir: the task's folder of the GLUE "
                 "download; SQuAD: configs/squad.py:v1.1):")
    lines.append(f"  python -m finetune --config=configs/glue.py:sst2 --workdir="
                 f"{shlex.quote(here.rstrip('/') + '-sst2')} --config.init_checkpoint="
                 f"{shlex.quote(here)} --config.data.dir=glue_data/SST-2")
  return lines


def _relative(path: str) -> str:
  if "://" in path:
    return path
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """`pretrain.train.run` with the command line's messages around it (process 0 prints them)."""
  from pretrain import train  # pylint: disable=g-import-not-at-top
  line = finished_line(workdir, config)
  if line is not None:
    if jax.process_index() == 0:
      print(line, file=sys.stderr, flush=True)
    return None
  steps = checkpoint_steps(workdir)
  started_at = steps[-1] if steps else 0
  start = time.perf_counter()
  state = train.run(config, workdir)
  if jax.process_index() == 0:
    print("\n".join(summary_lines(workdir, config, int(state.step),
                                  time.perf_counter() - start, started_at)), flush=True)
  return state
