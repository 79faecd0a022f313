"""A synthetic pretraining stream: random tokens with valid BERT MLM/NSP structure.

It lets the train loop, the benchmarks and the tests run without a corpus. Batch `i` is a pure
function of `(seed, i)`, and each process keeps only its rows of the global batch, so the stream is
identical whatever the number of hosts, and resuming only needs the index of the next batch.

Layout per row: [CLS] A [SEP] B [SEP] [PAD]...; segment ids 0 then 1; masked by `pretrain.masking`
(BERT's 80/10/10 over 15% of the tokens), as real dynamic-masked shards are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pretrain.data import masking

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

    spec = masking.MaskingSpec(max_predictions_per_seq=p, masked_lm_prob=self.masked_lm_prob,
                               mask_id=MASK_ID, special_ids=(PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID),
                               vocab_size=self.vocab_size)
    masked = masking.mask_batch(ids, lengths, None, spec, rng)

    batch = {
        **masked,
        "input_ids": masked["input_ids"].astype(np.int32),
        "input_mask": input_mask,
        "segment_ids": segment_ids,
        "next_sentence_labels": rng.integers(0, 2, size=b).astype(np.int32),
    }
    return {k: v[self._rows] for k, v in batch.items()}
