"""A learning curve's outputs: results.jsonl (one line per finished cell), the markdown table
(median and min-max over the seeds, per arm and size) and the PNG (metric against labelled
examples).
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from finetune.curve.plan import ALL, Cell
from pretrain.console import UserError

RESULTS, TABLE, FIGURE = "results.jsonl", "table.md", "curve.png"


def read_results(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def append_result(workdir: str, row: dict[str, Any]):
  with open(os.path.join(workdir, RESULTS), "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def finished(rows: list[dict[str, Any]], fingerprints: dict[str, str]) -> dict[tuple, dict]:
  """The rows of this curve's arms by cell key; a row an arm wrote with another setup (config,
  checkpoint or --min_steps) is refused rather than mixed into the new results."""
  done = {}
  for row in rows:
    if row["arm"] not in fingerprints:
      continue
    if row["fingerprint"] != fingerprints[row["arm"]]:
      raise UserError(f"{RESULTS} holds {row['arm']} cells of another setup (its checkpoint, "
                      "config or --min_steps differ); give a new --workdir, or remove that arm's "
                      "lines to redo them")
    done[(row["arm"], str(row["size"]), row["seed"])] = row
  return done


def other_arms(rows: list[dict[str, Any]], setting: str, cells: list[Cell]) -> dict[tuple, dict]:
  """The rows of arms other than those of `cells` that a curve of the same setting (plan.setting)
  wrote for the sizes and seeds of `cells`, by cell key: arms an earlier run added, which the table
  and figure show too."""
  arms, wanted = {c.arm for c in cells}, {c.key[1:] for c in cells}
  found = {}
  for row in rows:
    key = (row["arm"], str(row["size"]), row["seed"])
    if row.get("setting") == setting and row["arm"] not in arms and key[1:] in wanted:
      found[key] = row
  return found


def make_row(cell: Cell, examples: int, metric: str, result: dict[str, Any], fingerprint: str,
             setting: str) -> dict[str, Any]:
  return {"arm": cell.arm, "size": cell.size or ALL, "examples": examples, "seed": cell.seed,
          "metric": metric, "value": result["metrics"][metric], "metrics": result["metrics"],
          "steps": result["steps"], "seconds": result["seconds"], "fingerprint": fingerprint,
          "setting": setting}


def _values(rows, arm: str, size_label: str) -> list[float]:
  return [r["value"] for r in rows if r["arm"] == arm and str(r["size"]) == size_label]


def _size_header(size_label: str, num_examples: int) -> str:
  return f"all ({num_examples:,})" if size_label == ALL else f"n={int(size_label):,}"


def table(rows: list[dict[str, Any]], arms: list[str], size_labels: list[str], seeds: int,
          num_examples: int, title: str, decimals: int) -> str:
  """Markdown: one row per arm, one column per size; median (min-max) of the seeds finished, with
  [k/seeds] where fewer than all of them are."""
  lines = [f"{title}: median (min-max) over {seeds} seed{'s' * (seeds > 1)}", "",
           "| arm | " + " | ".join(_size_header(s, num_examples) for s in size_labels) + " |",
           "| --- |" + " --- |" * len(size_labels)]
  for arm in arms:
    cells = []
    for size_label in size_labels:
      values = _values(rows, arm, size_label)
      if not values:
        cells.append("-")
        continue
      text = f"{statistics.median(values):.{decimals}f}"
      if len(values) > 1:
        text += f" ({min(values):.{decimals}f}-{max(values):.{decimals}f})"
      if len(values) < seeds:
        text += f" [{len(values)}/{seeds}]"
      cells.append(text)
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def import_pyplot():
  """matplotlib's pyplot without a display, or one line saying how to get it."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("the curve's PNG needs matplotlib: pip install matplotlib, or pass --noplot "
                    "for the table alone") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot(rows: list[dict[str, Any]], arms: list[str], size_labels: list[str], title: str,
         metric: str, path: str):
  """Metric against labelled examples (log x): per arm the median of the seeds, the min-max band."""
  plt = import_pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  ticks = set()
  for arm in arms:
    points = []
    for size_label in size_labels:
      values = _values(rows, arm, size_label)
      if values:
        examples = next(r["examples"] for r in rows
                        if r["arm"] == arm and str(r["size"]) == size_label)
        points.append((examples, statistics.median(values), min(values), max(values)))
    if not points:
      continue
    x, median, low, high = zip(*points)
    ticks.update(x)
    line, = ax.plot(x, median, marker="o", label=arm)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xscale("log")
  ax.set_xticks(sorted(ticks), [f"{t:,}" for t in sorted(ticks)])
  ax.minorticks_off()
  ax.set_xlabel("labelled training examples")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
