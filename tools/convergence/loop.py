"""The one training loop both sides run, and the JSON lines it writes.

A side (`reference.Reference`, `ours.Ours`) dispatches steps without waiting for them; the loop
reads their losses back every `log_every` steps (and at evaluations), evaluates every `eval_every`
steps on the same held-out batches, and stops at `num_steps`, after `max_seconds`, or (with
`stop_at_target`) at the first evaluation whose MLM accuracy reaches `target`. So both sides sync
with the host at the same steps, and their clocks count the same things.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import time
from typing import Any, Protocol


class Side(Protocol):
  """One system under test: its own model, optimizer and batch pipeline."""
  system: str            # "ours" or "reference"
  info: dict[str, Any]   # device, versions, paths taken: goes into the "start" record

  def batches(self) -> Iterator[Any]: ...          # the training batches, ready for `step`
  def step(self, batch: Any) -> Any: ...           # dispatch one step; a handle on its metrics
  def fetch(self, handles: list[Any]) -> list[dict[str, float]]: ...   # waits; one dict a step
  def evaluate(self) -> dict[str, float]: ...      # held-out loss/accuracy (heads.summarize keys)
  def hf_state_dict(self) -> dict[str, Any]: ...   # final weights in transformers' names
  def close(self) -> None: ...


@dataclasses.dataclass
class Recorder:
  """Appends one JSON object per line to `path`; every record names its run and system."""
  path: str
  system: str
  name: str
  seed: int
  run_id: str
  start_time: float       # time.time() when this side's process (or, in-process, its run) began
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def write(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
    record = dict(system=self.system, name=self.name, seed=self.seed, run_id=self.run_id,
                  kind=kind, step=step, wall_s=round(time.time() - self.start_time, 3), **values)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    self.records.append(record)
    return record


@dataclasses.dataclass(frozen=True)
class Schedule:
  num_steps: int
  log_every: int = 10
  eval_every: int = 200
  max_seconds: float = 0.0       # per side; 0 = no limit
  target: float = 0.0            # held-out MLM accuracy; 0 = none
  stop_at_target: bool = False


def train(side: Side, recorder: Recorder, schedule: Schedule) -> list[dict[str, Any]]:
  """Trains `side` as `schedule` says; returns (and writes) its records."""
  pending: list[Any] = []
  step, eval_s, reason, reached = 0, 0.0, "num_train_steps", None
  batches = side.batches()
  try:
    while step < schedule.num_steps:
      pending.append(side.step(next(batches)))
      step += 1
      is_eval = step % schedule.eval_every == 0 or step == schedule.num_steps
      if not (is_eval or step % schedule.log_every == 0):
        continue
      for i, values in enumerate(side.fetch(pending)):
        recorder.write("train", step - len(pending) + 1 + i, **values)
      pending = []
      out_of_time = (schedule.max_seconds > 0
                     and time.time() - recorder.start_time > schedule.max_seconds)
      if is_eval or out_of_time:
        start = time.perf_counter()
        metrics = side.evaluate()
        eval_s += time.perf_counter() - start
        record = recorder.write("eval", step, **metrics, eval_s_total=round(eval_s, 3))
        print(f"{side.system} step {step} ({record['wall_s']:.1f} s): held-out MLM accuracy "
              f"{metrics['mlm_accuracy']:.4f}, loss {metrics['loss']:.4f}", flush=True)
        if schedule.target and reached is None and metrics["mlm_accuracy"] >= schedule.target:
          reached = record
          if schedule.stop_at_target:
            reason = "target"
            break
      if out_of_time:
        reason = "max_seconds"
        break
  finally:
    side.close()
  end = dict(reason=reason, eval_s_total=round(eval_s, 3))
  if schedule.target:
    end.update(target_mlm_accuracy=schedule.target,
               target_step=reached and reached["step"], target_wall_s=reached and reached["wall_s"])
  recorder.write("end", step, **end)
  return recorder.records
