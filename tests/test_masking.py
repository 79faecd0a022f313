"""masking.mask_batch on hand-made batches: the form and number of predictions (rounding, the cap,
at least one), specials never masked, 80% [MASK] / 10% random / 10% unchanged with random ids from
the given set, determinism per generator, and whole-word masking."""

import numpy as np

from helpers import expected_num_masked
from pretrain.data import masking


SPECIALS = (0, 1, 2, 3, 4)   # [PAD] [UNK] [CLS] [SEP] [MASK]


def _batch(rows: list[list[int]], seq: int):
  ids = np.zeros((len(rows), seq), np.int32)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = row
  return ids, np.array([len(r) for r in rows], np.int32)


def _random_rows(rng, n, seq, low=5, high=100):
  rows = []
  for _ in range(n):
    la, lb = rng.integers(1, (seq - 3) // 2, size=2)
    a = list(rng.integers(low, high, la))
    b = list(rng.integers(low, high, lb))
    rows.append([2] + a + [3] + b + [3])
  return rows


def test_mask_batch_form_and_counts():
  rng = np.random.default_rng(0)
  rows = _random_rows(rng, 300, 40)
  rows[0][3] = 1                              # an [UNK] in the text is not a candidate
  rows.append([2, 50, 3, 60, 3])               # shortest pair
  ids, lengths = _batch(rows, 40)
  spec = masking.MaskingSpec(max_predictions_per_seq=4, masked_lm_prob=0.15, vocab_size=100)
  out = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(1))
  p = 4
  weights = out["masked_lm_weights"]
  assert out["masked_lm_positions"].shape == (len(rows), p) and weights.dtype == np.float32
  count = weights.sum(1).astype(int)
  np.testing.assert_array_equal(count, expected_num_masked(lengths, p))
  assert (count == 4).any() and (count < 4).any()  # the cap binds on some rows, not on others
  used = weights > 0
  positions = out["masked_lm_positions"]
  assert (positions[~used] == 0).all() and (out["masked_lm_ids"][~used] == 0).all()
  assert (np.diff(positions, axis=1)[used[:, 1:]] > 0).all()
  r = np.broadcast_to(np.arange(len(rows))[:, None], used.shape)[used]
  np.testing.assert_array_equal(out["masked_lm_ids"][used], ids[r, positions[used]])
  assert not np.isin(ids[r, positions[used]], SPECIALS).any()
  assert (positions < lengths[:, None])[used].all()
  # Only the chosen positions change.
  changed = out["input_ids"] != ids
  chosen = np.zeros_like(changed)
  chosen[r, positions[used]] = True
  assert not (changed & ~chosen).any()
  shown = out["input_ids"][r, positions[used]]
  random_ids = shown[(shown != 4) & (shown != out["masked_lm_ids"][used])]
  assert ((random_ids >= 5) & (random_ids < 100)).all(), "vocab_size draws skip the specials"


def _pair(la: int, lb: int, first: int = 10) -> list[int]:
  """[CLS] A [SEP] B [SEP] with la + lb distinct word tokens from `first` on."""
  return [2] + list(range(first, first + la)) + [3] + list(range(first + la, first + la + lb)) + [3]


def test_mask_batch_rounds_half_to_even_caps_and_takes_at_least_one():
  # masked_lm_prob 0.25 (exact in binary): 6 -> 1.5 -> 2, 10 -> 2.5 -> 2, 14 -> 3.5 -> 4,
  # 18 -> 4.5 -> 4 (half to even, as Python's round), 5 -> 1.25 -> 1, 7 -> 1.75 -> 2.
  ids, lengths = _batch([_pair(n - 4, 1) for n in (6, 10, 14, 18, 5, 7)], 20)
  np.testing.assert_array_equal(lengths, [6, 10, 14, 18, 5, 7])
  spec = masking.MaskingSpec(max_predictions_per_seq=20, masked_lm_prob=0.25, vocab_size=50)
  out = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), [2, 2, 4, 4, 1, 2])
  capped = masking.MaskingSpec(max_predictions_per_seq=3, masked_lm_prob=0.25, vocab_size=50)
  out = masking.mask_batch(ids, lengths, None, capped, np.random.default_rng(0))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), [2, 2, 3, 3, 1, 2])
  assert out["masked_lm_positions"].shape == (6, 3)
  tiny = masking.MaskingSpec(max_predictions_per_seq=20, masked_lm_prob=0.01, vocab_size=50)
  out = masking.mask_batch(ids, lengths, None, tiny, np.random.default_rng(0))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), np.ones(6))


def test_mask_batch_never_masks_specials_even_when_short_of_candidates():
  # [CLS] [UNK] x [SEP] [UNK] [SEP] ...: one candidate, 0.5 x 6 = 3 wanted; only x can be taken.
  ids, lengths = _batch([[2, 1, 40, 3, 1, 3]] * 50, 8)
  spec = masking.MaskingSpec(max_predictions_per_seq=4, masked_lm_prob=0.5, vocab_size=50)
  out = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), np.ones(50))
  np.testing.assert_array_equal(out["masked_lm_positions"][:, 0], np.full(50, 2))
  np.testing.assert_array_equal(out["input_ids"][:, [0, 1, 3, 4, 5, 6, 7]],
                                ids[:, [0, 1, 3, 4, 5, 6, 7]])


def test_mask_batch_80_10_10_and_random_ids_from_the_given_set():
  rng = np.random.default_rng(3)
  ids, lengths = _batch(_random_rows(rng, 10_000, 64, low=200, high=300), 64)
  allowed = np.arange(500, 520, dtype=np.int32)
  spec = masking.MaskingSpec(max_predictions_per_seq=10, random_token_ids=allowed,
                             special_ids=SPECIALS, mask_id=4)
  out = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(4))
  used = out["masked_lm_weights"] > 0
  r = np.broadcast_to(np.arange(len(ids))[:, None], used.shape)[used]
  shown = out["input_ids"][r, out["masked_lm_positions"][used]]
  original = out["masked_lm_ids"][used]
  assert used.sum() > 40_000
  is_mask, same = shown == 4, shown == original
  is_random = ~is_mask & ~same
  assert abs(is_mask.mean() - 0.8) < 0.01
  assert abs(is_random.mean() - 0.1) < 0.01
  assert abs(same.mean() - 0.1) < 0.01
  assert np.isin(shown[is_random], allowed).all()
  assert len(np.unique(shown[is_random])) == len(allowed)   # drawn over the whole set


def test_mask_batch_is_deterministic_per_rng_and_varies_between_draws():
  rng = np.random.default_rng(5)
  ids, lengths = _batch(_random_rows(rng, 50, 32), 32)
  spec = masking.MaskingSpec(max_predictions_per_seq=5, vocab_size=100)
  a = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(9))
  b = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(9))
  c = masking.mask_batch(ids, lengths, None, spec, np.random.default_rng(10))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["masked_lm_positions"], c["masked_lm_positions"])


def test_whole_word_mask_skips_a_word_that_would_overshoot():
  # [CLS] w w w w w x [SEP] y [SEP]: length 10, 0.2 -> 2 predictions. The 5-piece word w never fits;
  # x and y (one piece each) are taken whichever order the words are visited in.
  row = [2, 10, 11, 12, 13, 14, 20, 3, 30, 3]
  word_start = [0, 1, 0, 0, 0, 0, 1, 0, 1, 0]
  n = 2000
  ids, lengths = _batch([row] * n, 12)
  starts = np.zeros((n, 12), np.uint8)
  starts[:, :10] = word_start
  spec = masking.MaskingSpec(max_predictions_per_seq=5, masked_lm_prob=0.2, whole_word_mask=True,
                             vocab_size=100)
  out = masking.mask_batch(ids, lengths, starts, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), np.full(n, 2))
  np.testing.assert_array_equal(out["masked_lm_positions"][:, :2], np.tile([6, 8], (n, 1)))

  # With 3 predictions (0.3): still only x and y; the greedy pass ends one short of the cap.
  spec3 = masking.MaskingSpec(max_predictions_per_seq=5, masked_lm_prob=0.3, whole_word_mask=True,
                              vocab_size=100)
  out = masking.mask_batch(ids, lengths, starts, spec3, np.random.default_rng(1))
  np.testing.assert_array_equal(out["masked_lm_weights"].sum(1), np.full(n, 2))

  # [CLS] a a b b b c [SEP] d [SEP], 0.4 -> 4 predictions; words a (2 pieces), b (3), c, d (1 each).
  # a + b overshoot, so whichever of them is visited second is skipped and the one-piece words after
  # it are still taken: {a, c, d}, or b with whichever of c and d comes first.
  word_start = [0, 1, 0, 1, 0, 0, 1, 0, 1, 0]
  starts[:, :10] = word_start
  spec4 = masking.MaskingSpec(max_predictions_per_seq=5, masked_lm_prob=0.4, whole_word_mask=True,
                              vocab_size=100)
  out = masking.mask_batch(ids, lengths, starts, spec4, np.random.default_rng(2))
  chosen = [tuple(p[w > 0].tolist()) for p, w in zip(out["masked_lm_positions"],
                                                     out["masked_lm_weights"])]
  assert set(chosen) == {(1, 2, 6, 8), (3, 4, 5, 6), (3, 4, 5, 8)}, set(chosen)
  # Words are visited in a uniformly random order: {a, c, d} when a precedes b (1/2) or when the
  # order is c, d, b, a or d, c, b, a (2/24): 14/24 of the rows.
  assert abs(chosen.count((1, 2, 6, 8)) / n - 14 / 24) < 0.04


def test_whole_word_mask_keeps_words_whole_and_treats_a_segment_start_as_a_word_start():
  rng = np.random.default_rng(7)
  n, s = 500, 48
  rows, starts = [], np.zeros((n, s), np.uint8)
  for r in range(n):
    la, lb = rng.integers(2, 20, size=2)
    row = [2] + list(rng.integers(10, 90, la)) + [3] + list(rng.integers(10, 90, lb)) + [3]
    ws = rng.random(len(row)) < 0.5
    ws[1] = ws[2 + la] = False        # segments that start inside a word (truncated pieces)
    starts[r, :len(row)] = ws
    rows.append(row)
  ids, lengths = _batch(rows, s)
  spec = masking.MaskingSpec(max_predictions_per_seq=8, whole_word_mask=True, vocab_size=100)
  out = masking.mask_batch(ids, lengths, starts, spec, np.random.default_rng(8))
  masked = np.zeros((n, s), bool)
  used = out["masked_lm_weights"] > 0
  masked[np.broadcast_to(np.arange(n)[:, None], used.shape)[used],
         out["masked_lm_positions"][used]] = True
  candidate = (np.arange(s)[None, :] < lengths[:, None]) & ~np.isin(ids, SPECIALS)
  left_candidate = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
  joins = candidate & ~starts.astype(bool) & left_candidate
  masked_left = np.pad(masked[:, :-1], ((0, 0), (1, 0)))
  assert not (joins & (masked != masked_left)).any()
  cap = expected_num_masked(lengths, 8)
  assert (masked.sum(1) <= cap).all()
  # The first piece of A and of B (flag 0, left neighbour special) can be masked on its own word.
  first_b = np.array([r.index(3) + 1 for r in rows])
  assert masked[np.arange(n), 1].any() and masked[np.arange(n), first_b].any()
  assert not masked[~candidate].any()
