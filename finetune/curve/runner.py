"""The learning-curve command: check everything, run the cells not yet finished, report.

Every input is checked before the first cell trains (each arm's checkpoint, tokenizer and
vocabulary, the task's files, the sizes against the training set). Finished cells are read back
from results.jsonl and skipped; the others run in order (small sizes first) in this process or in
`workers` spawned processes, each line of progress saying which cell finished, its score, its
seconds and the time left. Compiled programs are cached on disk (WORKDIR/compile_cache unless
JAX_COMPILATION_CACHE_DIR is set): cells of one size share them across seeds and arms.
"""

from __future__ import annotations

from concurrent import futures
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import time
from typing import Any

import fsspec

from finetune.curve import plan
from finetune.curve import report
from finetune.curve import worker
from pretrain import checkpoint_integrity as integrity
from pretrain.console import UserError


@dataclasses.dataclass(frozen=True)
class CurveSpec:
  sizes: list[str]            # numbers of training examples, or "all"
  seeds: int
  arms: list[str]             # built-in arm names or --extra names
  checkpoint: str = ""
  extras: list[str] = dataclasses.field(default_factory=list)       # NAME=PATH
  overrides: list[str] = dataclasses.field(default_factory=list)    # ARM:KEY=VALUE
  min_steps: int = 0
  workers: int = 1
  plot: bool = True


def _weights_identity(pretrained) -> str:
  """The checkpoint an arm starts from, as its step and the SHA-256 of the checksum record written
  beside it: a checkpoint rewritten in place counts as another one."""
  if pretrained is None:
    return ""
  record = os.path.join(os.path.dirname(pretrained.state_path), integrity.CHECKSUMS_FILE)
  try:
    with fsspec.open(record, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  except FileNotFoundError:
    digest = "unrecorded"
  return f"{pretrained.workdir} step {pretrained.step} {digest}"


def _check_arm(config) -> tuple[Any, str]:
  """(The arm's task, its weights' identity) once its checkpoint, tokenizer, vocabulary and files
  pass the checks a fine-tuning run makes at its start."""
  from finetune import train  # pylint: disable=g-import-not-at-top
  from finetune import task as task_lib  # pylint: disable=g-import-not-at-top
  task_lib.check_inputs(config)
  pretrained, tokenizer = train.load_pretrained(config)
  model_config = train.model_config_for(config, pretrained)
  train.check_tokenizer(config, tokenizer, pretrained, model_config)
  return task_lib.make_task(config, tokenizer), _weights_identity(pretrained)


def _arm_configs(config, arms: list[plan.Arm], min_steps: int
                 ) -> tuple[dict[str, Any], dict[str, str], Any]:
  """({arm: config}, {arm: fingerprint}, the task of the first arm), every arm checked; an error
  names the arm."""
  from finetune import train  # pylint: disable=g-import-not-at-top
  configs, fingerprints, tasks = {}, {}, []
  for arm in arms:
    configs[arm.name] = plan.arm_config(config, arm, span_task=config.task.startswith("squad"))
    try:
      train.check_settings(configs[arm.name])
      task, weights = _check_arm(configs[arm.name])
    except (ValueError, OSError) as e:
      raise UserError(f"arm {arm.name}: {e}") from e
    tasks.append(task)
    fingerprints[arm.name] = plan.fingerprint(configs[arm.name], weights, min_steps)
  return configs, fingerprints, tasks[0]


_CACHE_DIR, _CACHE_MIN_SECONDS = ("JAX_COMPILATION_CACHE_DIR",
                                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


@contextlib.contextmanager
def _compile_cache(workdir: str):
  """Caches compiled programs on disk while the cells run, in this process and in the workers it
  spawns (JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compile_cache; every program, however
  quick to compile, unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise). The
  process's previous setting is put back afterwards."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import (  # pylint: disable=g-import-not-at-top
      compilation_cache)
  saved_env = {k: os.environ.get(k) for k in (_CACHE_DIR, _CACHE_MIN_SECONDS)}
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  os.environ.setdefault(_CACHE_DIR, os.path.join(workdir, "compile_cache"))
  os.environ.setdefault(_CACHE_MIN_SECONDS, "0")
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ[_CACHE_MIN_SECONDS]))
  compilation_cache.reset_cache()      # JAX reads the directory once, at its first compilation
  try:
    yield
  finally:
    for key, value in saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    for key, value in saved.items():
      jax.config.update(key, value)
    compilation_cache.reset_cache()


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.0f} min"
  return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def _execute(jobs: list[tuple[plan.Cell, Any, str]], workers: int):
  """Yields (cell, result) as cells finish: in this process, or in `workers` spawned processes."""
  if workers == 1:
    for cell, config, cell_dir in jobs:
      yield cell, worker.run_cell(config, cell_dir)
    return
  context = multiprocessing.get_context("spawn")
  slots = context.Queue()
  for i in range(workers):
    slots.put(i)
  with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=worker.start_worker,
                                   initargs=(slots, worker.worker_environments(workers))) as pool:
    pending = {pool.submit(worker.run_cell, config, cell_dir): cell
               for cell, config, cell_dir in jobs}
    try:
      for future in futures.as_completed(pending):
        yield pending[future], future.result()
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise


@dataclasses.dataclass(frozen=True)
class _Curve:
  """What the checks established: the arms and their configs, the sizes, the task's figures."""
  arms: list[plan.Arm]
  configs: dict[str, Any]                # arm -> its fine-tuning config
  fingerprints: dict[str, str]           # arm -> plan.fingerprint
  setting: str                           # plan.setting: what every arm shares
  sizes: list[int | None]
  num_examples: int                      # the whole training set
  metric: str                            # the task's main metric, e.g. dev/accuracy
  decimals: int
  title: str


def _prepare(config, spec: CurveSpec) -> _Curve:
  """Every check, before anything trains: flags, each arm's inputs, the sizes against the data."""
  if config.seeds != 1:
    raise UserError(f"config.seeds={config.seeds}: a curve's seeds are --seeds=N, from config.seed")
  bad = [f"--{flag}={value} must be at least {least}"
         for flag, value, least in (("seeds", spec.seeds, 1), ("workers", spec.workers, 1),
                                    ("min_steps", spec.min_steps, 0)) if value < least]
  if bad:
    raise UserError(", ".join(bad))
  if spec.plot:
    report.import_pyplot()                # no matplotlib: say so now, not after hours of training
  sizes = plan.parse_sizes(spec.sizes)
  checkpoint = spec.checkpoint or config.init_checkpoint
  arms = plan.parse_arms(spec.arms, checkpoint, spec.extras, spec.overrides)
  configs, fingerprints, task = _arm_configs(config, arms, spec.min_steps)
  num_examples = len(task.all_train_examples())
  data = config.data.get("dir") or config.data.get("train_file") or config.data.source
  plan.check_sizes(sizes, num_examples, config.train.batch_size, data)
  return _Curve(arms, configs, fingerprints,
                plan.setting(config, checkpoint, spec.min_steps), sizes,
                num_examples, task.main_metric, 1 if task.kind == "span" else 3,
                f"{config.task} on {os.path.basename(data.rstrip('/'))}, {task.main_metric}")


def _run_cells(curve: _Curve, cells: list[plan.Cell], done: dict, workdir: str, workers: int,
               min_steps: int) -> int:
  """Runs the unfinished `cells`, appending each result to results.jsonl and to `done` and printing
  its line; returns how many ran."""
  todo = [c for c in cells if c.key not in done]
  jobs = [(c, plan.cell_config(curve.configs[c.arm], c, c.size or curve.num_examples, min_steps),
           os.path.join(workdir, "cells", c.arm, f"n{c.size_label}_seed{c.seed}")) for c in todo]
  start, count = time.perf_counter(), len(cells) - len(todo)
  with _compile_cache(workdir):
    for ran, (cell, result) in enumerate(_execute(jobs, min(workers, max(len(jobs), 1))), 1):
      row = report.make_row(cell, cell.size or curve.num_examples, curve.metric, result,
                            curve.fingerprints[cell.arm], curve.setting)
      report.append_result(workdir, row)
      done[cell.key], count = row, count + 1
      left = (time.perf_counter() - start) / ran * (len(todo) - ran)
      print(f"cell {count}/{len(cells)} {cell.describe()}: {curve.metric.split('/')[-1]} "
            f"{row['value']:.{curve.decimals}f} ({_duration(result['seconds'])})"
            + (f", ETA {_duration(left)}" if ran < len(todo) else ""), flush=True)
  return len(todo)


def run(config, workdir: str, spec: CurveSpec) -> dict[str, Any]:
  """Runs the curve's unfinished cells; writes results.jsonl, table.md and (with spec.plot)
  curve.png in `workdir`. Returns the counts of cells and the table."""
  curve = _prepare(config, spec)
  os.makedirs(workdir, exist_ok=True)
  results = report.read_results(workdir)
  done = report.finished(results, curve.fingerprints)
  cells = plan.make_cells(curve.arms, curve.sizes, config.seed, spec.seeds)
  skipped = sum(c.key in done for c in cells)
  print(f"{len(cells)} cells ({len(curve.arms)} arms x {len(curve.sizes)} sizes x {spec.seeds} "
        f"seeds): {skipped} finished earlier, {len(cells) - skipped} to run"
        + (f" in {spec.workers} processes" if skipped < len(cells) and spec.workers > 1 else ""),
        flush=True)
  trained = _run_cells(curve, cells, done, workdir, spec.workers, spec.min_steps)

  earlier = report.other_arms(results, curve.setting, cells)    # arms of earlier runs too
  rows = [done[c.key] for c in cells if c.key in done] + list(earlier.values())
  arms = [a.name for a in curve.arms] + list(dict.fromkeys(arm for arm, _, _ in earlier))
  labels = [plan.size_label(s) for s in curve.sizes]
  text = report.table(rows, arms, labels, spec.seeds, curve.num_examples, curve.title,
                      curve.decimals)
  with open(os.path.join(workdir, report.TABLE), "w", encoding="utf-8") as f:
    f.write(text)
  print("\n" + text, flush=True)
  if spec.plot:
    report.plot(rows, arms, labels, curve.title, curve.metric, os.path.join(workdir, report.FIGURE))
  return {"cells": len(cells), "skipped": skipped, "trained": trained, "table": text}
