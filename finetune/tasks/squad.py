"""SQuAD v1.1 and v2.0: readers, windowed features with character offsets, n-best decoding, files.

The path of the data:
  `read_squad_json` / `read_tfds` -> [SquadExample] -> `make_features` -> `Features` (numpy)
  -> the span head's start/end logits per feature -> `postprocess` -> predictions, n-best, null odds
  -> `evaluate` (the official metrics, in squad_eval.py) and `write_predictions`.

Answers are tied to tokens through the character offsets of `Tokenizer.encode_with_offsets`, not
through google-research/bert's whitespace words: a predicted span is cut out of the original context
by its first token's start and last token's end, so it is the exact original text (case, accents and
spacing kept) with no re-alignment of detokenised text, and the same code serves WordPiece and
SentencePiece.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from absl import logging

from finetune.tasks import squad_eval
from finetune.tasks import tfds_source

evaluate = squad_eval.evaluate   # the official metrics (squad_eval.py), here beside the rest


@dataclasses.dataclass
class SquadExample:
  """One question on one context.

  `answers` holds every gold (text, answer_start) pair, answer_start a character index into
  `context`; it is empty for v2.0 questions without an answer (`is_impossible`), whose "plausible
  answers" are not read: they are wrong answers by construction.
  """
  qas_id: str
  question: str
  context: str
  answers: list[tuple[str, int]]
  is_impossible: bool = False


def read_squad_json(path: str) -> list[SquadExample]:
  """The questions of an official SQuAD v1.1 / v2.0 JSON file (data -> paragraphs -> qas)."""
  with fsspec.open(str(path), "rt", encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                       f"{e.colno}") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise ValueError(f"{path} is not a SQuAD JSON file: expected an object with a 'data' list")
  examples = []
  try:
    for article in data["data"]:
      for paragraph in article["paragraphs"]:
        context = paragraph["context"]
        for qa in paragraph["qas"]:
          impossible = bool(qa.get("is_impossible", False))
          answers = [] if impossible else [(a["text"], int(a["answer_start"]))
                                           for a in qa.get("answers", [])]
          examples.append(SquadExample(str(qa["id"]), qa["question"], context, answers,
                                       impossible))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not the SQuAD layout (data -> paragraphs -> context, qas -> id, "
                     f"question, answers): {type(e).__name__} {e}") from None
  return examples


def read_tfds(name: str, split: str, data_dir: str | None = None) -> list[SquadExample]:
  """The questions of TFDS `squad/v1.1` or `squad/v2.0` (`split`: "train", "validation", ...)."""
  def text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  examples = []
  rows = tfds_source.records(name, split, data_dir, "tensorflow_datasets.question_answering.squad")
  for row in rows:
    impossible = bool(row.get("is_impossible", False))   # only squad/v2.0 has the feature
    answers = [] if impossible else [
        (text(t), int(s)) for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
    examples.append(SquadExample(text(row["id"]), text(row["question"]), text(row["context"]),
                                 answers, impossible))
  return examples


@dataclasses.dataclass
class Features:
  """Every window of every example, as numpy arrays with one row per window (N rows, length L).

  input_ids, input_mask, segment_ids: int32 [N, L], `[CLS] question [SEP] context-window [SEP]`
    then padding; segment 1 from the window's first token through the last [SEP].
  start_positions, end_positions: int32 [N], the first gold answer's token span where it lies wholly
    in this window, else 0 ([CLS], "no answer here"); all 0 unless made with is_training=True.
  example_index: int32 [N], the example the window belongs to.
  token_offsets: int32 [N, L, 2], [start, end) character offsets into the example's context; -1 for
    question, special and padding tokens.
  token_is_max_context: bool [N, L], True where this window gives the token its most context (of
    all windows holding it); only such tokens may start a predicted answer.
  """
  input_ids: np.ndarray
  input_mask: np.ndarray
  segment_ids: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_index: np.ndarray
  token_offsets: np.ndarray
  token_is_max_context: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


def _window_starts(num_tokens: int, room: int, stride: int) -> np.ndarray:
  """Window starts every `stride` tokens until a window reaches the end (one window if empty)."""
  starts = [0]
  while starts[-1] + room < num_tokens:
    starts.append(starts[-1] + min(stride, room))
  return np.array(starts)


def _max_context_window(num_tokens: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """For each context token, the window that gives it the most context (google-research/bert).

  A token's score in a window is min(tokens left of it, tokens right of it) + 0.01 * window length;
  the best-scoring window wins, the first on a tie.
  """
  position = np.arange(num_tokens)[None, :]
  start, length = starts[:, None], lengths[:, None]
  score = np.minimum(position - start, start + length - 1 - position) + 0.01 * length
  inside = (position >= start) & (position < start + length)
  return np.argmax(np.where(inside, score, -np.inf), axis=0)


def _answer_tokens(example: SquadExample, offsets: np.ndarray) -> tuple[int, int] | None:
  """Context token span (first, last) covering the first gold answer; None if it cannot be found."""
  text, start = example.answers[0]
  end = start + len(text)
  if example.context[start:end] != text:
    return None
  covered = np.flatnonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))
  return (int(covered[0]), int(covered[-1])) if covered.size else None


def make_features(examples: Sequence[SquadExample], tokenizer, *, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64,
                  is_training: bool) -> Features:
  """Windows of `max_seq_length` tokens over every example's context, `doc_stride` tokens apart.

  The question is cut to `max_query_length` tokens; the context gets the rest. With `is_training`,
  start/end positions label the first gold answer, and examples whose answer cannot be found in
  their context (answer_start does not point at the answer text) are left out, as
  google-research/bert does, rather than trained on a wrong span.
  """
  if max_seq_length - max_query_length - 3 < 1:
    raise ValueError(f"max_seq_length={max_seq_length} leaves no room for context after a "
                     f"{max_query_length}-token question and [CLS]/[SEP]/[SEP]; raise it or lower "
                     "max_query_length")
  if doc_stride < 1:
    raise ValueError(f"doc_stride={doc_stride}: must be at least 1 token")
  queries = [ids[:max_query_length] for ids, _ in
             tokenizer.encode_batch([e.question for e in examples])]
  contexts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  plans = []   # (example index, window starts, lengths, max-context window per token, answer span)
  skipped = 0
  for i, example in enumerate(examples):
    if example.context not in contexts:
      contexts[example.context] = tokenizer.encode_with_offsets(example.context)
    ids, offsets = contexts[example.context]
    span = None
    if is_training and example.answers and not example.is_impossible:
      span = _answer_tokens(example, offsets)
      if span is None:
        skipped += 1
        continue
    room = max_seq_length - len(queries[i]) - 3
    starts = _window_starts(len(ids), room, doc_stride)
    lengths = np.minimum(room, len(ids) - starts)
    plans.append((i, starts, lengths, _max_context_window(len(ids), starts, lengths), span))
  if skipped:
    logging.warning("make_features: left out %d of %d training examples whose answer text is not "
                    "at its answer_start in the context", skipped, len(examples))

  n = sum(len(starts) for _, starts, _, _, _ in plans)
  shape = (n, max_seq_length)
  input_ids = np.full(shape, tokenizer.pad_id, np.int32)
  input_mask, segment_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  token_offsets = np.full(shape + (2,), -1, np.int32)
  is_max_context = np.zeros(shape, bool)
  start_positions, end_positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
  example_index = np.zeros(n, np.int32)
  row = 0
  for i, starts, lengths, best_window, span in plans:
    query = queries[i]
    ids, offsets = contexts[examples[i].context]
    first = len(query) + 2   # position of the first context token
    for w, (start, length) in enumerate(zip(starts, lengths)):
      last = first + length  # position of the final [SEP]
      input_ids[row, :first] = [tokenizer.cls_id, *query, tokenizer.sep_id]
      input_ids[row, first:last] = ids[start:start + length]
      input_ids[row, last] = tokenizer.sep_id
      input_mask[row, :last + 1] = 1
      segment_ids[row, first:last + 1] = 1
      token_offsets[row, first:last] = offsets[start:start + length]
      is_max_context[row, first:last] = best_window[start:start + length] == w
      if span is not None and start <= span[0] and span[1] < start + length:
        start_positions[row] = first + span[0] - start
        end_positions[row] = first + span[1] - start
      example_index[row] = i
      row += 1
  return Features(input_ids, input_mask, segment_ids, start_positions, end_positions,
                  example_index, token_offsets, is_max_context)


# ------------------------------------------------------------------------------------------------
# Decoding


def _feature_spans(features: Features, f: int, start_logits: np.ndarray, end_logits: np.ndarray,
                   n_best_size: int, max_answer_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token (start, end) pairs of feature `f` from its top start and end positions that can be an
  answer: both in the context, end >= start, at most `max_answer_length` tokens, and a start that
  has its maximum context in this window."""
  is_context = features.token_offsets[f, :, 0] >= 0
  can_start = is_context & features.token_is_max_context[f]
  top_starts = np.argsort(-start_logits, kind="stable")[:n_best_size]
  top_ends = np.argsort(-end_logits, kind="stable")[:n_best_size]
  starts, ends = (a.reshape(-1) for a in np.meshgrid(top_starts, top_ends, indexing="ij"))
  ok = (can_start[starts] & is_context[ends] & (ends >= starts)
        & (ends - starts < max_answer_length))
  return starts[ok], ends[ok]


def _softmax(scores: np.ndarray) -> np.ndarray:
  exp = np.exp(scores - scores.max())
  return exp / exp.sum()


def postprocess(examples: Sequence[SquadExample], features: Features, start_logits, end_logits, *,
                n_best_size: int = 20, max_answer_length: int = 30, version_2: bool,
                null_threshold: float = 0.0
                ) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]], dict[str, float]]:
  """Answers from per-feature start/end logits [N, L]: (predictions, nbest, null_odds).

  A span's score is start_logit + end_logit; candidates of all an example's windows compete, spans
  with the same text count once, and `nbest[qas_id]` holds the best `n_best_size` as dicts of text,
  probability (softmax over the n-best scores), start_logit and end_logit. For v2.0 the null answer
  "" is a candidate too, scored by the smallest [CLS] start + end logit over the example's windows,
  and always kept in the n-best (with the best non-null answer, so `apply_null_threshold` can choose
  either later); `null_odds[qas_id]` is that null score minus the best non-null score (+inf when no
  span qualifies), and the prediction is "" where it exceeds `null_threshold`. For v1.1 the
  prediction is the best span ("" only if none qualifies) and `null_odds` is empty.
  """
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  expected = features.input_ids.shape
  if start_logits.shape != expected or end_logits.shape != expected:
    raise ValueError(f"start/end logits have shapes {start_logits.shape}, {end_logits.shape}; "
                     f"expected one logit per token of every feature: {expected}")
  if n_best_size < (2 if version_2 else 1):
    raise ValueError(f"n_best_size={n_best_size}: need room for the null answer and the best span "
                     "(>= 2) with version_2, >= 1 otherwise")
  order = np.argsort(features.example_index, kind="stable")
  bounds = np.searchsorted(features.example_index[order], np.arange(len(examples) + 1))
  predictions, nbest, null_odds = {}, {}, {}
  for i, example in enumerate(examples):
    feature_ids = order[bounds[i]:bounds[i + 1]]
    if not feature_ids.size:
      continue
    rows, starts, ends = [], [], []
    for f in feature_ids:
      s, e = _feature_spans(features, f, start_logits[f], end_logits[f], n_best_size,
                            max_answer_length)
      rows.append(np.full(len(s), f))
      starts.append(s)
      ends.append(e)
    rows, starts, ends = (np.concatenate(a) for a in (rows, starts, ends))
    scores = start_logits[rows, starts] + end_logits[rows, ends]
    spans, seen = [], set()   # (score, start_logit, end_logit, text), best first, distinct texts
    for k in np.argsort(-scores, kind="stable"):
      f, s, e = rows[k], starts[k], ends[k]
      text = example.context[features.token_offsets[f, s, 0]:features.token_offsets[f, e, 1]]
      if text and text not in seen:   # a lone SentencePiece "▁" covers no text: not an answer
        seen.add(text)
        spans.append((float(scores[k]), float(start_logits[f, s]), float(end_logits[f, e]), text))
        if len(spans) == n_best_size:
          break
    entries = spans
    if version_2:
      null_scores = start_logits[feature_ids, 0] + end_logits[feature_ids, 0]
      f = feature_ids[np.argmin(null_scores)]
      null = (float(null_scores.min()), float(start_logits[f, 0]), float(end_logits[f, 0]), "")
      entries = sorted(spans + [null], key=lambda c: -c[0])[:n_best_size]
      if null not in entries:
        entries = spans[:n_best_size - 1] + [null]
      null_odds[example.qas_id] = null[0] - spans[0][0] if spans else math.inf
    probabilities = _softmax(np.array([c[0] for c in entries])) if entries else []
    nbest[example.qas_id] = [
        {"text": text, "probability": float(p), "start_logit": start, "end_logit": end}
        for (_, start, end, text), p in zip(entries, probabilities)]
    predictions[example.qas_id] = spans[0][3] if spans else ""
  if version_2:
    predictions = apply_null_threshold(nbest, null_odds, null_threshold)
  return predictions, nbest, null_odds


def apply_null_threshold(nbest: Mapping[str, list[dict[str, Any]]],
                         null_odds: Mapping[str, float], threshold: float) -> dict[str, str]:
  """v2.0 predictions at a null-odds threshold: "" where null_odds > threshold, else the best
  non-null text of the n-best (as `postprocess` made it). `math.inf` gives every best span, the
  input `evaluate` needs to search thresholds; its `best_f1_thresh` then gives final predictions."""
  predictions = {}
  for qas_id, entries in nbest.items():
    best_span = next((e["text"] for e in entries if e["text"]), "")
    predictions[qas_id] = "" if null_odds[qas_id] > threshold else best_span
  return predictions


def write_predictions(output_dir: str, predictions: Mapping[str, str],
                      nbest: Mapping[str, list[dict[str, Any]]],
                      null_odds: Mapping[str, float] | None = None) -> list[str]:
  """predictions.json, nbest_predictions.json and (v2.0) null_odds.json in `output_dir`, in the
  layout of the official evaluation scripts and google-research/bert; returns the paths.

  Text is written as UTF-8, not \\u-escaped. The null odds of an example without any valid span
  (+inf) are written as Infinity, which Python's json (and so the official script) reads back.
  """
  fs, root = fsspec.core.url_to_fs(str(output_dir))
  fs.makedirs(root, exist_ok=True)
  files = {"predictions.json": predictions, "nbest_predictions.json": nbest}
  if null_odds is not None:
    files["null_odds.json"] = null_odds
  paths = []
  for name, content in files.items():
    path = str(output_dir).rstrip("/") + "/" + name
    with fsspec.open(path, "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False, indent=2)
    paths.append(path)
  return paths
