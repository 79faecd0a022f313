"""Masked-LM predictions, google-research/bert's recipe, vectorised over a batch of sequences.

One implementation serves both modes: `static` masking applies it once per instance when shards are
written; `dynamic` masking applies it to every batch the loader draws, so each epoch sees new masks.

Per sequence (google-research/bert `create_masked_lm_predictions`):
- candidates are the non-special tokens, grouped into whole words when `whole_word_mask` is set;
- num_to_predict = min(max_predictions_per_seq, max(1, round(length x masked_lm_prob))), where
  length counts every token including [CLS]/[SEP], and round() rounds half to even, as Python does;
- candidate words are visited in a random order and taken greedily: a word that would overshoot
  num_to_predict is skipped and later, shorter words may still fit;
- each chosen token independently becomes [MASK] (80%), a random word token (10%) or stays (10%).
The random replacement is drawn from the tokenizer's ordinary tokens, never a special one (google
drew from the whole vocabulary, [unused] entries included).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  max_predictions_per_seq: int
  masked_lm_prob: float = 0.15
  whole_word_mask: bool = False
  mask_id: int = 4
  special_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
  random_token_ids: np.ndarray | None = None     # ids a 10%-random replacement draws from
  vocab_size: int | None = None                  # used when random_token_ids is None

  @classmethod
  def for_tokenizer(cls, tokenizer, max_predictions_per_seq: int, masked_lm_prob: float = 0.15,
                    whole_word_mask: bool = False) -> MaskingSpec:
    """[MASK] and special ids from a `pretrain.data.tokenizer.Tokenizer`; random words from its
    normal ids."""
    return cls(max_predictions_per_seq=max_predictions_per_seq, masked_lm_prob=masked_lm_prob,
               whole_word_mask=whole_word_mask, mask_id=tokenizer.mask_id,
               special_ids=tuple(sorted(tokenizer.special_ids)),
               random_token_ids=np.asarray(tokenizer.normal_ids, np.int32))

  def random_tokens(self, rng: np.random.Generator, shape) -> np.ndarray:
    if self.random_token_ids is not None:
      return self.random_token_ids[rng.integers(0, len(self.random_token_ids), size=shape)]
    low = max(self.special_ids) + 1
    return rng.integers(low, self.vocab_size, size=shape)


def mask_batch(input_ids: np.ndarray, lengths: np.ndarray, word_start: np.ndarray | None,
               spec: MaskingSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Masks a batch of unmasked sequences.

  Args:
    input_ids: (batch, seq) token ids with [CLS]/[SEP] in place and padding after `lengths`.
    lengths: (batch,) number of real tokens per row.
    word_start: (batch, seq) True at the first token of every word (whole-word masking only).
  Returns:
    input_ids with the replacements, masked_lm_positions / masked_lm_ids (original tokens) /
    masked_lm_weights, each (batch, max_predictions_per_seq), positions sorted, unused slots 0.
  """
  b, s = input_ids.shape
  p = spec.max_predictions_per_seq
  positions = np.arange(s)[None, :]
  candidate = (positions < lengths[:, None]) & ~np.isin(input_ids, spec.special_ids)
  num_to_predict = np.minimum(p, np.maximum(1, np.round(lengths * spec.masked_lm_prob))).astype(
      np.int64)

  if spec.whole_word_mask and word_start is not None:
    chosen = _choose_whole_words(candidate, word_start.astype(bool), num_to_predict, rng)
  else:
    # Every token is its own word: the greedy pass takes the first num_to_predict of a shuffle.
    order = np.argsort(np.where(candidate, rng.random((b, s)), np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(s)[None, :].repeat(b, 0), axis=1)
    chosen = candidate & (rank < num_to_predict[:, None])

  # Gather chosen positions in order, padded with s (sorted last), then 0.
  pos = np.sort(np.where(chosen, positions, s), axis=1)[:, :p]
  weights = (pos < s).astype(np.float32)
  pos = np.where(pos < s, pos, 0)
  rows = np.arange(b)[:, None]
  original = np.where(weights > 0, input_ids[rows, pos], 0)

  draw = rng.random((b, p))
  random_tokens = spec.random_tokens(rng, (b, p))
  replacement = np.where(draw < 0.8, spec.mask_id, np.where(draw < 0.9, random_tokens, original))
  masked = input_ids.copy()
  real = weights > 0
  masked[np.broadcast_to(rows, (b, p))[real], pos[real]] = replacement[real]
  return {"input_ids": masked, "masked_lm_positions": pos.astype(np.int32),
          "masked_lm_ids": original.astype(np.int32), "masked_lm_weights": weights}


def _choose_whole_words(candidate, word_start, num_to_predict, rng):
  """Greedy whole-word selection in a random word order, skipping words that overshoot."""
  b, s = candidate.shape
  # A word starts at a flagged candidate, or at a candidate whose left neighbour is not one
  # (e.g. the first token of segment B); continuation pieces join the word on their left.
  left_is_candidate = np.concatenate([np.zeros((b, 1), bool), candidate[:, :-1]], axis=1)
  starts = candidate & (word_start | ~left_is_candidate)
  word_of_token = np.where(candidate, np.cumsum(starts, axis=1) - 1, -1)
  num_words = starts.sum(1)
  max_words = int(num_words.max()) if b else 0
  if max_words == 0:
    return np.zeros_like(candidate)
  rows = np.arange(b)[:, None]
  word_len = np.zeros((b, max_words), np.int64)
  np.add.at(word_len, (np.broadcast_to(rows, (b, s))[candidate], word_of_token[candidate]), 1)
  # Visit words in a random order.
  keys = np.where(np.arange(max_words)[None, :] < num_words[:, None], rng.random((b, max_words)),
                  np.inf)
  order = np.argsort(keys, axis=1, kind="stable")
  taken_words = np.zeros((b, max_words), bool)
  count = np.zeros(b, np.int64)
  for r in range(max_words):
    w = order[:, r]
    length = word_len[np.arange(b), w]
    take = (r < num_words) & (count < num_to_predict) & (count + length <= num_to_predict)
    taken_words[np.arange(b), w] = take
    count += np.where(take, length, 0)
  return candidate & np.take_along_axis(taken_words, np.maximum(word_of_token, 0), axis=1)
