"""Reading the JSON lines back: time and step to a target accuracy, and the figure.

A run is (system, name, seed); when the file holds it several times (a command run again), the
latest `run_id` counts. A partial last line (a run killed while writing it) is skipped with a
warning; a bad line elsewhere is an error naming the file and the line.
"""

from __future__ import annotations

from collections.abc import Iterable
import json
import os
import sys
from typing import Any

import numpy as np

from pretrain.console import UserError

Run = tuple[str, str, int]      # (system, name, seed)


def read_records(path: str, cut_partial: bool = False) -> list[dict[str, Any]]:
  """The records of `path`, but a partial last line, skipped with a warning (with `cut_partial`
  also cut from the file, so that the next records appended do not run on from it)."""
  with open(path, "rb") as f:
    lines = f.read().splitlines(keepends=True)
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line.strip())
      if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except ValueError as e:               # json.JSONDecodeError, UnicodeDecodeError
      if i < last:
        where = (f"{e.msg.removesuffix(' at')} at column {e.colno}"
                 if isinstance(e, json.JSONDecodeError) else str(e))
        raise UserError(f"{path}: line {i + 1} is not a JSON record ({where}); repair or remove "
                        "that line") from None
      cut = "; cut it from the file" if cut_partial else ""
      print(f"warning: {path}: skipped its last line, a partial record (a run killed while "
            f"writing it){cut}", file=sys.stderr, flush=True)
      if cut_partial:
        os.truncate(path, sum(map(len, lines[:i])))
      continue
    records.append(record)
  return records


def latest_runs(records: Iterable[dict[str, Any]]) -> dict[Run, list[dict[str, Any]]]:
  """Each run's records from its latest run_id, in file order."""
  records = list(records)
  latest: dict[Run, str] = {}
  for r in records:
    key = (r["system"], r["name"], r["seed"])
    latest[key] = max(latest.get(key, r["run_id"]), r["run_id"])
  runs: dict[Run, list[dict[str, Any]]] = {k: [] for k in latest}
  for r in records:
    key = (r["system"], r["name"], r["seed"])
    if r["run_id"] == latest[key]:
      runs[key].append(r)
  return runs


def first_reaching(records: Iterable[dict[str, Any]], target: float) -> dict[str, Any] | None:
  """The first eval record whose held-out MLM accuracy is at least `target`, or None."""
  return next((r for r in records if r["kind"] == "eval" and r["mlm_accuracy"] >= target), None)


def target_lines(records: Iterable[dict[str, Any]], target: float) -> list[str]:
  """One line per run: when it first reached `target`; then ours/reference time ratios."""
  lines, reached = [], {}
  for (system, name, seed), run in latest_runs(records).items():
    hit = first_reaching(run, target)
    label = f"{system} ({name}, seed {seed})"
    if hit is None:
      best = max((r["mlm_accuracy"] for r in run if r["kind"] == "eval"), default=float("nan"))
      lines.append(f"{label}: did not reach held-out MLM accuracy {target:.4f} "
                   f"(best {best:.4f})")
    else:
      reached[(system, name, seed)] = hit
      lines.append(f"{label}: held-out MLM accuracy {hit['mlm_accuracy']:.4f} >= {target:.4f} "
                   f"at step {hit['step']}, {hit['wall_s']:.1f} s")
  references = {seed: (name, hit) for (system, name, seed), hit in reached.items()
                if system == "reference"}
  for (system, name, seed), hit in reached.items():
    if system == "ours" and seed in references:
      ref_name, ref = references[seed]
      lines.append(f"ours ({name}) vs reference ({ref_name}), seed {seed}: "
                   f"{ref['wall_s'] / hit['wall_s']:.2f}x sooner "
                   f"({hit['wall_s']:.1f} s vs {ref['wall_s']:.1f} s; steps {hit['step']} vs "
                   f"{ref['step']})")
  return lines


def eval_curves(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict]]:
  """{(system, name): {seed: {step: held-out MLM accuracy}}}, latest run of each."""
  curves: dict[tuple[str, str], dict[int, dict]] = {}
  for (system, name, seed), run in latest_runs(records).items():
    curves.setdefault((system, name), {})[seed] = {
        r["step"]: r["mlm_accuracy"] for r in run if r["kind"] == "eval"}
  return curves


def parity_lines(records: Iterable[dict[str, Any]], every: int = 1) -> list[str]:
  """Learning per step across seeds. At the steps every run evaluated (each `every`-th of them
  printed), each (system, name)'s held-out MLM accuracy over its seeds, mean [min, max]; then,
  for each of ours against the reference, the gap between their seed means next to the gap
  between the reference's own seeds, and at how many steps ours lies within the reference's
  seed range."""
  curves = eval_curves(records)
  runs = [steps for seeds in curves.values() for steps in seeds.values()]
  if not runs:
    return []
  common = sorted(set.intersection(*(set(r) for r in runs)))
  groups = sorted(curves, key=lambda g: (g[0] != "reference", g))
  stats = {g: {s: np.array([curves[g][seed][s] for seed in sorted(curves[g])]) for s in common}
           for g in groups}
  header = "step " + " | ".join(f"{system} {name} ({len(curves[(system, name)])} seeds)"
                                for system, name in groups)
  lines = [header] + [
      f"{s} " + " | ".join(f"{stats[g][s].mean():.4f} [{stats[g][s].min():.4f}, "
                           f"{stats[g][s].max():.4f}]" for g in groups)
      for s in common[every - 1::every]]
  reference = [g for g in groups if g[0] == "reference"]
  if not reference or not common:
    return lines
  ref = stats[reference[0]]
  seed_gap = np.array([ref[s].max() - ref[s].min() for s in common])
  lines.append(f"reference seeds apart: mean {seed_gap.mean():.4f}, largest {seed_gap.max():.4f} "
               f"({len(common)} steps)")
  for g in groups:
    if g[0] == "ours":
      gap = np.array([stats[g][s].mean() - ref[s].mean() for s in common])
      inside = sum(ref[s].min() <= stats[g][s].mean() <= ref[s].max() for s in common)
      lines.append(f"ours ({g[1]}) - reference, seed means: mean {gap.mean():+.4f}, sd "
                   f"{gap.std():.4f}, largest |gap| {np.abs(gap).max():.4f}; within the "
                   f"reference's seed range at {inside} of {len(common)} steps")
  return lines


def plot(records: Iterable[dict[str, Any]], png: str, target: float = 0.0) -> None:
  """Held-out MLM accuracy against wall seconds and against steps, every run on one figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for (system, name, seed), run in sorted(latest_runs(records).items()):
    evals = [r for r in run if r["kind"] == "eval"]
    style = dict(linestyle="-" if system == "ours" else "--", marker=".",
                 label=f"{system} {name} s{seed}")
    axes[0].plot([r["wall_s"] for r in evals], [r["mlm_accuracy"] for r in evals], **style)
    axes[1].plot([r["step"] for r in evals], [r["mlm_accuracy"] for r in evals], **style)
  for ax, xlabel in zip(axes, ("wall-clock seconds since the side's process started", "step")):
    if target:
      ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("held-out MLM accuracy")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)
