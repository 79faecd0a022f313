"""The official GLUE metrics in plain numpy: accuracy, F1, Matthews correlation, Pearson, Spearman.

Plain numpy (no scikit-learn at run time) keeps the fine-tuning install small; the tests check every
function against scikit-learn and scipy on random predictions.

Degenerate inputs follow scikit-learn where it defines a value and give 0.0 where a statistic is
undefined (F1 with no positive prediction or label, MCC or a correlation when one side is constant).
0.0 rather than NaN keeps best-checkpoint selection by the main metric meaningful early in training,
when a model often predicts one class or a constant score.
"""

from __future__ import annotations

import numpy as np


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
  """Both inputs as 1-D arrays of one length, or a ValueError that says what is wrong."""
  predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
  if predictions.shape != labels.shape:
    raise ValueError(f"{predictions.size} predictions for {labels.size} labels")
  if predictions.size == 0:
    raise ValueError("no predictions to score")
  return predictions, labels


def accuracy(predictions, labels) -> float:
  """Fraction of predictions equal to their label."""
  predictions, labels = _pair(predictions, labels)
  return float(np.mean(predictions == labels))


def f1(predictions, labels, positive=1) -> float:
  """Binary F1 of the `positive` class (GLUE's MRPC and QQP use class 1), 0.0 when undefined."""
  predictions, labels = _pair(predictions, labels)
  predicted, actual = predictions == positive, labels == positive
  true_positives = np.count_nonzero(predicted & actual)
  denominator = np.count_nonzero(predicted) + np.count_nonzero(actual)
  return 2.0 * true_positives / denominator if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation coefficient; for K > 2 classes Gorodkin's R_K (GLUE's AX uses it as R3).

  Computed from the confusion matrix as (c*n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)), where c is
  the number correct, n the number of examples, t and p the per-class counts of labels and
  predictions. 0.0 when every label or every prediction is one class (the denominator vanishes).
  """
  predictions, labels = _pair(predictions, labels)
  classes, inverse = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
  true_counts = np.bincount(inverse[:labels.size], minlength=classes.size).astype(np.float64)
  pred_counts = np.bincount(inverse[labels.size:], minlength=classes.size).astype(np.float64)
  n = float(labels.size)
  correct = float(np.count_nonzero(predictions == labels))
  numerator = correct * n - true_counts @ pred_counts
  denominator = np.sqrt((n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts))
  return float(numerator / denominator) if denominator > 0 else 0.0


def pearson(predictions, labels) -> float:
  """Pearson's r, in float64; 0.0 when either side is constant."""
  x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt((x @ x) * (y @ y))
  return float(np.clip((x @ y) / denominator, -1.0, 1.0)) if denominator > 0 else 0.0


def rankdata(values) -> np.ndarray:
  """1-based ranks, ties sharing the average of the ranks they span (scipy's method="average")."""
  values = np.asarray(values).reshape(-1)
  order = np.argsort(values, kind="stable")
  ordered = values[order]
  starts_run = np.concatenate([[True], ordered[1:] != ordered[:-1]])
  run_of = np.cumsum(starts_run) - 1                          # which run of equal values
  run_starts = np.flatnonzero(starts_run)
  run_ends = np.append(run_starts[1:], values.size)          # exclusive
  ranks = np.empty(values.size, np.float64)
  ranks[order] = ((run_starts + run_ends + 1) / 2.0)[run_of]  # mean of start+1 .. end
  return ranks


def spearman(predictions, labels) -> float:
  """Spearman's rho: Pearson's r of the average ranks; 0.0 when either side is constant."""
  predictions, labels = _pair(predictions, labels)
  return pearson(rankdata(predictions), rankdata(labels))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
