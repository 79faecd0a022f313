"""Reading the JSON lines back: time and step to a target accuracy, and the figure.

A run is (system, name, seed); when the file holds it several times (a command run again), the
latest `run_id` counts.
"""

from __future__ import annotations

from collections.abc import Iterable
import json
from typing import Any

Run = tuple[str, str, int]      # (system, name, seed)


def read_records(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
