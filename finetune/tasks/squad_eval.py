"""The official SQuAD metrics: exact match and token F1 (v1.1 and v2.0), and v2.0's null-odds
threshold search.

Scores follow the official evaluation scripts, so figures compare with published ones: answers are
normalised (lowercase, punctuation dropped, the articles a/an/the dropped, whitespace collapsed)
before comparison; each question scores its best gold answer; a question without gold answers has
the gold answer "" and scores 1 only for an empty prediction. Reported figures are percentages.

Deliberate differences from evaluate-v2.0.py, which only show where that script is inconsistent:
- the main `exact`/`f1` score the predictions as given; the script also applies its
  `--na-prob-thresh` (1.0) to the null odds, which re-thresholds predictions `postprocess` has
  already thresholded;
- the threshold search moves questions with equal null odds together (a threshold cannot separate
  them), and when predicting no answer everywhere is best it reports a threshold below every null
  odds rather than 0.0;
- a question without a prediction scores 0 (v1.1's rule); the v2.0 script leaves it out.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
  """The official answer normalisation, in its order: lowercase, drop punctuation, drop articles,
  collapse whitespace."""
  text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
  return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
  """Harmonic mean of token precision and recall over the normalised answers (bags of words).

  When either side normalises to nothing, the score is 1 if both do and 0 otherwise.
  """
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not predicted or not expected:
    return float(predicted == expected)
  common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


def gold_answers(example) -> list[str]:
  """The texts a prediction is scored against: gold answers that normalise to something, or [""]
  for a question without one."""
  texts = [text for text, _ in example.answers if normalize_answer(text)]
  return texts or [""]


def best_threshold(scores: np.ndarray, null_odds: np.ndarray, has_answer: np.ndarray,
                   has_prediction: np.ndarray) -> tuple[float, float]:
  """(best total score in %, threshold) over thresholds t on the null odds.

  At threshold t a question keeps its prediction (scoring `scores`) where null_odds <= t and is
  answered "" otherwise (scoring 1 when it has no gold answer, 0 when it has one). Questions without
  a prediction score 0 either way.
  """
  forced = np.where(has_prediction, ~has_answer, False).astype(np.float64)
  gain = np.where(has_prediction, scores - forced, 0.0)
  order = np.argsort(null_odds, kind="stable")
  odds, totals = null_odds[order], forced.sum() + np.cumsum(gain[order])
  last_of_tie = np.append(odds[1:] != odds[:-1], True) & np.isfinite(odds)
  best_total, best = forced.sum(), (odds[0] - 1.0 if np.isfinite(odds[0]) else 0.0)
  if last_of_tie.any():
    candidates = np.flatnonzero(last_of_tie)
    k = candidates[np.argmax(totals[candidates])]  # the lowest threshold among equal totals
    if totals[k] > best_total:
      best_total, best = totals[k], float(odds[k])
  return 100.0 * float(best_total) / len(scores), float(best)


def evaluate(examples: Sequence[Any], predictions: Mapping[str, str],
             null_odds: Mapping[str, float] | None = None) -> dict[str, float]:
  """Official EM and F1 of `predictions` ({qas_id: text}) on `examples` (SquadExample-like).

  Returns exact, f1, total (and missing, where questions lack a prediction); where some questions
  have no answer (v2.0) or `null_odds` are given, the same figures for HasAns_ and NoAns_
  questions; with `null_odds`, the threshold search: best_exact, best_exact_thresh, best_f1,
  best_f1_thresh. The search needs each question's best non-null answer, so give the predictions
  of `squad.apply_null_threshold(nbest, null_odds, math.inf)`, then make the final predictions at
  best_f1_thresh (searching on predictions already thresholded at 0 cannot bring back the answers
  it blanked out; the google-research/bert + official-script flow has that flaw).
  """
  if not examples:
    raise ValueError("evaluate: no examples to score")
  n = len(examples)
  exact, f1 = np.zeros(n), np.zeros(n)
  has_answer = np.array([bool(e.answers) for e in examples])
  has_prediction = np.array([e.qas_id in predictions for e in examples])
  for k, example in enumerate(examples):
    if has_prediction[k]:
      prediction = predictions[example.qas_id]
      golds = gold_answers(example)
      exact[k] = max(exact_match(prediction, g) for g in golds)
      f1[k] = max(f1_score(prediction, g) for g in golds)
  result = {"exact": 100.0 * float(exact.mean()), "f1": 100.0 * float(f1.mean()), "total": n}
  if not has_prediction.all():
    result["missing"] = int(n - has_prediction.sum())
  if null_odds is not None or not has_answer.all():
    for prefix, subset in (("HasAns_", has_answer), ("NoAns_", ~has_answer)):
      if subset.any():
        result.update({prefix + "exact": 100.0 * float(exact[subset].mean()),
                       prefix + "f1": 100.0 * float(f1[subset].mean()),
                       prefix + "total": int(subset.sum())})
  if null_odds is not None:
    lacking = [e.qas_id for e, p in zip(examples, has_prediction)
               if p and e.qas_id not in null_odds]
    if lacking:
      raise ValueError(f"null_odds lack {len(lacking)} predicted questions, e.g. {lacking[:3]}")
    odds = np.array([null_odds[e.qas_id] if p else np.inf
                     for e, p in zip(examples, has_prediction)], np.float64)
    for name, scores in (("exact", exact), ("f1", f1)):
      score, threshold = best_threshold(scores, odds, has_answer, has_prediction)
      result.update({f"best_{name}": score, f"best_{name}_thresh": threshold})
  return result
