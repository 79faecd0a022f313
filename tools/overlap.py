"""How much of a fine-tuning task's text a pretraining corpus has seen (`bert-data overlap`).

A pretrained encoder can only transfer what its corpus taught it: a word the corpus never (or
rarely) used gets no useful representation however long the run. For each task this reports, over
the task's running words (lowercased letters and apostrophes; each occurrence counts), the share
whose word appears at least 1, 10 and 100 times in the corpus, the share of distinct words the
corpus never has, and, with a tokenizer, its pieces per word (over those words) and the share of
the task's pieces (over its raw text) that are the unknown token.
Issue 15 uses it to say where a small corpus, not the recipe, limits transfer.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import dataclasses
import re

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
THRESHOLDS = (1, 10, 100)


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def corpus_counts(documents: Iterable[list[str]]) -> collections.Counter:
  """Word counts over documents given as lists of sentences (pretrain.data.corpus's form)."""
  counts = collections.Counter()
  for document in documents:
    for sentence in document:
      counts.update(words(sentence))
  return counts


@dataclasses.dataclass(frozen=True)
class Overlap:
  running_words: int
  distinct_words: int
  seen: dict[int, float]          # threshold -> share of running words seen that often or more
  unseen_distinct: float          # share of distinct words the corpus never has
  pieces_per_word: float | None = None
  unknown_rate: float | None = None   # share of the task's pieces that are the unknown token

  def row(self, name: str) -> str:
    seen = " / ".join(f"{self.seen[t]:.3f}" for t in THRESHOLDS)
    pieces = "" if self.pieces_per_word is None else (
        f" | {self.pieces_per_word:.2f} | {self.unknown_rate:.4f}")
    return (f"| {name} | {self.running_words:,} | {self.distinct_words:,} | {seen} | "
            f"{self.unseen_distinct:.3f}{pieces} |")


def header(with_tokenizer: bool) -> str:
  cols = ["task", "running words", "distinct words",
          "running words seen >= " + " / ".join(map(str, THRESHOLDS)) + " times",
          "distinct words never seen"]
  if with_tokenizer:
    cols += ["pieces per word", "unknown pieces"]
  return "| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols)


def measure(texts: Sequence[str], corpus: collections.Counter, tokenizer=None) -> Overlap:
  """The overlap of `texts` (a task's inputs) with the corpus word counts."""
  task = collections.Counter(w for text in texts for w in words(text))
  total = sum(task.values())
  if not total:
    raise ValueError("the task has no words to measure")
  seen = {t: sum(n for w, n in task.items() if corpus[w] >= t) / total for t in THRESHOLDS}
  unseen = sum(1 for w in task if not corpus[w]) / len(task)
  if tokenizer is None:
    return Overlap(total, len(task), seen, unseen)
  unk = tokenizer.token_to_id("[UNK]")
  if unk is None:
    unk = tokenizer.token_to_id("<unk>")
  # Pieces per word over the words alone (punctuation and digits are not words here); the
  # unknown rate over the raw text, where the characters a vocabulary lacks are.
  word_pieces = sum(len(ids) for ids, _ in tokenizer.encode_batch(
      [" ".join(words(text)) for text in texts]))
  pieces = unknown = 0
  for ids, _ in tokenizer.encode_batch(list(texts)):
    pieces += len(ids)
    unknown += int((ids == unk).sum()) if unk is not None else 0
  return Overlap(total, len(task), seen, unseen, word_pieces / total, unknown / max(pieces, 1))
