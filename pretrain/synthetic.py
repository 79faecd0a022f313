"""A synthetic pretraining stream: random tokens with valid BERT MLM/NSP structure.

It lets the train loop, the benchmarks and the tests run without a corpus. Batch `i` is a pure
function of `(seed, i)`, and each process keeps only its rows of the global batch, so the stream is
identical whatever the number of hosts, and resuming only needs the index of the next batch.

Layout per row: [CLS] A [SEP] B [SEP] [PAD]...; segment ids 0 then 1; 15% of the non-special tokens
(at most `max_predictions_per_seq`) chosen for prediction, of which 80% become [MASK], 10% a random
token and 10% stay unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
FIRST_WORD_ID = 5


class SyntheticSource:
  """Iterator of host-local numpy batches; `get_state`/`set_state` give its resumable position."""

  def __init__(self, *, vocab_size: int, max_seq_length: int, max_predictions_per_seq: int,
               global_batch_size: int, seed: int, masked_lm_prob: float = 0.15,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} does not split over {process_count} "
                       "processes")
    if vocab_size <= FIRST_WORD_ID:
      raise ValueError(f"vocab_size={vocab_size} leaves no room for word tokens")
    self.vocab_size = vocab_size
    self.seq_len = max_seq_length
    self.num_predictions = max_predictions_per_seq
    self.global_batch_size = global_batch_size
    self.masked_lm_prob = masked_lm_prob
    self.seed = seed
    rows = global_batch_size // process_count
    self._rows = slice(process_index * rows, (process_index + 1) * rows)
    self._next = 0

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next}

  def set_state(self, state: dict[str, Any]):
    self._next = int(state["next_batch"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._next)
    self._next += 1
    return batch

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """The host's rows of global batch `index`."""
    rng = np.random.default_rng([self.seed, index])
    b, s, p = self.global_batch_size, self.seq_len, self.num_predictions
    pos = np.arange(s)[None, :]
    lengths = rng.integers(max(5, s // 2), s + 1, size=b)              # tokens incl. specials
    words = lengths - 3
    len_a = 1 + (rng.random(b) * (words - 1)).astype(np.int64)        # 1 <= len_a <= words - 1
    sep_a = 1 + len_a
    ids = rng.integers(FIRST_WORD_ID, self.vocab_size, size=(b, s))
    ids[:, 0] = CLS_ID
    ids[pos == sep_a[:, None]] = SEP_ID
    ids[pos == (lengths - 1)[:, None]] = SEP_ID
    ids[pos >= lengths[:, None]] = PAD_ID
    input_mask = (pos < lengths[:, None]).astype(np.int32)
    segment_ids = ((pos > sep_a[:, None]) & (pos < lengths[:, None])).astype(np.int32)

    # Choose the positions to predict: a random subset of each row's word tokens.
    maskable = (ids >= FIRST_WORD_ID) & (input_mask == 1)
    num_to_predict = np.minimum(p, np.maximum(1, np.round(words * self.masked_lm_prob))).astype(int)
    order = np.argsort(np.where(maskable, rng.random((b, s)), np.inf), axis=1, kind="stable")
    chosen = order[:, :p]
    slot = np.arange(p)[None, :]
    weights = (slot < num_to_predict[:, None]).astype(np.float32)
    positions = np.where(weights > 0, chosen, s)                    # s sorts unused slots last
    positions = np.sort(positions, axis=1)
    positions = np.where(positions == s, 0, positions)
    rows = np.arange(b)[:, None]
    masked_ids = np.where(weights > 0, ids[rows, positions], 0)

    # 80% [MASK], 10% random word, 10% unchanged.
    draw = rng.random((b, p))
    random_words = rng.integers(FIRST_WORD_ID, self.vocab_size, size=(b, p))
    replacement = np.where(draw < 0.8, MASK_ID, np.where(draw < 0.9, random_words, masked_ids))
    inputs = ids.copy()
    real = weights > 0
    inputs[rows.repeat(p, 1)[real], positions[real]] = replacement[real]

    batch = {
        "input_ids": inputs.astype(np.int32),
        "input_mask": input_mask,
        "segment_ids": segment_ids,
        "masked_lm_positions": positions.astype(np.int32),
        "masked_lm_ids": masked_ids.astype(np.int32),
        "masked_lm_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, size=b).astype(np.int32),
    }
    return {k: v[self._rows] for k, v in batch.items()}
