"""instances: google-research/bert's sentence pairs on hand-made corpora: runs of whole sentences,
truncation, document bounds, random and actual next segments, determinism, and `pack`'s layout."""

import random

import numpy as np

from pretrain.data import instances as instances_lib


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
